"""Local vs end-to-end TopK dictionaries on SmolLM2-135M, same tokens, same k, same budget.

    .venv/bin/python benchmarks/e2e_vs_local.py --device cuda --steps 600      # ~10 min on one H100
    .venv/bin/python benchmarks/e2e_vs_local.py --steps 20 --batch-texts 4    # a CPU smoke run

Every variant trains a TopK dictionary at the same site from the same initialisation on the same
token batches (BBC News articles cut into `--ctx-len`-token chunks, in a fixed order):

    local        the usual reconstruction loss at the site
    e2e          KL(clean || spliced) on the next-token distributions only (Braun et al. 2024)
    e2e+ds       KL plus MSE at the residual outputs of the next layers (`--downstream`), each
                 weighted by 1 / its clean variance (a fraction of variance unexplained)

and is evaluated on held-out chunks: variance explained at the site, L0, CE loss recovered and
KL with the dictionary spliced in. Results go to `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from dictionary_learning import trainSAE
from dictionary_learning.e2e import E2EObjective, TokenBatches
from dictionary_learning.evaluation import evaluate
from dictionary_learning.models import default_texts, get_submodule, load_default_model, load_model
from dictionary_learning.reader import ActivationReader


def chunks(tokenizer, texts, ctx_len):
    """Every article cut into consecutive `ctx_len`-token windows (the last partial one dropped)."""
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - ctx_len + 1, ctx_len):
            yield ids[start : start + ctx_len]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local model folder (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--site", default="resid", choices=["resid", "mlp", "attn"])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=8, help="dict_size = expansion x d_model")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-texts", type=int, default=32, help="chunks per step")
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="default: the TopK rule (3.8e-4 at F=4608)")
    parser.add_argument("--downstream", type=int, default=2, help="residual outputs of this many later layers")
    parser.add_argument("--variants", nargs="+", default=["local", "e2e", "e2e+ds"])
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/e2e_vs_local")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model, device=args.device) if args.model else load_default_model(device=args.device)
    site = get_submodule(model, args.layer, args.site)
    texts = list(default_texts())
    held_out_texts, train_texts = texts[::10], [t for i, t in enumerate(texts) if i % 10]
    train = list(chunks(model.tokenizer, train_texts, args.ctx_len))
    held_out = list(chunks(model.tokenizer, held_out_texts, args.ctx_len))
    n_train = args.steps * args.batch_texts
    print(
        f"{len(train)} training chunks ({n_train / len(train):.2f} epochs over them), {len(held_out)} held-out; "
        f"{n_train * args.ctx_len} training tokens per variant",
        flush=True,
    )

    d_model = E2EObjective(model, site, kl_weight=0.0, local_weight=1.0).activation_dim
    config = dict(
        trainer="TopKTrainer",
        activation_dim=d_model,
        dict_size=args.expansion * d_model,
        k=args.k,
        lr=args.lr,
        warmup_steps=max(1, args.steps // 20),
        threshold_start_step=args.steps // 2,
        seed=0,
        device=args.device,
        layer=args.layer,
        lm_name="SmolLM2-135M-Instruct",
    )
    downstream = [get_submodule(model, args.layer + i, "resid") for i in range(1, args.downstream + 1)]
    # Each downstream MSE is weighted by 1 / (its clean activations' total variance), so that it starts
    # near 1 like the KL term: a fraction of variance unexplained rather than raw squared norms.
    probe = E2EObjective(model, site, kl_weight=0.0, downstream=downstream)
    batch = probe.prepare(next(TokenBatches(iter(train), model, batch_size=args.batch_texts, ctx_len=args.ctx_len)))
    ds_weights = {name: 1.0 / float(a.float().var(0).sum()) for name, a in batch.downstream.items()}
    objectives = {
        "local": E2EObjective(model, site, kl_weight=0.0, local_weight=1.0),
        "e2e": E2EObjective(model, site, kl_weight=1.0),
        "e2e+ds": E2EObjective(model, site, kl_weight=1.0, downstream=ds_weights),
    }
    out = Path(args.out)
    results = {}
    for name in args.variants:
        data = TokenBatches(itertools.cycle(train), model, batch_size=args.batch_texts, ctx_len=args.ctx_len)
        start = time.perf_counter()
        ae = trainSAE(
            data,
            [config],
            args.steps,
            e2e=objectives[name],
            save_dir=out / name.replace("+", "_"),
            log_steps=max(1, args.steps // 10),
            progress=False,
            verbose=True,
            overwrite=True,
        )[0]
        train_s = time.perf_counter() - start
        reader = ActivationReader(iter(held_out), model, site, ctx_len=args.ctx_len)
        metrics = evaluate(
            ae,
            reader,
            max_len=args.ctx_len,
            batch_size=args.batch_texts,
            n_batches=args.eval_batches,
            device=args.device,
        )
        results[name] = metrics | {"train_seconds": train_s, "objective": objectives[name].config}
        print(f"{name}: {json.dumps({k: round(v, 4) for k, v in metrics.items()})} ({train_s:.0f} s)", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(
        f"\nSmolLM2-135M {args.site} layer {args.layer}, TopK k={args.k}, F={config['dict_size']}, "
        f"{args.steps} steps x {args.batch_texts * args.ctx_len} tokens"
    )
    print(f"{'variant':8s} {'L0':>6s} {'FVE':>7s} {'CE rec.':>8s} {'CE spliced':>11s} {'KL':>8s}")
    for name, m in results.items():
        print(
            f"{name:8s} {m['l0']:6.1f} {m['frac_variance_explained']:7.3f} {m['frac_recovered']:8.3f} "
            f"{m['loss_reconstructed']:11.3f} {m['kl_div']:8.4f}"
        )
    first = next(iter(results.values()))
    print(f"clean CE {first['loss_original']:.3f}, zero-ablated CE {first['loss_zero']:.3f}")


if __name__ == "__main__":
    main()
