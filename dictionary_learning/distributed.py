"""Training across processes with torch.distributed (launched by `torchrun`): data and trainer parallel.

`trainSAE` calls `setup()`; under `torchrun --nproc_per_node N` (WORLD_SIZE > 1) it joins the
process group (NCCL for CUDA devices, gloo otherwise) and trains

- data parallel (`parallel="data"`): one replica of every trainer per process, each on its own
  rows: sources with a `shard(rank, world_size)` method (ActivationCache, ActivationBuffer,
  TokenBatches) read disjoint shares; any other iterable is read whole by every rank and each rank
  keeps its slice of each batch's rows. Gradients are averaged weighted by rows (so the step equals
  one process's step on the combined batch for losses that are means over rows), dead-latent
  counters and threshold statistics are reduced, and only rank 0 writes files and logs.
- trainer parallel (`parallel="trainers"`): trainer i runs on rank i % N; rank 0 reads each batch
  and broadcasts it, every rank writes its trainers' folders in the one save_dir.

The reductions below are no-ops outside data-parallel training, so trainers call them freely.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

PARALLEL_MODES = ("data", "trainers")
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Group:
    rank: int
    world_size: int
    mode: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ACTIVE: Group | None = None  # set while a data-parallel trainSAE runs in this process


def setup(parallel: str = "data", timeout_s: float = DEFAULT_TIMEOUT_S) -> Group | None:
    """Join the process group that torchrun describes (or use an initialised one); None for one process."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
            return None  # not launched by torchrun: one process
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Group(dist.get_rank(), dist.get_world_size(), parallel)


def check_shard(rank: int, world_size: int) -> None:
    """The arguments of every data source's `shard(rank, world_size)`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")


def strided(items: Iterable, rank: int, world_size: int) -> Iterator:
    """Items rank, rank + world_size, ... of a stream: one process's share of the documents."""
    check_shard(rank, world_size)
    return itertools.islice(items, rank, None, world_size)


def local_device(device: str | None, group: Group | None) -> str | None:
    """A bare "cuda" becomes this process's GPU (LOCAL_RANK) under torchrun."""
    if group is not None and device is not None and str(device) == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device


@contextlib.contextmanager
def active(group: Group | None) -> Iterator[None]:
    """Make the data-parallel reductions live for the duration of a run."""
    global _ACTIVE
    previous = _ACTIVE
    _ACTIVE = group if group is not None and group.mode == "data" else None
    try:
        yield
    finally:
        _ACTIVE = previous


def world_size() -> int:
    """Replicas of the data-parallel run in progress (1 outside one)."""
    return _ACTIVE.world_size if _ACTIVE is not None else 1


# ------------------------------------------------------------------------ reductions used by trainers
def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a copy of `t` (on the GPU when the backend is NCCL, which has no CPU tensors)."""
    work = t.clone()
    if work.device.type == "cpu" and dist.get_backend() == "nccl":
        work = work.cuda()
    dist.all_reduce(work, op=op)
    return work.to(t.device)


def any_(mask: torch.Tensor) -> torch.Tensor:
    """Logical OR of a boolean tensor over the replicas (e.g. which latents fired anywhere)."""
    if _ACTIVE is None:
        return mask
    return _all_reduce(mask.to(torch.int32), dist.ReduceOp.MAX).bool()


def sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over the replicas."""
    if _ACTIVE is None:
        return t
    return _all_reduce(t)


