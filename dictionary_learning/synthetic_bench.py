"""Recipes judged against ground truth: train chosen recipes on a synthetic model (`synthetic.
SyntheticModel`), several seeds each, score them with `ground_truth.ground_truth_metrics`, and, when
a venv with SAELens is given, train SAELens's own recipes of the same architectures on the same
batches with the same width, k, learning rate and steps (`tools/saelens_synthetic.py`) and score
them the same way. The command line's `synthetic` runs it."""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .ground_truth import ground_truth_metrics
from .synthetic import SyntheticModel, stream_generator

# Our recipe -> SAELens's training architecture of the same dictionary.
SAELENS_ARCHITECTURES = {
    "TopKTrainer": "topk",
    "BatchTopKTrainer": "batchtopk",
    "MatryoshkaBatchTopKTrainer": "matryoshka_batchtopk",
    "AbsTopKTrainer": "abstopk",
    "MatchingPursuitTrainer": "matching_pursuit",  # stopped after exactly k steps, as ours
}
MATRYOSHKA_FRACTIONS = [0.25, 0.25, 0.5]  # both libraries' groups: widths F/4, F/2, F
METRICS = ("mcc", "f1", "shrinkage", "fve", "l0", "dead")
# Options a variant may not set: the run sets them for every recipe alike.
RUN_OWNED = {"seed": "--seeds", "steps": "--steps", "activation_dim": "--d", "device": "the CPU"}


@dataclass(frozen=True)
class SyntheticRun:
    """What one comparison trains: the model, the stream, and every recipe's shared settings."""

    recipes: tuple[Recipe, ...] = ("TopKTrainer", "BatchTopKTrainer", "MatryoshkaBatchTopKTrainer")
    seeds: int = 3
    steps: int = 1500
    batch_size: int = 1024
    n_features: int = 1024
    d: int = 128
    mean_l0: float = 16.0
    dict_size: int = 1024
    k: int = 16
    lr: float = 3e-4
    eval_samples: int = 20_000

    def model(self) -> SyntheticModel:
        return SyntheticModel(n_features=self.n_features, d=self.d, mean_l0=self.mean_l0, seed=0)

    def config(self, recipe: Recipe, seed: int) -> dict[str, Any]:
        """Our trainer config for `recipe` (k-based recipes at k, JumpReLU at target L0 = k), with the
        options a variant sets over these."""
        from .trainers import TRAINER_REGISTRY

        recipe, options = recipe_parts(recipe)
        config: dict[str, Any] = dict(trainer=TRAINER_REGISTRY[recipe], activation_dim=self.d, dict_size=self.dict_size,
                                      lr=self.lr, seed=seed, device="cpu")  # fmt: skip
        fields = TRAINER_REGISTRY[recipe].config_keys()
        if "k" in fields:
            config["k"] = self.k
        if "target_l0" in fields:
            config["target_l0"] = float(self.k)
        if "group_fractions" in fields:
            config["group_fractions"] = MATRYOSHKA_FRACTIONS
        TRAINER_REGISTRY[recipe].Config.check(recipe, options)
        owned = sorted(set(options) & set(RUN_OWNED))
        if owned:
            raise ValueError(f"{recipe}: {owned[0]} is the run's, the same for every recipe ({RUN_OWNED[owned[0]]})")
        return config | options  # a variant's k, lr or width take precedence over the run's


Recipe = str | tuple[str, dict[str, Any]]  # a registered trainer, or one with config options: a variant


def recipe_parts(recipe: Recipe) -> tuple[str, dict[str, Any]]:
    """(trainer name, the variant's options) of `"TopKTrainer"` or `("TopKTrainer", {"encoder_init_norm": 0.1})`."""
    return (recipe, {}) if isinstance(recipe, str) else (recipe[0], dict(recipe[1]))


def recipe_label(recipe: Recipe) -> str:
    """How tables and JSON name a recipe: `TopKTrainer:encoder_init_norm=0.1` (the CLI's syntax)."""
    name, options = recipe_parts(recipe)
    return ":".join([name, ",".join(f"{k}={_value_text(v)}" for k, v in options.items())]) if options else name


