"""Planted-feature recovery: our trainers against the reference package's, same data and configs.

    python benchmarks/recovery_vs_reference.py --reference-python /path/to/venv_dl/bin/python

Runs this script once in our environment and once (with `--impl reference`) in a venv holding
`dictionary-learning==0.1.0`, each training every recipe with `trainSAE` on identical synthetic
batches (dictionary_learning/synthetic.py), then prints, per trainer, how many of the 48 planted directions a
decoder row matches with cosine > 0.9, plus variance explained and L0 on held-out data.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

# Loaded by path: in the reference's venv, `dictionary_learning` is the reference package.
_spec = importlib.util.spec_from_file_location(
    "planted_features", Path(__file__).resolve().parents[1] / "dictionary_learning" / "synthetic.py"
)
_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synthetic)
PlantedFeatures = _synthetic.PlantedFeatures

D, F = 32, 64


def configs(t, steps: int) -> list[dict]:
    """Identical configs for both packages; `t` maps a trainer name to its class."""
    common = dict(
        steps=steps, activation_dim=D, dict_size=F, warmup_steps=20, seed=0, layer=0, lm_name="synthetic", device="cpu"
    )
    pen = dict(common, sparsity_warmup_steps=50)
    anneal = dict(pen, lr=3e-3, initial_sparsity_penalty=0.3, anneal_start=steps // 2, p_end=0.5)
    topk = dict(common, k=4, threshold_start_step=50)
    return [
        dict(trainer=t["StandardTrainer"], lr=3e-3, l1_penalty=0.3, **pen),
        dict(trainer=t["StandardTrainerAprilUpdate"], lr=3e-3, l1_penalty=0.3, **pen),
        dict(trainer=t["GatedSAETrainer"], lr=3e-3, l1_penalty=1.0, **pen),
        dict(trainer=t["PAnnealTrainer"], **anneal),
        dict(trainer=t["GatedAnnealTrainer"], **anneal),
        dict(trainer=t["TopKTrainer"], **topk),
        dict(trainer=t["BatchTopKTrainer"], **topk),
        dict(trainer=t["MatryoshkaBatchTopKTrainer"], group_fractions=[0.25, 0.75], **topk),
        dict(trainer=t["JumpReluTrainer"], lr=3e-3, target_l0=4, **pen),
    ]


def run(impl: str, steps: int) -> list[dict]:
    if impl == "reference":
        import dictionary_learning.trainers as trainers_mod
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
        from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
        from dictionary_learning.training import trainSAE

        classes = {name: getattr(trainers_mod, name, None) for name in dir(trainers_mod)}
        classes |= {
            "MatryoshkaBatchTopKTrainer": MatryoshkaBatchTopKTrainer,
            "StandardTrainerAprilUpdate": StandardTrainerAprilUpdate,
        }
    else:
        from dictionary_learning import TRAINER_REGISTRY as classes
        from dictionary_learning import trainSAE
    data = PlantedFeatures(d=D)
    cfgs = configs(classes, steps)
    names = [c["trainer"].__name__ for c in cfgs]
    start = time.perf_counter()
    if impl == "reference":
        from dictionary_learning.utils import load_dictionary

        with tempfile.TemporaryDirectory() as tmp:
            trainSAE(data.batches(steps + 1), cfgs, steps=steps, save_dir=tmp, device="cpu")
            aes = []
            for i, name in enumerate(names):
                folder = f"{tmp}/trainer_{i}"
                if name == "StandardTrainerAprilUpdate":  # its config names no loadable class
                    from dictionary_learning.dictionary import AutoEncoder

                    aes.append(AutoEncoder.from_pretrained(f"{folder}/ae.pt"))
                else:
                    aes.append(load_dictionary(folder, device="cpu")[0])
    else:
        aes = trainSAE(data.batches(steps), cfgs, steps=steps, progress=False)
    seconds = time.perf_counter() - start
    x = next(data.batches(1, 4096, seed=99))
    results = []
    for name, ae in zip(names, aes):
        with torch.no_grad():
            x_hat, f = ae(x, output_features=True)
        decoder_FD = ae.W_dec if hasattr(ae, "W_dec") else ae.decoder.weight.T
        fve = 1 - (x - x_hat).var(0).sum() / x.var(0).sum()
        results.append(
            {
                "trainer": name,
                "recovered": data.recovered(decoder_FD),
                "fve": float(fve),
                "l0": float((f != 0).float().sum(-1).mean()),
                "seconds": seconds,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["ours", "reference", "both"], default="both")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--reference-python", help="python of a venv with dictionary-learning==0.1.0")
    args = parser.parse_args()
    if args.impl != "both":
        print(json.dumps(run(args.impl, args.steps)))
        return
    if not args.reference_python:
        parser.error("--reference-python is required with --impl both")
    reference_python = str(Path(args.reference_python).absolute())  # it runs from another folder
    ours = run("ours", args.steps)
    out = subprocess.run(
        [reference_python, __file__, "--impl", "reference", "--steps", str(args.steps)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),  # away from the repo, whose dictionary_learning must not shadow the reference
    )
    reference = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.steps} steps of 256 tokens, D={D}, F={F}, 48 planted features (cosine > 0.9)")
    header = ("trainer", "ours", "ref", "FVE ours", "FVE ref", "L0 ours", "L0 ref")
    print("{:28s} {:>5s} {:>5s}   {:>8s} {:>8s}   {:>7s} {:>7s}".format(*header))
    for a, b in zip(ours, reference):
        print(
            f"{a['trainer']:28s} {a['recovered']:5d} {b['recovered']:5d}   {a['fve']:8.3f} {b['fve']:8.3f}"
            f"   {a['l0']:7.2f} {b['l0']:7.2f}"
        )
    print(f"wall time: ours {ours[0]['seconds']:.1f} s, reference {reference[0]['seconds']:.1f} s")


if __name__ == "__main__":
    main()
