"""Demo: the replacement models circuit tracing needs, trained here and handed to circuit-tracer.

    python demos/circuit_tracing.py                       # SmolLM2-135M, offline, 2 CPU cores
    python demos/circuit_tracing.py --circuit-tracer-python .venv_ct/bin/python   # and the graphs

1. One buffer over every MLP of the model (`io="in_and_out"`, stacked `[B, L, 2, d]`) feeds, from
   the same batches (the buffer is read twice with one seed): a transcoder per layer (`--latents`
   each) and one cross-layer transcoder with as many latents per layer, both with k latents per layer
   and token, both TopK (`--recipe topk`, the default) or both BatchTopK (`--recipe batchtopk`: k
   on average, exported to circuit-tracer with the thresholds their training tracked);
2. evaluates each as a replacement of every MLP at once on held-out articles: each layer's variance
   explained, and the next-token loss with every MLP replaced (loss recovered against zeroing
   every MLP);
3. exports both to circuit-tracer (`export_circuit_tracer`; TopK thresholds calibrated on
   held-out activations, one per latent) and, given the circuit-tracer venv, builds an attribution graph for one
   prompt with each: replacement and completeness scores, and a picture of the CLT's graph;
4. writes results.json and prints a table with the time each step took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from demo_common import add_run_arguments, start_run
from safetensors.torch import save_file

from dictionary_learning import load_dictionary, trainSAE
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.circuit_export import export_circuit_tracer, read_mlp_pairs
from dictionary_learning.models import default_texts, get_submodule, num_layers
from dictionary_learning.nnsight_io import model_id, torch_model
from dictionary_learning.replacement import evaluate_replacement
from dictionary_learning.trainers import BatchTopKCLTTrainer, BatchTopKTrainer, TopKCLTTrainer, TopKTrainer

CTX_LEN = 128
RECIPES = {
    "topk": ("TopK", TopKTrainer, TopKCLTTrainer),
    "batchtopk": ("BatchTopK", BatchTopKTrainer, BatchTopKCLTTrainer),
}
PROMPT = "The capital of France is Paris, and the capital of Italy is"
SIDE_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "circuit_tracer_side.py"


def batches(model, layers: int, batch_size: int, n_ctxs: int):
    """Every MLP's input and output, `[B, L, 2, d]`, from the train part of the articles (seeded)."""
    mlps = [get_submodule(model, layer, "mlp") for layer in range(layers)]
    return ActivationBuffer(default_texts(split="train"), model, mlps, io="in_and_out", stack_sites=True, seed=0,
                            n_ctxs=n_ctxs, ctx_len=CTX_LEN, refresh_batch_size=32, out_batch_size=batch_size,
                            loop=True)  # fmt: skip


def per_layer(data, names: list[str]):
    """The stacked batches as `{site name: [B, 2, d]}`: what one transcoder per layer trains on."""
    for batch in data:
        yield {name: batch[:, i] for i, name in enumerate(names)}