def _value_text(value: Any) -> str:
    """A value as the CLI reads it back: JSON, or a bare string where JSON would not parse it."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value, separators=(",", ":"))


def train_ours(run: SyntheticRun, batches: torch.Tensor, recipe: Recipe) -> tuple[list, float]:
    """Every seed of `recipe` trained in lock-step on `batches`; (dictionaries, seconds per step each)."""
    from .training import trainSAE

    configs = [run.config(recipe, seed) for seed in range(run.seeds)]
    start = time.perf_counter()
    dictionaries = trainSAE(list(batches), configs, run.steps, progress=False)
    return dictionaries, (time.perf_counter() - start) / (run.steps * run.seeds)


def train_saelens(run: SyntheticRun, batches: torch.Tensor, python: str, recipe: str) -> tuple[list, float]:
    """SAELens's architecture for `recipe`, every seed, trained in its venv on the same batches."""
    from .checkpoint import load_dictionary

    script = Path(__file__).resolve().parents[1] / "tools" / "saelens_synthetic.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing: the SAELens comparison runs from a checkout of the repository")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.save(batches, folder / "batches.pt")
        specs = []
        for seed in range(run.seeds):
            spec = {"name": f"s{seed}", "architecture": SAELENS_ARCHITECTURES[recipe], "d_sae": run.dict_size,
                    "k": run.k, "lr": run.lr, "seed": seed}  # fmt: skip
            if recipe == "MatryoshkaBatchTopKTrainer":
                edges = torch.tensor(MATRYOSHKA_FRACTIONS).cumsum(0) * run.dict_size
                spec["matryoshka_widths"] = [int(round(float(e))) for e in edges]
            specs.append(spec)
        (folder / "specs.json").write_text(json.dumps(specs))
        subprocess.run([python, str(script), str(folder / "batches.pt"), str(folder / "specs.json"), str(folder)],
                       check=True, capture_output=True, text=True)  # fmt: skip
        dictionaries = [load_dictionary(folder / spec["name"])[0] for spec in specs]
        seconds = statistics.fmean(json.loads((folder / s["name"] / "timing.json").read_text())["seconds_per_step"]
                                   for s in specs)  # fmt: skip
    return dictionaries, seconds


def run_synthetic(run: SyntheticRun, saelens_python: str | None = None) -> list[dict[str, Any]]:
    """One record per (library, recipe): each metric's mean and standard deviation over the seeds,
    seconds per step, and the per-seed values."""
    model = run.model()
    batches = torch.stack(list(model.batches(run.steps, run.batch_size, seed=1)))
    codes, x = model.sample(run.eval_samples, stream_generator("held-out", 0))
    rows: list[dict[str, Any]] = []
    for recipe in run.recipes:
        sides = [("ours", lambda r=recipe: train_ours(run, batches, r))]
        base = recipe_parts(recipe)[0]  # SAELens trains each architecture once, beside its first variant
        trained = {r["recipe"] for r in rows if r["library"] == "SAELens"}
        if saelens_python and base in SAELENS_ARCHITECTURES and base not in trained:
            sides.append(("SAELens", lambda r=base: train_saelens(run, batches, saelens_python, r)))
        for library, train in sides:
            dictionaries, seconds = train()
            scores = [ground_truth_metrics(ae, x, codes, model.directions) for ae in dictionaries]
            name = recipe_label(recipe) if library == "ours" else base
            row = {"library": library, "recipe": name, "seconds_per_step": seconds, "seeds": scores}
            for metric in METRICS:
                values = [s[metric] for s in scores]
                row[metric] = statistics.fmean(values)
                row[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], run: SyntheticRun) -> list[str]:
    """The comparison as text: mean +- sd over seeds."""
    name_width = max([27, *(len(r["recipe"]) for r in rows)])
    lines = [
        f"synthetic model: {run.n_features} features in {run.d} dims, mean L0 {run.mean_l0}; {run.steps} steps of "
        f"{run.batch_size}, {run.dict_size} latents, k {run.k}, lr {run.lr}; {run.seeds} seeds; "
        f"{run.eval_samples} held-out samples",
        f"{'library':8s} {'recipe':{name_width}s} {'MCC':>13s} {'F1':>13s} {'shrinkage':>13s} {'FVE':>13s} {'L0':>11s} "
        f"{'dead':>9s} {'s/step':>7s}",
    ]

    def cell(r: dict, m: str, f: str = "{:.3f}") -> str:
        return f"{f.format(r[m])}±{f.format(r[m + '_sd'])}"

    for r in rows:
        cells = [cell(r, m) for m in ("mcc", "f1", "shrinkage", "fve")]
        cells += [cell(r, "l0", "{:.1f}"), cell(r, "dead", "{:.0f}")]
        widths = (13, 13, 13, 13, 11, 9)
        row = " ".join(f"{c:>{w}s}" for c, w in zip(cells, widths))
        lines.append(f"{r['library']:8s} {r['recipe']:{name_width}s} {row} {r['seconds_per_step']:7.4f}")
    return lines
