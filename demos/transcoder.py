"""Demo: transcoders, a skip transcoder and a crosscoder beside plain SAEs at the same L0.

    python demos/transcoder.py                 # SmolLM2-135M, offline, about 15 minutes on 2 CPU cores

1. MLP of layer 3: one cache of its input and output (`io="in_and_out"`); from the same batches
   trains a TopK transcoder (input -> output), a TopK skip transcoder (plus `x @ W_skip`) and a TopK
   SAE on the output, all with the same k;
2. residual stream after layers 3 and 4: one cache of both sites; trains a BatchTopK crosscoder on
   the stacked `[B, 2, d]` rows and a BatchTopK SAE on each layer, with the same k;
3. evaluates each on held-out articles (training reads only the train part): variance explained of
   what it reconstructs (a transcoder's: the MLP output), L0, and the next-token loss recovered when
   it replaces its site (a transcoder replaces the MLP's output from the MLP's input; the crosscoder
   is spliced in at each layer in turn);
4. writes results.json and plots/transcoders.png, and prints a table.
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
from dictionary_learning.evaluation import evaluate
from dictionary_learning.models import default_texts, get_submodule
from dictionary_learning.nnsight_io import model_id
from dictionary_learning.reader import ActivationReader
from dictionary_learning.trainers import BatchTopKCrossCoderTrainer, BatchTopKTrainer, TopKTrainer

CTX_LEN, EVAL_BATCH = 128, 32


def cached(folder: Path, model, sites, tokens: int, batch_size: int, **kwargs) -> ActivationCache:
    """The activation cache in `folder`, built from the train part of the articles when missing."""
    try:
        return ActivationCache(folder, batch_size=batch_size, seed=0, **kwargs)
    except CacheError:
        io = "in_and_out" if not isinstance(sites, list) else "out"
        ActivationCache.build(folder, model, sites, default_texts(split="train"), tokens, io=io, ctx_len=CTX_LEN,
                              refresh_batch_size=32)  # fmt: skip
        return ActivationCache(folder, batch_size=batch_size, seed=0, **kwargs)


def outputs_only(cache):
    """The MLP's output half of the cached `[B, 2, d]` rows: what the plain SAE trains on."""
    for batch in cache:
        yield batch[:, 1]


def one_site(cache, site: int):
    for batch in cache:
        yield batch[:, site]


