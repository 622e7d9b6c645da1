"""Demo: dictionaries of seven recipes on a language model's activations, compared on one plot.

    python demos/demo.py                                  # SmolLM2-135M, layer 3 MLP, offline
    python demos/demo.py --model EleutherAI/pythia-70m-deduped --layer 3 --site resid --device cuda

1. caches 196,608 activations once (ActivationCache, with the model stopped after the layer);
2. trains Standard, Gated, p-anneal, TopK, BatchTopK, Matryoshka and JumpReLU dictionaries at two
   sparsities each, all from the same stream in one trainSAE call;
3. evaluates each on 4,096 tokens of held-out articles (32 contexts of the deterministic split's
   held-out part; training reads only the train part; `--full`: 32,768 tokens): variance
   explained, L0, and the next-token loss recovered, CE increase and KL divergence when the
   dictionary replaces the layer's output, with 95 % bootstrap intervals over the evaluated
   contexts, and each dictionary's CE increase against the best one's, paired over the same
   contexts (those intervals stay tight on few tokens, where the absolute ones do not);
4. probes each on 500 BBC News articles for their topic (sparse probing, SAEBench's procedure:
   logistic regression on the top-1 and top-5 latents, one model pass shared by all 14);
5. writes results.json, plots/l0_vs_fve.png, plots/l0_vs_loss.png (loss recovered and CE
   increase against L0) and plots/l0_vs_probing.png (top-1 and top-5 probing accuracy against
   L0), each point labelled with its setting, and prints a table.
The default settings take about 10 minutes on 2 CPU cores (`--full`: about 30, most of it 16 runs
of the whole model over the 32k tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from demo_common import add_run_arguments, start_run

from dictionary_learning import load_dictionary, trainSAE
from dictionary_learning.cache import ActivationCache, CacheError
from dictionary_learning.evaluation import evaluate_dictionaries
from dictionary_learning.models import default_texts, get_submodule
from dictionary_learning.nnsight_io import model_id
from dictionary_learning.probing import bbc_topics
from dictionary_learning.reader import ActivationReader
from dictionary_learning.suite import probing_overlap, run_probing
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
EVAL_BATCH = 32  # contexts per evaluation batch


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
    recipes = sorted({r["recipe"] for r in results})
    colors = dict(zip(recipes, plt.cm.tab10.colors))
    title = f"{results[0]['model']} {results[0]['site']}, {results[0]['n_tokens']:,} held-out tokens"
    panels = {
        "l0_vs_fve.png": [("frac_variance_explained", "fraction of variance explained")],
        "l0_vs_loss.png": [
            ("frac_recovered", "fraction of next-token loss recovered"),
            ("ce_diff", "CE increase when spliced in (nats)"),
        ],
        "l0_vs_probing.png": [
            ("sae_top_1_test_accuracy", "top-1 sparse probing accuracy (BBC topics)"),
            ("sae_top_5_test_accuracy", "top-5 sparse probing accuracy"),
        ],
    }
    paths = []
    for name, keys in panels.items():
        fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.8), squeeze=False)
        for ax, (key, label) in zip(axes[0], keys):
            for recipe in recipes:
                points = sorted((r["l0"], r[key], r.get(f"{key}_lo"), r.get(f"{key}_hi"), r["setting"])
                                for r in results if r["recipe"] == recipe)  # fmt: skip
                l0s, values = [p[0] for p in points], [p[1] for p in points]
                ax.plot(l0s, values, "o-", color=colors[recipe], label=recipe.removesuffix("Trainer"))
                if points[0][2] is not None:
                    errors = [[v - p[2] for v, p in zip(values, points)], [p[3] - v for v, p in zip(values, points)]]
                    ax.errorbar(l0s, values, yerr=errors, fmt="none", ecolor=colors[recipe], alpha=0.6, capsize=2)
                for l0_value, value, *_, setting in points:
                    ax.annotate(setting.split("=")[-1], (l0_value, value), textcoords="offset points", xytext=(4, 3),
                                fontsize=7, color=colors[recipe])  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel("L0 (active features per token)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{title} (bars: 95 % intervals; labels: k, L1 penalty or target L0)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def evaluate_all(model, site, dictionaries: list, n_tokens: int, device: str) -> list[dict]:
    """Every dictionary on the same held-out contexts (`evaluation.evaluate_dictionaries`)."""
    reader = ActivationReader(default_texts(split="held_out"), model, site, ctx_len=CTX_LEN)
    results = evaluate_dictionaries(reader, [ae.to(device) for ae in dictionaries], n_tokens, EVAL_BATCH)
    return [r | {"best": f"trainer_{r['best']}"} for r in results]


def probe_all(model, site, dictionaries: list, results: list[dict], n_texts: int, cache_config: dict) -> dict:
    """Sparse probing of every dictionary on BBC topics (one model pass; `suite.run_probing`); the
    accuracies go into each result, the model's own and the data's record into the returned dict."""
    data = bbc_topics().limited(n_texts)
    llm, records = run_probing(model, site, dictionaries, data, CTX_LEN, EVAL_BATCH)
    for result, record in zip(results, records):
        result |= {k: v for k, v in record.items() if k != "per_class"}
    overlap = probing_overlap(data.texts, cache_config, data.source)
    return {"llm_test_accuracy": llm["llm_test_accuracy"], "data": data.record(), "overlap": overlap}


def print_table(results: list[dict]) -> None:
    """One line per dictionary; "vs best": its CE increase minus the best one's, paired over the
    same contexts ("=" marks an interval that holds 0: not told apart from the best on this text)."""
    print(
        f"{'trainer':11s} {'recipe':27s} {'setting':25s} {'L0':>6s} {'FVE':>6s} {'loss recovered':>21s} "
        f"{'CE increase':>22s} {'vs best (paired)':>26s} {'top-1':>5s} {'top-5':>5s}"
    )
    for r in results:
        rec = f"{r['frac_recovered']:.3f} [{r['frac_recovered_lo']:.3f}, {r['frac_recovered_hi']:.3f}]"
        diff = f"{r['ce_diff']:.4f} [{r['ce_diff_lo']:.4f}, {r['ce_diff_hi']:.4f}]"
        same = "=" if r["vs_best_lo"] <= 0 <= r["vs_best_hi"] else " "
        vs = f"{r['vs_best']:+.4f} [{r['vs_best_lo']:+.4f}, {r['vs_best_hi']:+.4f}]{same}"
        print(
            f"{r['trainer']:11s} {r['recipe']:27s} {r['setting']:25s} {r['l0']:6.1f} "
            f"{r['frac_variance_explained']:6.3f} {rec:>21s} {diff:>22s} {vs:>26s} "
            f"{r['sae_top_1_test_accuracy']:5.3f} {r['sae_top_5_test_accuracy']:5.3f}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=3, help="transformer layer to read")
    parser.add_argument("--site", default="mlp", choices=["mlp", "resid", "attn"], help="output of which module")
    parser.add_argument("--tokens", type=int, default=196_608, help="training tokens (cached once)")
    parser.add_argument("--dict-size", type=int, default=None, help="features per dictionary (default 4 x width)")
    parser.add_argument("--batch-size", type=int, default=1024, help="activations per training step")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens to evaluate on")
    parser.add_argument("--full", action="store_true", help="evaluate on 32,768 held-out tokens (about 30 minutes)")
    parser.add_argument(
        "--probe-texts", type=int, default=500, help="BBC articles for sparse probing, an equal share per topic"
    )
    add_run_arguments(parser, "runs/demo")
    args = parser.parse_args(argv)
    if args.full:
        args.eval_tokens = 32_768
    began = time.perf_counter()
    out, model = start_run(parser, args)
    lm_name = model_id(model)
    site = get_submodule(model, args.layer, args.site)
    site_name = f"{args.site}_layer{args.layer}"

    start = time.perf_counter()
    try:
        cache = ActivationCache(out / "activations", batch_size=args.batch_size, seed=0)
    except CacheError:
        train_texts = default_texts(split="train")  # evaluation reads only the held-out part
        ActivationCache.build(
            out / "activations", model, site, train_texts, args.tokens, ctx_len=CTX_LEN, refresh_batch_size=32
        )
        cache = ActivationCache(out / "activations", batch_size=args.batch_size, seed=0)
    cache_seconds = time.perf_counter() - start

    d = cache.config["d_submodule"]
    steps = max(1, cache.n_tokens // args.batch_size)  # one pass over the cached tokens
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
    dictionaries = [load_dictionary(out / "dictionaries" / f"trainer_{i}")[0] for i in range(len(configs))]
    evaluated = evaluate_all(model, site, dictionaries, args.eval_tokens, args.device)
    results = [
        {
            "trainer": f"trainer_{i}",
            "recipe": config["trainer"].__name__,
            "dictionary": type(ae).__name__,
            "setting": sparsity_setting(config),
            "model": lm_name,
            "site": site_name,
            **metrics,
        }
        for i, (config, ae, metrics) in enumerate(zip(configs, dictionaries, evaluated))
    ]
    eval_seconds = time.perf_counter() - start
    eval_tokens = results[0]["n_tokens"]
    start = time.perf_counter()
    probing = probe_all(model, site, dictionaries, results, args.probe_texts, cache.config)
    probe_seconds = time.perf_counter() - start

    (out / "results.json").write_text(
        json.dumps(
            {
                "model": lm_name,
                "site": site_name,
                "tokens": cache.n_tokens,
                "steps": steps,
                "batch_size": args.batch_size,
                "train_text": cache.config["text"],
                "eval_text": default_texts(split="held_out").record,
                "eval_tokens": eval_tokens,
                "seconds": {
                    "cache": cache_seconds,
                    "train": train_seconds,
                    "evaluate": eval_seconds,
                    "probe": probe_seconds,
                },
                "sparse_probing": probing,
                "results": results,
            },
            indent=2,
        )
    )
    plots = plot(results, out / "plots")

    print(
        f"\n{lm_name} {site_name}: {cache.n_tokens} training tokens (train part), {steps} steps; evaluated on "
        f"{eval_tokens} held-out tokens ({results[0]['n_sequences']} contexts); [95 % intervals]"
    )
    print_table(results)
    first = results[0]
    print(
        f"clean CE {first['ce_clean']:.3f}, zero-ablated CE {first['ce_zero']:.3f} "
        f"[{first['ce_zero_lo']:.3f}, {first['ce_zero_hi']:.3f}]; times: cache {cache_seconds:.0f} s, "
        f"training {train_seconds:.0f} s, evaluation {eval_seconds:.0f} s, probing {probe_seconds:.0f} s, "
        f"in all {time.perf_counter() - began:.0f} s"
    )
    print(
        f"sparse probing: {probing['data']['n_train']} training and {probing['data']['n_test']} test BBC articles, 5 "
        f"topics; the model's own activations: {probing['llm_test_accuracy']:.3f}; {probing['overlap']}"
    )
    print(f"wrote {out / 'results.json'}" + "".join(f", {p}" for p in plots))
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
