"""Training-step speed: our trainers against the reference package's and SAELens's, same activations.

    python benchmarks/train_step.py --reference-python /path/to/venv_dl/bin/python \\
        --saelens-python /path/to/venv_sl/bin/python

Writes one file of activations (SmolLM2 activations from an `ActivationCache` folder with
`--activations`, synthetic planted-feature activations otherwise), then times each trainer in its own
process for each implementation: ours (this checkout), the reference (`dictionary-learning==0.1.0`
in its venv) and SAELens (`sae-lens` in its venv; the step of its `SAETrainer._train_step`:
training forward pass, firing statistics, backward, clipping, Adam). Each process runs
`--warmup` steps, then times `--steps` steps on the same batches, and reports seconds per step,
tokens/s and peak memory (CUDA: `max_memory_allocated`; CPU: growth of the peak resident set
after the data and the trainer exist). Prints one table with the ratios reference/ours and
SAELens/ours (> 1: ours is faster). `--dense` adds ours with `sparse=False`; `--triton` adds ours with
the Triton kernels of the sparse backward (`DICTIONARY_LEARNING_TRITON=1`; CUDA only). `--repeat R`
times every implementation R times, alternating between them, and keeps each one's fastest process:
on shared machines, whose speed drifts by 10-30 % over minutes, single runs give unsteady ratios.

`--run N` trains instead: every implementation (ours, ours with `sparse=False`, the reference) trains
each trainer for N steps of `--run-batch` rows from initialisation on the same batches, and the table
shows the mean seconds per step of the whole run (the L1/JumpReLU recipes start dense, at about half
of their features firing, and take the sparse path only in the steps where fewer than 12 % fire),
then variance explained and L0 on `--batch` held-out rows: the sparse-vs-dense quality check. The
activations are scaled to unit mean squared norm first (as `trainSAE(normalize_activations=True)`
does), so that the L1 penalties mean what they mean in the demo.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TRAINERS = [
    "TopKTrainer",
    "BatchTopKTrainer",
    "MatryoshkaBatchTopKTrainer",
    "StandardTrainer",
    "StandardTrainerAprilUpdate",
    "GatedSAETrainer",
    "JumpReluTrainer",
    "PAnnealTrainer",
    "GatedAnnealTrainer",
]
# Beyond SAEs (ours only: the reference has neither; SAELens 6.54 loads transcoders but has no
# training class for them): the recipe and its options. Their batches are [B, 2, D] pairs: the
# activations and a fixed random linear map of them (a transcoder's input and output, or a
# crosscoder's two sites).
BEYOND_SAES = {
    "TopKTranscoder": ("TopKTrainer", {"transcoder": True}),
    "TopKSkipTranscoder": ("TopKTrainer", {"transcoder": True, "skip_connection": True}),
    "BatchTopKCrossCoder": ("BatchTopKCrossCoderTrainer", {"num_layers": 2}),
    "CrossCoder": ("CrossCoderTrainer", {"num_layers": 2}),
}
# SAELens's training SAE class for each of our trainers (those it has).
SAELENS = {
    "TopKTrainer": "TopK",
    "BatchTopKTrainer": "BatchTopK",
    "MatryoshkaBatchTopKTrainer": "MatryoshkaBatchTopK",
    "StandardTrainer": "Standard",
    "GatedSAETrainer": "Gated",
    "JumpReluTrainer": "JumpReLU",
}


# ------------------------------------------------------------------------------------------ workers
def _config(classes: dict, name: str, a: argparse.Namespace, steps: int) -> dict:
    """The same keyword arguments for our package and the reference (its required ones included)."""
    common = dict(
        steps=steps,
        activation_dim=a.dim,
        dict_size=a.dict_size,
        layer=0,
        lm_name="bench",
        device=a.device,
        seed=0,
        warmup_steps=min(10, steps - 1),
    )
    topk = dict(common, k=a.k, threshold_start_step=1)
    penalised = dict(common, sparsity_warmup_steps=min(10, steps - 1), lr=a.lr)
    anneal = dict(penalised, anneal_start=steps // 2, p_end=0.5)
    if name in BEYOND_SAES:
        recipe, options = BEYOND_SAES[name]
        base = topk if "TopK" in recipe else dict(penalised, l1_penalty=a.l1_penalty)
        return dict(base, **options, trainer=classes[recipe])
    extra = {
        "TopKTrainer": topk,
        "BatchTopKTrainer": topk,
        "MatryoshkaBatchTopKTrainer": dict(topk, group_fractions=[0.125, 0.125, 0.25, 0.5]),
        "StandardTrainer": dict(penalised, l1_penalty=a.l1_penalty),
        "StandardTrainerAprilUpdate": dict(penalised, l1_penalty=a.l1_penalty),
        "GatedSAETrainer": dict(penalised, l1_penalty=a.l1_penalty),
        "JumpReluTrainer": dict(penalised, target_l0=a.k),
        # p_end 0.5 as in the demo: the reference's default p_end=0 with "Lp" divides by zero
        "PAnnealTrainer": dict(anneal, initial_sparsity_penalty=a.l1_penalty),
        "GatedAnnealTrainer": dict(anneal, initial_sparsity_penalty=a.l1_penalty),
    }[name]
    if a.run and name in TRAINERS[:3]:
        extra["threshold_start_step"] = steps // 2
    return dict(extra, trainer=classes[name])


def _trainer_classes(impl: str) -> dict:
    if impl == "reference":
        import dictionary_learning.trainers as mod
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
        from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate

        return {name: getattr(mod, name, None) for name in dir(mod)} | {
            "MatryoshkaBatchTopKTrainer": MatryoshkaBatchTopKTrainer,
            "StandardTrainerAprilUpdate": StandardTrainerAprilUpdate,
        }
    sys.path.insert(0, str(REPO))
    from dictionary_learning import TRAINER_REGISTRY

    return TRAINER_REGISTRY


def _saelens_step_fn(name: str, a: argparse.Namespace):
    """SAELens's training SAE for `name` and one step of its SAETrainer, written out."""
    import sae_lens
    from sae_lens.saes.sae import TrainStepInput

    kind = SAELENS[name]
    cfg_cls = getattr(sae_lens, f"{kind}TrainingSAEConfig")
    sae_cls = getattr(sae_lens, f"{kind}TrainingSAE")
    kwargs = dict(d_in=a.dim, d_sae=a.dict_size, dtype="float32", device=a.device)
    if "TopK" in kind:
        kwargs["k"] = a.k
    if kind == "MatryoshkaBatchTopK":
        kwargs["matryoshka_widths"] = [a.dict_size // 8, a.dict_size // 4, a.dict_size // 2, a.dict_size]
    sae = sae_cls(cfg_cls(**kwargs))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    coefficients = {key: (c.value if hasattr(c, "value") else c) for key, c in sae.get_coefficients().items()}
    since_fired = torch.zeros(a.dict_size, device=a.device)

    def step(i: int, x: torch.Tensor) -> None:
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients=coefficients,
                dead_neuron_mask=(since_fired > 1000).bool(),
                n_training_steps=i,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            fired = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step, sae


# The parameter that sets how many features fire, by implementation: biases raise L0, thresholds lower it.
DENSITY_PARAMS = {
    "encoder.bias": 1.0,  # AutoEncoder (ours, reference)
    "gate_bias": 1.0,  # GatedAutoEncoder
    "threshold": -1.0,  # JumpReluAutoEncoder
    "b_gate": 1.0,  # SAELens gated
    "log_threshold": -1.0,  # SAELens JumpReLU
    "b_enc": 1.0,  # SAELens standard
}


@torch.no_grad()
def set_l0(module: torch.nn.Module, x: torch.Tensor, target: float) -> float:
    """Shift one bias (or threshold) of an untrained dictionary so that its mean L0 on `x` is `target`,
    as after training; returns the L0 reached. Bisection on the shift."""
    params = dict(module.named_parameters())
    name = next(n for n in DENSITY_PARAMS if n in params)
    param, sign = params[name], DENSITY_PARAMS[name]
    base = param.detach().clone()

    def l0(c: float) -> float:
        param.copy_(base + sign * c)
        return float((module.encode(x) != 0).float().sum(-1).mean())

    lo, hi = -1.0, 1.0
    while l0(lo) > target:
        lo *= 2
    while l0(hi) < target:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if l0(mid) < target else (lo, mid)
    return l0(hi)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(a: argparse.Namespace) -> dict:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    torch.set_num_threads(a.threads or torch.get_num_threads())
    x_all = load_file(a.data)["x"]
    if a.run:  # the first --batch rows are held out; unit mean squared norm, as normalize_activations=True
        x_all = x_all / x_all[a.batch :].norm(dim=-1).pow(2).mean().sqrt()
        held_out = x_all[: a.batch].to(a.device)
        batches = [b.to(a.device) for b in x_all[a.batch :].split(a.run_batch)]
        warmup, total = 0, a.run
    else:
        batches = [b.to(a.device) for b in x_all.split(a.batch)]
        warmup, total = a.warmup, a.warmup + a.steps
    if a.trainer in BEYOND_SAES:  # [B, 2, D]: the activations and a fixed linear map of them
        M = torch.randn(a.dim, a.dim, generator=torch.Generator().manual_seed(1)) / a.dim**0.5
        batches = [torch.stack([b, b @ M.to(b.device)], dim=1) for b in batches]
    if a.impl == "saelens":
        step, module = _saelens_step_fn(a.trainer, a)
    else:
        cfg = _config(_trainer_classes(a.impl), a.trainer, a, steps=a.run or total + 1)
        cls = cfg.pop("trainer")
        if a.impl == "ours" and a.dense:
            cfg["sparse"] = False
        trainer = cls(**cfg)
        step, module = trainer.update, trainer.ae
    # TopK-family dictionaries fire k per row by construction; --l0 sets the others'.
    l0 = set_l0(module, batches[0][:1024], a.l0) if a.l0 and a.trainer in TRAINERS[3:] else None
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base_rss = _peak_rss_bytes()
    for i in range(warmup):
        step(i, batches[i % len(batches)])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for i in range(warmup, total):
        step(i, batches[i % len(batches)])
    sync()
    seconds = (time.perf_counter() - start) / (total - warmup)
    peak = torch.cuda.max_memory_allocated() - base_mem if cuda else _peak_rss_bytes() - base_rss
    out = {"trainer": a.trainer, "impl": a.impl, "s_per_step": seconds, "peak_bytes": peak, "l0": l0}
    if a.run:
        with torch.no_grad():
            x_hat, f = module(held_out, output_features=True)
        out["fve"] = float(1 - (held_out - x_hat).var(0).sum() / held_out.var(0).sum())
        out["l0"] = float((f != 0).float().sum(-1).mean())
    return out


# ------------------------------------------------------------------------------------------- parent
def write_activations(a: argparse.Namespace, path: Path) -> str:
    n = a.batch * a.n_batches
    if a.activations:
        sys.path.insert(0, str(REPO))
        from dictionary_learning.cache import ActivationCache

        cache = ActivationCache(a.activations, batch_size=n, dtype=torch.float32, sites=None)
        x = next(iter(cache))
        x = next(iter(x.values())) if isinstance(x, dict) else x
        if x.shape[0] < n or x.shape[1] != a.dim:
            raise SystemExit(f"{a.activations}: need {n} rows of width {a.dim}, found {tuple(x.shape)}")
        source = f"activations from {a.activations}"
    else:
        sys.path.insert(0, str(REPO))
        from dictionary_learning.synthetic import PlantedFeatures

        x = torch.cat(list(PlantedFeatures(d=a.dim, n_features=2 * a.dim).batches(a.n_batches, a.batch, seed=0)))
        source = "synthetic planted-feature activations"
    from safetensors.torch import save_file

    save_file({"x": x.contiguous()}, str(path))
    return source


def run_worker(
    python: str, a: argparse.Namespace, impl: str, trainer: str, data: Path, dense=False, triton=False
) -> dict | None:
    cmd = [python, str(Path(__file__).resolve()), "--worker", "--impl", impl, "--trainer", trainer, "--data", str(data)]
    keys = ("batch", "dim", "dict_size", "k", "steps", "warmup", "device", "threads", "l0", "lr", "l1_penalty")
    for key in keys + ("run", "run_batch"):
        value = getattr(a, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    if dense:
        cmd.append("--dense")
    env = dict(os.environ, DICTIONARY_LEARNING_TRITON="1" if triton else "0")
    # Away from the repository, whose dictionary_learning must not shadow the reference package.
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env)
    if out.returncode != 0:
        print(f"  {impl} {trainer} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-python", help="python of a venv with dictionary-learning==0.1.0")
    p.add_argument("--saelens-python", help="python of a venv with sae-lens")
    p.add_argument("--activations", help="an ActivationCache folder (default: synthetic activations)")
    p.add_argument(
        "--trainers",
        default=",".join(TRAINERS + list(BEYOND_SAES)),
        help=f"comma-separated trainer names, and {', '.join(BEYOND_SAES)} (ours only)",
    )
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--dict-size", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n-batches", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch threads in every process (default: torch's)")
    p.add_argument("--dense", action="store_true", help="also time our trainers with sparse=False")
    p.add_argument(
        "--triton", action="store_true", help="also time ours with the Triton kernels (DICTIONARY_LEARNING_TRITON=1)"
    )
    p.add_argument(
        "--l0",
        type=float,
        help="time the L1/JumpReLU recipes at this mean L0 (a bias or threshold of every implementation's "
        "untrained dictionary is shifted until its features fire this often, as after training); "
        "default: as initialised (about half of the features fire)",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the L1/JumpReLU recipes")
    p.add_argument("--l1-penalty", type=float, default=0.1, help="L1 coefficient of Standard, Gated and p-anneal")
    p.add_argument(
        "--run",
        type=int,
        default=0,
        help="train every implementation this many steps from initialisation (ours, ours dense, reference), "
        "then report the mean step time of the run and variance explained and L0 on held-out rows",
    )
    p.add_argument("--run-batch", type=int, default=1024, help="rows per step in --run")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time every implementation this many times, alternating, and report each one's fastest "
        "(steadier ratios on a noisy machine; not with --run)",
    )
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--trainer", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.repeat < 1 or (a.run and a.repeat > 1):
        p.error("--repeat must be >= 1, and 1 with --run (a run is measured once)")
    if a.run:  # the quality check compares SAEs on held-out rows
        a.trainers = ",".join(t for t in a.trainers.split(",") if t not in BEYOND_SAES)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "acts.safetensors"
        source = write_activations(a, data)
        pythons = {"ours": sys.executable}
        if a.reference_python:
            pythons["reference"] = str(Path(a.reference_python).absolute())
        if a.saelens_python:
            pythons["saelens"] = str(Path(a.saelens_python).absolute())
        if a.run:
            what = f"{a.run} training steps of {a.run_batch} rows from initialisation, {a.batch} rows held out"
            a.dense = True
        else:
            what = f"B={a.batch}, {a.steps} timed steps after {a.warmup} warm-up, fastest of {a.repeat} process(es)"
        print(
            f"{what}; D={a.dim} F={a.dict_size} k={a.k}, lr {a.lr} and L1 {a.l1_penalty} (L1/JumpReLU recipes), "
            f"device {a.device}, {source}; torch threads {a.threads or torch.get_num_threads()}, cpus {os.cpu_count()}"
        )
        for trainer in a.trainers.split(","):
            # (column, python, implementation, ours with sparse=False, ours with the Triton kernels)
            variants = [
                (impl, python, impl, False, False)
                for impl, python in pythons.items()
                # in --run SAELens would train with its own hyperparameters
                if not (impl == "saelens" and (trainer not in SAELENS or a.run))
                and not (impl != "ours" and trainer in BEYOND_SAES)
            ]
            variants += [("dense", sys.executable, "ours", True, False)] if a.dense else []
            variants += [("triton", sys.executable, "ours", False, True)] if a.triton else []
            results: dict[str, list[dict]] = {column: [] for column, *_ in variants}
            for _ in range(a.repeat):  # alternating, so that a slow spell of the machine hits every column
                for column, python, impl, dense, triton in variants:
                    if (r := run_worker(python, a, impl, trainer, data, dense, triton)) is not None:
                        results[column].append(r)
            row = {"trainer": trainer}
            row |= {c: min(rs, key=lambda r: r["s_per_step"]) if rs else None for c, rs in results.items()}
            _print_row(row, a.run_batch if a.run else a.batch)


def _print_row(row: dict, batch: int) -> None:
    def fmt(r):
        if r is None:
            return "       -"
        text = f"{r['s_per_step']:8.3f}"
        if r.get("fve") is not None:
            text += f" (FVE {r['fve']:.4f}, L0 {r['l0']:.1f})"
        elif r.get("l0") is not None:
            text += f" (L0 {r['l0']:.0f})"
        return text

    ours = row.get("ours")
    parts = [f"{row['trainer']:28s}", f"ours {fmt(ours)} s/step"]
    if ours:
        parts.append(f"{batch / ours['s_per_step']:9.0f} tok/s  peak {ours['peak_bytes'] / 2**20:7.0f} MiB")
    for impl in ("dense", "triton", "reference", "saelens"):
        if impl in row:
            r = row[impl]
            ratio = f"x{r['s_per_step'] / ours['s_per_step']:.2f}" if r and ours else ""
            mem = f" {r['peak_bytes'] / 2**20:6.0f} MiB" if r else ""
            parts.append(f"| {impl} {fmt(r)}{mem} {ratio}")
    dense = row.get("dense")
    if ours and dense and ours.get("fve") is not None:
        parts.append(
            f"| sparse-dense |dFVE| {abs(ours['fve'] - dense['fve']):.4f} |dL0| {abs(ours['l0'] - dense['l0']):.1f}"
        )
    print("  ".join(parts), flush=True)


if __name__ == "__main__":
    main()