def train(data, configs: list[dict], steps: int, folder: Path, **kwargs) -> list:
    trainSAE(data, configs, steps, save_dir=folder, normalize_activations=True, log_steps=max(1, steps // 10),
             overwrite=True, **kwargs)  # fmt: skip
    return [load_dictionary(folder / f"trainer_{i}")[0] for i in range(len(configs))]


def evaluate_on(model, site, ae, io: str, eval_tokens: int, device: str) -> dict:
    reader = ActivationReader(default_texts(split="held_out"), model, site, io=io, ctx_len=CTX_LEN)
    n_batches = max(1, eval_tokens // (EVAL_BATCH * CTX_LEN))
    return evaluate(ae, reader, max_len=CTX_LEN, batch_size=EVAL_BATCH, n_batches=n_batches, device=device)


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["name"] for r in rows]
    colors = ["tab:blue" if "SAE" in n else "tab:orange" for n in names]
    for ax, key, label in ((axes[0], "fve", "fraction of variance explained"),
                           (axes[1], "recovered", "fraction of next-token loss recovered")):  # fmt: skip
        ax.barh(range(len(rows)), [r[key] for r in rows], color=colors)
        ax.set_yticks(range(len(rows)), [f"{n} (L0 {r['l0']:.0f})" for n, r in zip(names, rows)], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        for i, r in enumerate(rows):
            ax.text(r[key], i, f" {r[key]:.3f}", va="center", fontsize=8)
    fig.suptitle(f"{rows[0]['model']}: transcoders and a crosscoder against plain SAEs (orange: ours beyond SAEs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=3, help="the MLP's layer (the crosscoder reads it and the next)")
    parser.add_argument("--dict-size", type=int, default=None, help="latents per dictionary (default 4 x width)")
    parser.add_argument("--tokens", type=int, default=409_600, help="training tokens per cache")
    parser.add_argument("--batch-size", type=int, default=2048, help="activations per training step")
    parser.add_argument("--k", type=int, default=32, help="active latents per token of every dictionary")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens to evaluate on")
    add_run_arguments(parser, "runs/transcoder_demo")
    args = parser.parse_args(argv)
    out, model = start_run(parser, args)
    lm_name, layer = model_id(model), args.layer
    mlp = get_submodule(model, layer, "mlp")
    resid = [get_submodule(model, layer, "resid"), get_submodule(model, layer + 1, "resid")]
    times = {}

    start = time.perf_counter()
    mlp_cache = cached(out / "mlp_cache", model, mlp, args.tokens, args.batch_size)
    resid_cache = cached(out / "resid_cache", model, resid, args.tokens, args.batch_size, stack_sites=True)
    times["caches"] = time.perf_counter() - start
    d = mlp_cache.config["d_submodule"]
    steps = mlp_cache.n_tokens // args.batch_size
    common = dict(activation_dim=d, dict_size=args.dict_size or 4 * d, k=args.k, warmup_steps=max(1, steps // 20),
                  threshold_start_step=max(1, steps // 10), seed=0, lm_name=lm_name, device=args.device)  # fmt: skip

    start = time.perf_counter()
    plain_tc, skip_tc = train(mlp_cache, [dict(trainer=TopKTrainer, layer=layer, **common),
                                          dict(trainer=TopKTrainer, layer=layer, skip_connection=True, **common)],
                              steps, out / "transcoders", transcoder=True)  # fmt: skip
    (mlp_sae,) = train(outputs_only(mlp_cache), [dict(trainer=TopKTrainer, layer=layer, **common)], steps,
                       out / "mlp_sae")  # fmt: skip
    (crosscoder,) = train(resid_cache, [dict(trainer=BatchTopKCrossCoderTrainer, num_layers=2, **common)], steps,
                          out / "crosscoder")  # fmt: skip
    layer_saes = [
        train(one_site(resid_cache, i), [dict(trainer=BatchTopKTrainer, layer=layer + i, **common)], steps,
              out / f"resid_sae_{layer + i}")[0]
        for i in range(2)
    ]  # fmt: skip
    times["training"] = time.perf_counter() - start

    start = time.perf_counter()
    evals = [
        (f"TopK SAE, MLP {layer} output", mlp_sae, mlp, "out", None),
        (f"TopK transcoder, MLP {layer}", plain_tc, mlp, "in_to_out", None),
        (f"TopK skip transcoder, MLP {layer}", skip_tc, mlp, "in_to_out", None),
        *[(f"BatchTopK SAE, resid {layer + i}", sae, resid[i], "out", None) for i, sae in enumerate(layer_saes)],
        *[(f"BatchTopK crosscoder, resid {layer + i}", crosscoder, resid, "out", i) for i in range(2)],
    ]
    rows, crosscoder_metrics = [], None
    for name, ae, site, io, crosscoder_site in evals:
        if crosscoder_site is None:
            m = evaluate_on(model, site, ae, io, args.eval_tokens, args.device)
            fve, recovered, clean, ce = (m["frac_variance_explained"], m["frac_recovered"], m["loss_original"],
                                         m["loss_reconstructed"])  # fmt: skip
        else:
            crosscoder_metrics = crosscoder_metrics or evaluate_on(model, site, ae, io, args.eval_tokens, args.device)
            m, s = crosscoder_metrics, f"_site_{crosscoder_site}"
            fve, recovered = m[f"frac_variance_explained{s}"], m[f"frac_recovered{s}"]
            clean, ce = m[f"loss_original{s}"], m[f"loss_reconstructed{s}"]
        rows.append({"name": name, "model": lm_name, "l0": m["l0"], "fve": fve, "recovered": recovered,
                     "ce_clean": clean, "ce_spliced": ce, "frac_alive": m["frac_alive"]})  # fmt: skip
    times["evaluation"] = time.perf_counter() - start

    record = {
        "model": lm_name,
        "layer": layer,
        "k": args.k,
        "tokens": mlp_cache.n_tokens,
        "steps": steps,
        "batch_size": args.batch_size,
        "eval_tokens": args.eval_tokens,
        "seconds": times,
        "results": rows,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2))
    figure = plot(rows, out / "plots" / "transcoders.png")
    print(
        f"\n{lm_name}: {mlp_cache.n_tokens} training tokens per cache, {steps} steps of {args.batch_size}, "
        f"k={args.k}; {args.eval_tokens} held-out tokens"
    )
    print(f"{'dictionary':36s} {'L0':>6s} {'FVE':>7s} {'loss recovered':>15s} {'clean CE':>9s} {'spliced CE':>11s}")
    for r in rows:
        print(f"{r['name']:36s} {r['l0']:6.1f} {r['fve']:7.3f} {r['recovered']:15.3f} {r['ce_clean']:9.3f} "
              f"{r['ce_spliced']:11.3f}")  # fmt: skip
    print("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"wrote {out / 'results.json'}" + (f", {figure}" if figure else ""))
    return rows


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