def train_both(args, model, out: Path) -> tuple[list, object, dict]:
    layers, width = num_layers(model), torch_model(model).config.hidden_size
    names = [f"mlp_layer{layer}" for layer in range(layers)]
    _, per_layer_recipe, clt_recipe = RECIPES[args.recipe]
    common = dict(activation_dim=width, dict_size=args.latents, k=args.k, warmup_steps=max(1, args.steps // 20),
                  seed=0, lm_name=model_id(model), device=args.device)  # fmt: skip
    seconds = {}
    start = time.perf_counter()
    configs = [dict(trainer=per_layer_recipe, layer=layer, submodule_name=name, threshold_start_step=args.steps // 2,
                    **common) for layer, name in enumerate(names)]  # fmt: skip
    data = per_layer(batches(model, layers, args.batch_size, args.n_ctxs), names)
    transcoders = trainSAE(data, configs, args.steps, transcoder=True, save_dir=out / "per_layer", progress=True)
    seconds["train per-layer set"] = time.perf_counter() - start
    start = time.perf_counter()
    config = dict(trainer=clt_recipe, num_layers=layers, **common)
    if clt_recipe is BatchTopKCLTTrainer:
        config["threshold_start_step"] = args.steps // 2
    (clt,) = trainSAE(batches(model, layers, args.batch_size, args.n_ctxs), [config], args.steps,
                      save_dir=out / "clt", progress=True)  # fmt: skip
    seconds["train CLT"] = time.perf_counter() - start
    return transcoders, clt, seconds


def evaluate_both(args, model, dictionaries: dict) -> tuple[dict, dict]:
    results, seconds = {}, {}
    for name, d in dictionaries.items():
        start = time.perf_counter()
        texts = default_texts(split="held_out")
        results[name] = evaluate_replacement(model, d, texts, n_contexts=args.eval_contexts, ctx_len=CTX_LEN)
        seconds[f"evaluate {name}"] = time.perf_counter() - start
    return results, seconds


def export_both(args, model, dictionaries: dict, out: Path) -> tuple[dict, dict]:
    start = time.perf_counter()
    layers = list(range(num_layers(model)))
    held_out = read_mlp_pairs(model, layers, default_texts(split="held_out"), args.calibration_tokens, CTX_LEN)
    records = {}
    for name, d in dictionaries.items():
        records[name] = export_circuit_tracer(d, out / "circuit_tracer" / name, held_out, model_name=model_id(model))
    ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids[0].to(torch.int32)
    for name in dictionaries:
        save_file({"ids": ids}, str(out / "circuit_tracer" / f"{name}.safetensors"))
    return records, {"export both (calibration included)": time.perf_counter() - start}


def graphs(python: str, out: Path) -> tuple[dict, dict]:
    start = time.perf_counter()
    run = subprocess.run([python, str(SIDE_SCRIPT), "graph", str(out / "circuit_tracer")], capture_output=True,
                         text=True)  # fmt: skip
    if run.returncode != 0:
        raise SystemExit(f"circuit-tracer failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1]), {"graphs (both)": time.perf_counter() - start}


def draw(graph: dict, path: Path, title: str) -> None:
    """The pruned graph: tokens at the bottom, logits at the top, features and errors by layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"feature": "tab:blue", "error": "tab:gray", "token": "tab:green", "logit": "tab:red"}
    nodes = graph["nodes"]
    fig, ax = plt.subplots(figsize=(12, 8))
    counts: dict[tuple, int] = {}
    for _, layer, pos, _, _ in nodes:
        counts[(layer, pos)] = counts.get((layer, pos), 0) + 1
    seen: dict[tuple, int] = {}
    xy = []
    for _, layer, pos, _, _ in nodes:  # a cell's nodes side by side within its token's column
        slot = seen[(layer, pos)] = seen.get((layer, pos), -1) + 1
        xy.append((pos - 0.4 + 0.8 * (slot + 0.5) / counts[(layer, pos)], layer))
    strongest = max((abs(w) for _, _, w in graph["edges"]), default=1.0)
    for source, target, weight in graph["edges"]:
        (x0, y0), (x1, y1) = xy[source], xy[target]
        ax.plot([x0, x1], [y0, y1], color="tab:orange" if weight > 0 else "tab:purple",
                alpha=0.15 + 0.85 * abs(weight) / strongest, linewidth=0.5 + 2 * abs(weight) / strongest)  # fmt: skip
    for (kind, _, _, label, _), (x, y) in zip(nodes, xy):
        ax.scatter([x], [y], color=colours[kind], s=14, zorder=3)
        if kind == "logit" or (kind == "feature" and len(nodes) < 60):
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xticks(range(len(graph["tokens"])), graph["tokens"], rotation=45, fontsize=8)
    ax.set_ylabel("layer (tokens below, logits above)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict, scores: dict, seconds: dict, recipe: str = "TopK") -> str:
    lines = [f"{'replacement':28s} {'mean FVE':>8s} {'min FVE':>8s} {'CE clean':>8s} {'CE repl.':>8s} "
             f"{'recovered':>9s} {'KL':>6s} {'replacement':>11s} {'completeness':>12s}"]  # fmt: skip
    labels = (("per_layer", f"{recipe} transcoder per layer"), ("clt", f"{recipe} cross-layer transcoder"))
    for name, label in labels:
        r, s = results[name], scores.get(name, {})
        fve = r["fve"]
        graph = f"{s['replacement']:11.3f} {s['completeness']:12.3f}" if s else f"{'-':>11s} {'-':>12s}"
        lines.append(f"{label:28s} {sum(fve) / len(fve):8.3f} {min(fve):8.3f} {r['ce_clean']:8.3f} "
                     f"{r['ce_replaced']:8.3f} {r['frac_recovered']:9.3f} {r['kl_div']:6.3f} {graph}")  # fmt: skip
    lines += [f"  {name}: {value:.0f} s" for name, value in seconds.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "runs/circuit_tracing_demo")
    parser.add_argument("--latents", type=int, default=256, help="latents per layer, in both (default: 256)")
    parser.add_argument("--k", type=int, default=16, help="latents kept per layer and token (default: 16)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="topk", help="TopK or BatchTopK (default: topk)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each (default: 300)")
    parser.add_argument("--batch-size", type=int, default=512, help="tokens per step (default: 512)")
    parser.add_argument("--n-ctxs", type=int, default=64, help="contexts the buffer holds (default: 64)")
    parser.add_argument("--eval-contexts", type=int, default=32, help="held-out contexts evaluated (default: 32)")
    parser.add_argument("--calibration-tokens", type=int, default=8192, help="held-out tokens for the thresholds")
    parser.add_argument("--circuit-tracer-python", help="python of the circuit-tracer venv: also build the graphs")
    args = parser.parse_args(argv)
    out, model = start_run(parser, args)
    started = time.perf_counter()
    if (out / "clt" / "trainer_0" / "ae.pt").exists():  # a finished training, rerun for the rest
        transcoders = [load_dictionary(out / "per_layer" / f"trainer_{i}")[0] for i in range(num_layers(model))]
        clt, seconds = load_dictionary(out / "clt" / "trainer_0")[0], {}
    else:
        transcoders, clt, seconds = train_both(args, model, out)
    dictionaries = {"per_layer": transcoders, "clt": clt}
    results, timing = evaluate_both(args, model, dictionaries)
    records, export_time = export_both(args, model, dictionaries, out)
    scores = {}
    seconds |= timing | export_time
    if args.circuit_tracer_python:
        scores, graph_time = graphs(args.circuit_tracer_python, out)
        seconds |= graph_time
        draw(scores["clt"], out / "clt_graph.png", f"SmolLM2-135M, CLT: {PROMPT!r}")
    seconds["total"] = time.perf_counter() - started
    calibration = {name: r["dictionary_learning"].get("calibration") for name, r in records.items()}
    summary = {"args": vars(args), "results": results, "scores": scores, "seconds": seconds, "calibration": calibration}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{model_id(model)}: {args.steps} steps of {args.batch_size} tokens, {args.latents} latents per layer, "
          f"k={args.k}; {results['clt']['n_tokens']} held-out tokens\n"
          f"{table(results, scores, seconds, RECIPES[args.recipe][0])}")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
