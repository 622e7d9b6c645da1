"""Demo: dictionaries of seven recipes on a language model's activations, compared on one plot.

    python demos/demo.py                                  # SmolLM2-135M, layer 3 MLP, offline
    python demos/demo.py --model EleutherAI/pythia-70m-deduped --layer 3 --site resid --device cuda

1. caches the activations once (ActivationCache, with the model stopped after the layer);
2. trains Standard, Gated, p-anneal, TopK, BatchTopK, Matryoshka and JumpReLU dictionaries at two
   sparsities each, all from the same stream in one trainSAE call;
3. evaluates each on held-out text: variance explained, L0, and the next-token loss recovered and
   KL divergence when the dictionary replaces the layer's output;
4. writes results.json, plots/l0_vs_fve.png and plots/l0_vs_loss_recovered.png, and prints a table.
The default settings take about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dictionary_learning import load_dictionary, trainSAE
from dictionary_learning.buffer import ActivationReader
from dictionary_learning.cache import ActivationCache, CacheError
from dictionary_learning.evaluation import baseline, frac_recovered, loss_recovered_metrics, reconstruction_metrics
from dictionary_learning.models import default_texts, get_submodule, load_default_model, load_model
from dictionary_learning.trainers import (
    BatchTopKTrainer,
    GatedSAETrainer,
    JumpReluTrainer,
    MatryoshkaBatchTopKTrainer,
    PAnnealTrainer,
    StandardTrainer,
    TopKTrainer,
)

CTX_LEN = 128


def trainer_configs(d: int, dict_size: int, steps: int, layer: int, lm_name: str, site: str, device: str):
    """Two sparsities per recipe, scaled to a short run (activations are normalised to unit mean
    squared norm, so the penalties do not depend on the model's scale)."""
    common = dict(
        activation_dim=d,
        dict_size=dict_size,
        warmup_steps=max(1, steps // 20),
        seed=0,
        layer=layer,
        lm_name=lm_name,
        submodule_name=site,
        device=device,
    )
    penalised = dict(common, sparsity_warmup_steps=max(1, steps // 10), lr=1e-3)
    topk = dict(common, threshold_start_step=max(1, steps // 10))
    configs = []
    for penalty in (0.04, 0.12):
        configs.append(dict(trainer=StandardTrainer, l1_penalty=penalty, **penalised))
        configs.append(dict(trainer=GatedSAETrainer, l1_penalty=penalty, **penalised))
        configs.append(
            dict(
                trainer=PAnnealTrainer,
                initial_sparsity_penalty=penalty,
                sparsity_function="Lp^p",
                anneal_start=steps // 2,
                p_end=0.5,
                **penalised,
            )
        )
    for k in (16, 48):
        configs.append(dict(trainer=TopKTrainer, k=k, **topk))
        configs.append(dict(trainer=BatchTopKTrainer, k=k, **topk))
        configs.append(dict(trainer=MatryoshkaBatchTopKTrainer, k=k, group_fractions=[0.25, 0.75], **topk))
        configs.append(dict(trainer=JumpReluTrainer, target_l0=k, **penalised))
    return configs


def sparsity_setting(config: dict) -> str:
    for key in ("l1_penalty", "initial_sparsity_penalty", "k", "target_l0"):
        if key in config:
            return f"{key}={config[key]}"
    return ""


def plot(results: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    recipes = sorted({r["recipe"] for r in results})
    colors = dict(zip(recipes, plt.cm.tab10.colors))
    for key, label, name in (
        ("frac_variance_explained", "fraction of variance explained", "l0_vs_fve.png"),
        ("frac_recovered", "fraction of next-token loss recovered", "l0_vs_loss_recovered.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for recipe in recipes:
            points = sorted((r["l0"], r[key]) for r in results if r["recipe"] == recipe)
            ax.plot(*zip(*points), "o-", color=colors[recipe], label=recipe.removesuffix("Trainer"))
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active features per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{results[0]['model']} {results[0]['site']}: {label} vs L0", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: the offline SmolLM2-135M)")
    parser.add_argument("--layer", type=int, default=3, help="transformer layer to read")
    parser.add_argument("--site", default="mlp", choices=["mlp", "resid", "attn"], help="output of which module")
    parser.add_argument("--tokens", type=int, default=400_000, help="training tokens (cached once)")
    parser.add_argument("--dict-size", type=int, default=None, help="features per dictionary (default 4 x width)")
    parser.add_argument("--batch-size", type=int, default=1024, help="activations per training step")
    parser.add_argument("--eval-texts", type=int, default=32, help="held-out documents for evaluation")
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if (out / "results.json").exists() and not args.overwrite:
        parser.error(f"{out} already holds results; pass --overwrite to replace them or choose another --out")
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    model = load_model(args.model, device=args.device) if args.model else load_default_model(device=args.device)
    lm_name = args.model or "SmolLM2-135M-Instruct"
    site = get_submodule(model, args.layer, args.site)
    site_name = f"{args.site}_layer{args.layer}"
    texts = list(default_texts())
    eval_texts, train_texts = texts[: args.eval_texts], texts[args.eval_texts :]

    start = time.perf_counter()
    try:
        cache = ActivationCache(out / "activations", batch_size=args.batch_size, loop=True, seed=0)
    except CacheError:
        ActivationCache.build(
            out / "activations", model, site, train_texts, args.tokens, ctx_len=CTX_LEN, refresh_batch_size=32
        )
        cache = ActivationCache(out / "activations", batch_size=args.batch_size, loop=True, seed=0)
    cache_seconds = time.perf_counter() - start

    d = cache.config["d_submodule"]
    steps = max(1, cache.n_tokens // args.batch_size)
    configs = trainer_configs(d, args.dict_size or 4 * d, steps, args.layer, lm_name, site_name, args.device)
    start = time.perf_counter()
    trainSAE(
        cache,
        configs,
        steps,
        save_dir=out / "dictionaries",
        normalize_activations=True,
        log_steps=max(1, steps // 20),
        overwrite=True,  # dictionaries of an interrupted demo (results.json, checked above, marks a finished one)
    )
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    reader = ActivationReader(iter(()), model, site, ctx_len=CTX_LEN)
    tokens = reader.tokenize(eval_texts)
    base = baseline(reader, tokens)  # the clean and zero-ablated runs, shared by every dictionary
    results = []
    for i, config in enumerate(tqdm(configs, desc="evaluating")):
        ae, _ = load_dictionary(out / "dictionaries" / f"trainer_{i}", device=args.device)
        losses, x, x_hat, f = loss_recovered_metrics(ae, reader, tokens, base=base)
        metrics = reconstruction_metrics(x, x_hat, f) | losses
        metrics["frac_recovered"] = frac_recovered(losses)
        metrics["frac_alive"] = float((f != 0).any(0).float().mean())
        results.append(
            {
                "trainer": f"trainer_{i}",
                "recipe": config["trainer"].__name__,
                "dictionary": type(ae).__name__,
                "setting": sparsity_setting(config),
                "model": lm_name,
                "site": site_name,
                **metrics,
            }
        )
    eval_seconds = time.perf_counter() - start

    (out / "results.json").write_text(
        json.dumps(
            {
                "model": lm_name,
                "site": site_name,
                "tokens": cache.n_tokens,
                "steps": steps,
                "batch_size": args.batch_size,
                "eval_tokens": int(tokens["attention_mask"].sum()),
                "seconds": {"cache": cache_seconds, "train": train_seconds, "evaluate": eval_seconds},
                "results": results,
            },
            indent=2,
        )
    )
    plots = plot(results, out / "plots")

    print(
        f"\n{lm_name} {site_name}: {cache.n_tokens} training tokens, {steps} steps; "
        f"evaluated on {int(tokens['attention_mask'].sum())} held-out tokens"
    )
    print(
        f"{'trainer':11s} {'recipe':28s} {'setting':26s} {'L0':>7s} {'FVE':>6s} {'loss rec.':>9s} {'KL':>7s} "
        f"{'alive':>6s}"
    )
    for r in results:
        print(
            f"{r['trainer']:11s} {r['recipe']:28s} {r['setting']:26s} {r['l0']:7.1f} "
            f"{r['frac_variance_explained']:6.3f} {r['frac_recovered']:9.3f} {r['kl_div']:7.4f} "
            f"{r['frac_alive']:6.2f}"
        )
    print(
        f"clean CE {results[0]['loss_original']:.3f}, zero-ablated CE {results[0]['loss_zero']:.3f}; "
        f"times: cache {cache_seconds:.0f} s, training {train_seconds:.0f} s, evaluation {eval_seconds:.0f} s"
    )
    print(f"wrote {out / 'results.json'}" + "".join(f", {p}" for p in plots))
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
