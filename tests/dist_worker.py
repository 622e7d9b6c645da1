"""Processes spawned by test_distributed.py: each joins a gloo group the way torchrun's would and runs a scenario."""

from __future__ import annotations

import os
import signal
import traceback
from datetime import timedelta
from pathlib import Path

import torch

from dictionary_learning import TrainingInterrupted, trainSAE
from dictionary_learning.synthetic import PlantedFeatures
from dictionary_learning.trainers import (
    BatchTopKCLTTrainer,
    BatchTopKCrossCoderTrainer,
    CrossCoderTrainer,
    JumpReluCLTTrainer,
    JumpReluTrainer,
    StandardTrainer,
    TopKCLTTrainer,
    TopKTrainer,
)

D, F, STEPS, BATCH = 16, 48, 12, 64
COMMON = dict(activation_dim=D, dict_size=F, warmup_steps=2, seed=0, device="cpu", layer=0, lm_name="synthetic")
CONFIGS = [
    dict(trainer=TopKTrainer, k=4, threshold_start_step=3, lr=1e-3, **COMMON),
    dict(trainer=StandardTrainer, l1_penalty=0.05, sparsity_warmup_steps=3, lr=1e-3, **COMMON),
    dict(trainer=JumpReluTrainer, target_l0=4, sparsity_loss="l0", sparsity_warmup_steps=3, lr=1e-3, **COMMON),
]


# Beyond SAEs: a skip transcoder and a crosscoder, each on [B, 2, D] pairs (x and a linear map of it).
TRANSCODERS = [dict(CONFIGS[0], skip_connection=True), dict(CONFIGS[1])]
CROSSCODERS = [
    dict(trainer=CrossCoderTrainer, num_layers=2, l1_penalty=0.05, sparsity_warmup_steps=3, lr=1e-3, **COMMON),
    # BatchTopK selects within each replica's share (README): the replicas agree, one process differs
    dict(trainer=BatchTopKCrossCoderTrainer, num_layers=2, k=4, threshold_start_step=3, lr=1e-3, **COMMON),
]

# Cross-layer transcoders of 3 layers on [B, 3, 2, D]: per-token recipes equal one process; BatchTopK
# selects within each replica's share (its replicas agree, and its thresholds are the min over replicas)
CLT_COMMON = dict(COMMON, num_layers=3, lr=1e-3)
CLTS = [
    dict(trainer=TopKCLTTrainer, k=2, **CLT_COMMON),
    dict(trainer=JumpReluCLTTrainer, sparsity_warmup_steps=3, **CLT_COMMON),
    dict(trainer=BatchTopKCLTTrainer, k=2, threshold_start_step=3, **CLT_COMMON),
]


def batches(n: int = STEPS) -> list[torch.Tensor]:
    return [x * 3 + 0.5 for x in PlantedFeatures(d=D, seed=1).batches(n, batch_size=BATCH)]


def paired_batches(n: int = STEPS) -> list[torch.Tensor]:
    M = torch.randn(D, D, generator=torch.Generator().manual_seed(2)) / D**0.5
    return [torch.stack([x, x @ M], dim=1) for x in batches(n)]


def clt_batches(n: int = STEPS) -> list[torch.Tensor]:
    return [torch.stack([p, p * 0.5 + 0.1, p.flip(-1)], dim=1) for p in paired_batches(n)]


def scenario(name: str, rank: int, out: Path):
    if name == "data":
        return trainSAE(batches(), CONFIGS, STEPS, save_dir=out / "run", progress=False, dist_timeout=60)
    if name == "trainers":
        return trainSAE(
            batches(), CONFIGS, STEPS, save_dir=out / "run", progress=False, parallel="trainers", dist_timeout=60
        )
    if name == "resume":

        def crashing():
            for i, x in enumerate(batches()):
                if i == 7:
                    raise RuntimeError("simulated crash")
                yield x

        try:
            trainSAE(crashing(), CONFIGS, STEPS, save_dir=out / "run", backup_steps=5, progress=False, dist_timeout=60)
        except RuntimeError as e:
            assert "simulated crash" in str(e)
        return trainSAE(batches(), None, STEPS, resume_from=out / "run", progress=False, dist_timeout=60)
    if name == "sigterm":  # SIGTERM reaches one rank: both stop after the same step and save

        def signalled():
            for i, x in enumerate(batches()):
                if rank == 1 and i == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield x

        try:
            trainSAE(signalled(), CONFIGS, STEPS, save_dir=out / "run", progress=False, dist_timeout=60)
        except TrainingInterrupted as e:
            (out / f"stopped{rank}.txt").write_text(str(e))
        return trainSAE(batches(), None, STEPS, resume_from=out / "run", progress=False, dist_timeout=60)
    if name == "transcoders":
        return trainSAE(paired_batches(), TRANSCODERS, STEPS, progress=False, transcoder=True, dist_timeout=60)
    if name == "crosscoders":
        return trainSAE(paired_batches(), CROSSCODERS, STEPS, progress=False, dist_timeout=60)
    if name == "clts":
        return trainSAE(clt_batches(), CLTS, STEPS, save_dir=out / "run", progress=False, dist_timeout=60)
    if name == "mismatch":
        configs = [dict(CONFIGS[0], k=4 + rank)]
        return trainSAE(batches(), configs, STEPS, progress=False, dist_timeout=60)
    if name == "uneven":
        return trainSAE([torch.randn(63, D)] * STEPS, CONFIGS[:1], STEPS, progress=False, dist_timeout=60)
    if name == "crash":

        def data():
            for i, x in enumerate(batches()):
                if rank == 1 and i == 3:
                    raise RuntimeError("rank 1 lost its data")
                yield x

        return trainSAE(data(), CONFIGS[:1], STEPS, progress=False, dist_timeout=10)
    raise ValueError(name)


def run(rank: int, world_size: int, port: int, name: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    out = Path(out)
    try:
        dictionaries = scenario(name, rank, out)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        torch.save({"world_size": world, "weights": [d.state_dict() for d in dictionaries]}, out / f"rank{rank}.pt")
    except BaseException as e:  # noqa: BLE001 - reported to the test through a file
        (out / f"rank{rank}.err").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        if torch.distributed.is_initialized():
            # Tear the group down together: a rank destroying it while its peer still uses the
            # connection can abort gloo ("terminate called without an active exception") under load.
            try:
                torch.distributed.monitored_barrier(timeout=timedelta(seconds=20))
            except Exception:  # noqa: BLE001 - a peer that died: nothing to wait for
                pass
            torch.distributed.destroy_process_group()
