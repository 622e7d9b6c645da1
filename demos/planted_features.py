"""Demo: train several dictionaries side by side, evaluate them, save and reload them.

    python demos/planted_features.py     # about half a minute on 2 CPU cores
    python demos/planted_features.py --steps 3000 --out runs/planted --device cuda

It trains on synthetic activations with planted sparse features (known ground truth), so it shows
which recipes recover the true features; demos/demo.py does the same on a language model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dictionary_learning import load_dictionary, trainSAE
from dictionary_learning.evaluation import reconstruction_metrics
from dictionary_learning.synthetic import PlantedFeatures
from dictionary_learning.trainers import (
    BatchTopKTrainer,
    GatedSAETrainer,
    JumpReluTrainer,
    MatryoshkaBatchTopKTrainer,
    PAnnealTrainer,
    StandardTrainer,
    TopKTrainer,
)

D, N_FEATURES, F = 32, 48, 64
SCALE = 10.0  # raw activations are far from unit norm; normalize_activations handles that


def trainer_configs(steps: int) -> list[dict]:
    common = dict(activation_dim=D, dict_size=F, warmup_steps=steps // 50, seed=0, layer=0, lm_name="synthetic")
    penalised = dict(common, sparsity_warmup_steps=steps // 20, lr=3e-3)
    topk = dict(common, threshold_start_step=steps // 20)
    return [
        dict(trainer=StandardTrainer, l1_penalty=0.3, **penalised),
        dict(trainer=StandardTrainer, l1_penalty=0.1, **penalised),
        dict(trainer=GatedSAETrainer, l1_penalty=1.0, **penalised),
        dict(trainer=PAnnealTrainer, initial_sparsity_penalty=0.3, anneal_start=steps // 2, p_end=0.5, **penalised),
        dict(trainer=TopKTrainer, k=3, **topk),
        dict(trainer=TopKTrainer, k=6, **topk),
        dict(trainer=BatchTopKTrainer, k=3, **topk),
        dict(trainer=MatryoshkaBatchTopKTrainer, k=3, group_fractions=[0.75, 0.25], **topk),
        dict(trainer=JumpReluTrainer, target_l0=3, **penalised),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="training steps (batches of 256 activations)")
    parser.add_argument("--out", default="runs/planted", help="folder for the trained dictionaries")
    parser.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda")
    args = parser.parse_args()

    data = PlantedFeatures(d=D, n_features=N_FEATURES)
    configs = trainer_configs(args.steps)
    start = time.perf_counter()
    trainSAE(
        (x * SCALE for x in data.batches(args.steps)),
        configs,
        steps=args.steps,
        save_dir=args.out,
        normalize_activations=True,
        device=args.device,
        log_steps=max(1, args.steps // 20),
        overwrite=True,  # the demo's own scratch folder: a rerun replaces it
    )
    seconds = time.perf_counter() - start

    held_out = next(data.batches(1, batch_size=4096, seed=1234)) * SCALE
    print(f"\n{len(configs)} dictionaries trained together in {seconds:.1f} s; saved under {args.out}/")
    print(f"{'trainer_i':10s} {'recipe':28s} {'dictionary':24s} {'FVE':>6s} {'L0':>6s} {'planted found':>14s}")
    for i, config in enumerate(configs):
        ae, _ = load_dictionary(Path(args.out) / f"trainer_{i}")  # reload from disk: what a user would share
        with torch.no_grad():
            x_hat, f = ae(held_out, output_features=True)
        metrics = reconstruction_metrics(held_out, x_hat, f)
        found = data.recovered(ae.decoder_FD())
        print(
            f"trainer_{i:<2d}  {config['trainer'].__name__:28s} {type(ae).__name__:24s} "
            f"{metrics['frac_variance_explained']:6.3f} {metrics['l0']:6.2f} {found:>8d} / {N_FEATURES}"
        )


if __name__ == "__main__":
    main()