def any_over(group: Group | None, flags: list[bool]) -> list[bool]:
    """Each flag OR-ed over the ranks of `group` (as given for one process), in any parallel mode."""
    if group is None:
        return list(flags)
    t = _all_reduce(torch.tensor([int(f) for f in flags]), dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def min_(t: torch.Tensor) -> torch.Tensor:
    """Minimum of a tensor over the replicas."""
    if _ACTIVE is None:
        return t
    return _all_reduce(t, dist.ReduceOp.MIN)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every replica's rows, concatenated in rank order (shards may differ in length)."""
    if _ACTIVE is None:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(_ACTIVE.world_size)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(_ACTIVE.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def average_gradients(params: Iterable[torch.nn.Parameter], n_rows: int) -> None:
    """Replace each gradient by the row-weighted mean over replicas, in one all-reduce: for a loss
    that is a mean over rows this is the gradient of the loss on the combined batch."""
    if _ACTIVE is None:
        return
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    grads = [p.grad.reshape(-1).float() for p in params]
    flat = torch.cat([*grads, torch.ones(1, device=grads[0].device)]) * n_rows
    dist.all_reduce(flat)
    flat = flat[:-1] / flat[-1]
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def _broadcast_(t: torch.Tensor) -> None:
    """In-place broadcast from rank 0 that also accepts non-contiguous views (NCCL refuses them)."""
    if t.is_contiguous():
        dist.broadcast(t, src=0)
    else:
        buffer = t.contiguous()
        dist.broadcast(buffer, src=0)
        t.copy_(buffer)


def broadcast_trainer_state(trainer) -> None:
    """Copy rank 0's weights and optimizer moments to every replica (after a random resampling)."""
    if _ACTIVE is None:
        return
    with torch.no_grad():
        for t in [*trainer.ae.parameters(), *trainer.ae.buffers()]:
            _broadcast_(t.data)
        for state in trainer.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    _broadcast_(value)


def broadcast_module(module: torch.nn.Module, group: Group | None) -> None:
    """Start every replica from rank 0's initialisation."""
    if group is None or group.mode != "data":
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            _broadcast_(t.data)


# ----------------------------------------------------------------------------------- data and checks
def check_agreement(group: Group | None, what: str, value: Any) -> None:
    """Raise the same clear error on every rank when the ranks disagree on `value` (configs, steps,
    data source), instead of hanging or silently training different things."""
    if group is None:
        return
    values: list[Any] = [None] * group.world_size
    dist.all_gather_object(values, value)
    differing = [rank for rank, v in enumerate(values) if v != values[0]]
    if differing:
        raise ValueError(
            f"ranks {differing} disagree with rank 0 on the {what}: every process must call trainSAE with the "
            f"same arguments (rank 0 has {values[0]!r}, rank {differing[0]} has {values[differing[0]]!r})"
        )


def describe_data(data: Any) -> Any:
    """What identifies a data source across ranks: its config (minus per-rank fields) or its type."""
    config = getattr(data, "config", None)
    if isinstance(config, dict):
        return {k: v for k, v in config.items() if k != "device"}
    return type(data).__name__


def row_slice(batch: Any, group: Group) -> Any:
    """This rank's equal share of a batch's rows (every rank read the same batch)."""

    def cut(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n % group.world_size:
            raise ValueError(
                f"a batch of {n} rows cannot be split evenly over {group.world_size} processes: use a batch size "
                f"divisible by the world size, or a source with shard() (ActivationCache, ActivationBuffer)"
            )
        share = n // group.world_size
        return x[group.rank * share : (group.rank + 1) * share]

    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    return type(batch)(cut(v) for v in batch) if isinstance(batch, (tuple, list)) else cut(batch)


def broadcast_batches(batches: Iterator, group: Group) -> Iterator:
    """Rank 0 reads the stream and sends each batch to every rank (trainer-parallel training)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    while True:
        batch = next(batches, None) if group.is_main else None
        # A small header first; tensors then travel as tensors, not pickled.
        header = [("tensor", batch.shape, batch.dtype) if isinstance(batch, torch.Tensor) else ("object", batch)]
        dist.broadcast_object_list(header, src=0, device=device)
        if header[0][0] == "object":
            batch = header[0][1]
            if batch is None:
                return
        else:
            _, shape, dtype = header[0]
            buffer = batch.to(device or "cpu").contiguous() if group.is_main else None
            if buffer is None:
                buffer = torch.empty(shape, dtype=dtype, device=device or "cpu")
            dist.broadcast(buffer, src=0)
            batch = buffer
        yield batch


def gather_objects(group: Group | None, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (`[value]` for one process)."""
    if group is None:
        return [value]
    values: list[Any] = [None] * group.world_size
    dist.all_gather_object(values, value)
    return values


def on_main(group: Group | None, fn: Callable[[], Any]) -> None:
    """Run `fn` on rank 0 only; if it raises, every rank raises the same error (instead of the
    other ranks waiting forever in their next collective)."""
    if group is None:
        fn()
        return
    error: list[Any] = [None]
    if group.is_main:
        try:
            fn()
        except Exception as e:  # sent to every rank and raised there
            error[0] = e
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(error, src=0, device=device)
    if error[0] is not None:
        raise error[0]


def barrier(group: Group | None) -> None:
    if group is not None:
        dist.barrier()


__all__ = ["Group", "PARALLEL_MODES", "setup"]
