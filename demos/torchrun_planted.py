"""Data- or trainer-parallel training under torchrun, on synthetic activations with planted features.

    torchrun --nproc_per_node 2 demos/torchrun_planted.py                       # 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 demos/torchrun_planted.py --parallel trainers   # trainers spread over ranks
    torchrun --nproc_per_node 8 demos/torchrun_planted.py --device cuda         # 8 GPUs (NCCL)
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 demos/torchrun_planted.py --device cuda

Every process runs this same script; trainSAE joins the process group that torchrun describes.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from dictionary_learning import trainSAE
from dictionary_learning.synthetic import PlantedFeatures
from dictionary_learning.trainers import JumpReluTrainer, StandardTrainer, TopKTrainer

D, F = 32, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", default="data", choices=["data", "trainers"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=512, help="the combined batch over all processes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/torchrun_planted")
    args = parser.parse_args()

    data = PlantedFeatures(d=D)
    common = dict(
        activation_dim=D, dict_size=F, warmup_steps=12, seed=0, device=args.device, layer=0, lm_name="synthetic"
    )
    configs = [
        dict(trainer=TopKTrainer, k=3, threshold_start_step=30, **common),
        dict(trainer=StandardTrainer, l1_penalty=0.3, sparsity_warmup_steps=30, lr=3e-3, **common),
        dict(trainer=JumpReluTrainer, target_l0=3, sparsity_warmup_steps=30, lr=3e-3, **common),
    ]
    start = time.perf_counter()
    batches = (x * 10 for x in data.batches(args.steps, batch_size=args.batch_size))  # every rank: the same stream
    dictionaries = trainSAE(
        batches,
        configs,
        args.steps,
        save_dir=args.out,
        normalize_activations=True,
        parallel=args.parallel,
        progress=False,
        overwrite=True,  # the demo's own scratch folder: a rerun replaces it
    )
    seconds = time.perf_counter() - start
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = dist.get_backend() if dist.is_initialized() else "none"
    for ae in dictionaries:
        recovered = data.recovered(ae.decoder_FD() if hasattr(ae, "decoder_FD") else ae.decoder.weight.T)
        print(
            f"rank {rank}/{world} ({backend}, {args.parallel} parallel): {type(ae).__name__} recovered "
            f"{recovered}/{data.n_features} planted features in {seconds:.1f} s",
            flush=True,
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads() // int(__import__("os").environ.get("WORLD_SIZE", "1"))))
    main()
