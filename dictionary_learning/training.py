"""trainSAE: one activation stream -> many trainers in lock-step -> checkpoint folders.

Layout written under `save_dir` (the reference's, plus a resume file):

    trainer_{i}/config.json              {"trainer": trainer.config, "buffer": data.config, ...}
    trainer_{i}/ae.pt                    latest weights (final, or at the last backup), normalisation folded in
    trainer_{i}/checkpoints/ae_{s}.pt    weights before step s, normalisation folded in
    trainer_{i}/resume.pt                full training state for `resume_from`
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from . import __version__, distributed
from .checkpoint import CONFIG_FILE, atomic_torch_save, atomic_write_json, read_config, save_dictionary
from .dictionaries import Dictionary
from .evaluation import frac_variance_explained
from .trainers.trainer import TRAINER_REGISTRY, SAETrainer, _jsonable, resolve_device

if TYPE_CHECKING:
    from .e2e import E2EObjective

logger = logging.getLogger(__name__)

RESUME_FILE = "resume.pt"


# ------------------------------------------------------------------------------------------- setup
def build_trainer(config: dict, steps: int, device: str | None = None) -> SAETrainer:
    """Instantiate a trainer from a reference-style config dict (not mutated): `{"trainer": cls, ...}`."""
    cfg = dict(config)
    trainer_cls = cfg.pop("trainer", None) or TRAINER_REGISTRY.get(cfg.pop("trainer_class", None))
    if isinstance(trainer_cls, str):
        if trainer_cls not in TRAINER_REGISTRY:
            raise ValueError(f"unknown trainer {trainer_cls!r}; choose one of {', '.join(TRAINER_REGISTRY)}")
        trainer_cls = TRAINER_REGISTRY[trainer_cls]
    if trainer_cls is None:
        raise ValueError(f"a trainer config needs a 'trainer' entry (one of {', '.join(TRAINER_REGISTRY)})")
    if cfg.get("steps") is None:
        cfg["steps"] = steps
    if device is not None and cfg.get("device") is None:
        cfg["device"] = device
    cfg = {k: v for k, v in cfg.items() if k in trainer_cls.config_keys() or k not in _RECORDED_ONLY}
    trainer_cls.check_config_keys(cfg)
    return trainer_cls(**cfg)


# Keys our config records add beside the constructor arguments; dropped when rebuilding a trainer.
_RECORDED_ONLY = {"trainer_class", "top_k_aux", "group_sizes", "norm_factor"}


def get_norm_factor(batches: list[torch.Tensor]) -> float:
    """Scale s such that x / s has unit mean squared norm (Anthropic's normalisation, see
    arXiv 2408.05147 section 3.1): `s = sqrt(mean over rows of ||x||^2)`."""
    if batches and isinstance(batches[0], dict):
        raise NotImplementedError("normalize_activations with several sites per batch is not supported yet")
    sq = torch.cat([b.reshape(-1, b.shape[-1]).float().pow(2).sum(-1) for b in batches])
    return float(sq.mean().sqrt())


def _site_keys(batch: Any, trainers: list[SAETrainer], split_by_head: bool = False) -> list[str | int | None]:
    """What each trainer trains on: for batches that are dicts `{site name: tensor}` (a buffer
    reading several submodules) its `submodule_name` (or the only key); for per-head batches
    `[B, n_heads, d]` with `split_by_head`, head i for trainer i; None for plain tensors."""
    if split_by_head:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 3:
            raise ValueError(f"activations_split_by_head needs batches [batch, n_heads, d], got {_describe(batch)}")
        if len(trainers) > batch.shape[1]:
            raise ValueError(f"{len(trainers)} trainers but only {batch.shape[1]} heads: trainer i trains on head i")
        return list(range(len(trainers)))
    if not isinstance(batch, dict):
        return [None] * len(trainers)
    keys = []
    for i, trainer in enumerate(trainers):
        name = trainer.config.get("submodule_name")
        if name is None and len(batch) == 1:
            name = next(iter(batch))
        if name not in batch:
            raise ValueError(
                f"trainer {i} has submodule_name {name!r}, but the data yields activations of {sorted(batch)}; "
                f"set each trainer's submodule_name to one of them"
            )
        keys.append(name)
    return keys


def _check_batch(batch: Any, trainers: list[SAETrainer], keys: list[str | int | None]) -> None:
    for i, (trainer, key) in enumerate(zip(trainers, keys)):
        x = _select(batch, key)
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise ValueError(f"data must yield activation tensors of shape [batch, d], got {_describe(x)}")
        if x.shape[-1] != trainer.ae.activation_dim:
            raise ValueError(
                f"data yields batches of width {x.shape[-1]} but trainer {i} ({type(trainer).__name__}) "
                f"has activation_dim={trainer.ae.activation_dim}"
            )


def _select(batch: Any, key: str | int | None) -> torch.Tensor:
    if key is None:
        return batch
    return batch[:, key] if isinstance(key, int) else batch[key]


def _all_finite(batch: Any) -> bool:
    tensors = batch.values() if isinstance(batch, dict) else [batch]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _describe(obj: Any) -> str:
    return f"a tensor of shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else type(obj).__name__


class _GracefulInterrupt:
    """First Ctrl-C: finish the current step, save a resumable state, then raise KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupt received: saving after this step (press Ctrl-C again to abort at once)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ------------------------------------------------------------------------------------ persistence
class _RunFiles:
    """Writes one run's folders; a no-op when `save_dir` is None."""

    def __init__(self, save_dir: str | Path | None, indices: list[int], safetensors: bool, e2e: dict | None = None):
        self.dirs = [Path(save_dir) / f"trainer_{i}" for i in indices] if save_dir else []
        self.safetensors = safetensors
        self.e2e = e2e

    def write_configs(self, trainers, data, run_cfg, norm_factor) -> None:
        for folder, trainer in zip(self.dirs, trainers):
            config: dict[str, Any] = {"trainer": trainer.config}
            if norm_factor is not None:
                config["trainer"]["norm_factor"] = norm_factor  # already folded into the saved weights
            if getattr(data, "config", None) is not None:
                config["buffer"] = data.config
            if run_cfg:
                config["run"] = run_cfg
            if self.e2e is not None:
                config["e2e"] = self.e2e
            config["library"] = {"name": "dictionary_learning", "version": __version__}
            atomic_write_json(config, folder / CONFIG_FILE)

    def save_weights(self, trainers, norm_factor, step: int | None = None) -> None:
        for folder, trainer in zip(self.dirs, trainers):
            scale = norm_factor or 1.0
            if step is None:
                save_dictionary(trainer.ae, folder, read_config(folder), self.safetensors, bias_scale=scale)
            else:
                path = folder / "checkpoints" / f"ae_{step}.pt"
                atomic_torch_save(trainer.ae.scaled_state_dict(scale), path)

    def save_resume(self, trainers, next_step: int, batches_consumed: int, norm_factor) -> None:
        for folder, trainer in zip(self.dirs, trainers):
            atomic_torch_save(
                {
                    "format": 1,
                    "trainer": trainer.state_dict(),
                    "config": trainer.config,
                    "next_step": next_step,
                    "batches_consumed": batches_consumed,
                    "norm_factor": norm_factor,
                    "e2e": self.e2e,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                folder / RESUME_FILE,
            )


def _load_resume_states(resume_from: str | Path) -> list[dict]:
    folders = sorted(Path(resume_from).glob("trainer_*"), key=lambda p: int(p.name.split("_")[1]))
    states = []
    for folder in folders:
        path = folder / RESUME_FILE
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: {path} does not exist (was the run saved with save_dir?)")
        states.append(torch.load(path, map_location="cpu", weights_only=True))
    if not states:
        raise FileNotFoundError(f"cannot resume: {resume_from} holds no trainer_* folders")
    return states


# ---------------------------------------------------------------------------------------- logging
@torch.no_grad()
def log_stats(trainers: list[SAETrainer], step: int, act: torch.Tensor | list[torch.Tensor]) -> list[dict[str, float]]:
    """Per trainer: its loss terms, L0 and fraction of variance explained on `act` (one batch for
    all, or one per trainer). Computing them changes no trainer state, so logging cadence does not
    affect training.
    """
    acts = act if isinstance(act, list) else [act] * len(trainers)
    records = []
    for trainer, x in zip(trainers, acts):
        log = trainer.loss(x, step=step, logging=True)
        record = dict(log.losses)
        record |= {k: float(v) for k, v in getattr(trainer, "extra_logs", {}).items()}  # e2e terms, latest step
        record["l0"] = float((log.f != 0).float().sum(-1).mean())
        record["frac_variance_explained"] = float(frac_variance_explained(log.x, log.x_hat))
        records.append(record)
    return records


class _WandbLogger:
    """One wandb run per trainer, in this process (wandb is optional)."""

    def __init__(self, trainers, entity, project, run_cfg):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("use_wandb=True needs the optional wandb package: pip install wandb") from e
        self.runs = []
        for i, trainer in enumerate(trainers):
            config = trainer.config | (run_cfg or {})
            name = f"{config.get('wandb_name', 'trainer')}_trainer_{i}"
            self.runs.append(
                wandb.init(
                    entity=entity or None, project=project or None, config=config, name=name, reinit="create_new"
                )
            )

    def log(self, records, step):
        for run, record in zip(self.runs, records):
            run.log(record, step=step)

    def finish(self):
        for run in self.runs:
            run.finish()


# ------------------------------------------------------------------------------------------- main
def trainSAE(
    data: Iterable[torch.Tensor],
    trainer_configs: list[dict] | None,
    steps: int,
    use_wandb: bool = False,
    wandb_entity: str = "",
    wandb_project: str = "",
    save_steps: list[int] | None = None,
    save_dir: str | Path | None = None,
    log_steps: int | None = None,
    activations_split_by_head: bool = False,
    transcoder: bool = False,
    run_cfg: dict | None = None,
    normalize_activations: bool = False,
    verbose: bool = False,
    device: str | None = None,
    autocast_dtype: torch.dtype = torch.float32,
    backup_steps: int | None = None,
    resume_from: str | Path | None = None,
    norm_factor_batches: int = 10,
    safetensors: bool = False,
    progress: bool = True,
    e2e: E2EObjective | None = None,
    parallel: str = "data",
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S,
) -> list[Dictionary]:
    """Train every trainer in `trainer_configs` on the same batches of `data`; return the dictionaries.

    Args:
        data: iterable of activation batches `[B, D]` (a buffer, a cache, a list of tensors).
        trainer_configs: reference-style dicts `{"trainer": TopKTrainer, "k": 32, ...}` (not mutated).
            May be None with `resume_from`, to rebuild the trainers from their saved configs.
        steps: number of optimisation steps (batches) to train for.
        save_steps: steps before which `checkpoints/ae_{step}.pt` is written.
        log_steps: cadence of the progress-bar statistics, `verbose` log lines and wandb (default
            steps // 100).
        normalize_activations: divide inputs by a norm factor measured on the first
            `norm_factor_batches` batches (which are still used for training); the factor is folded
            into the saved and returned weights, which therefore work on raw activations.
        autocast_dtype: mixed-precision dtype of the forward passes (master weights stay fp32).
        backup_steps: cadence of the resumable state `resume.pt` (it is also written at every save
            step, at the end and on the first Ctrl-C).
        resume_from: a previous `save_dir`; training continues from its `resume.pt` files.
        activations_split_by_head: batches are `[B, n_heads, d]` (HeadActivationBuffer); trainer i
            trains and is logged on head i.
        e2e: an `E2EObjective`: end-to-end training with the dictionaries spliced into its model.
            `data` then yields token batches (`TokenBatches`); each is run once through the clean
            model for all trainers, and each trainer's loss becomes the objective's (KL, downstream
            MSE, reweighted local term). Resume checks that the objective is unchanged.
    Returns:
        The trained dictionaries, normalisation folded in.
    """
    if transcoder:
        raise NotImplementedError("transcoder training is not supported yet")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if save_dir is None and resume_from is not None:
        save_dir = resume_from
    group = distributed.setup(parallel, dist_timeout)
    rank_tag = f"rank {group.rank}: " if group is not None else ""

    resume_states = _load_resume_states(resume_from) if resume_from is not None else None
    if trainer_configs is None:
        if resume_states is None:
            raise ValueError("trainer_configs is required unless resume_from is given")
        trainer_configs = [s["config"] for s in resume_states]
    if not trainer_configs:
        raise ValueError("trainer_configs is empty: pass at least one trainer config")
    indices = list(range(len(trainer_configs)))
    if group is not None:
        distributed.check_agreement(group, "trainer configs", [_jsonable(c) for c in trainer_configs])
        distributed.check_agreement(group, "number of steps and the parallel mode", (steps, parallel))
        if parallel == "data":
            distributed.check_agreement(group, "data source", distributed.describe_data(data))
        else:
            if group.world_size > len(trainer_configs):
                raise ValueError(
                    f"trainer-parallel training over {group.world_size} processes needs at least as many trainer "
                    f"configs, got {len(trainer_configs)}: use fewer processes or parallel='data'"
                )
            indices = indices[group.rank :: group.world_size]
        trainer_configs = [
            dict(trainer_configs[i], device=distributed.local_device(trainer_configs[i].get("device") or device, group))
            for i in indices
        ]
        if resume_states is not None:
            resume_states = [resume_states[i] for i in indices]
    trainers = [build_trainer(cfg, steps, device) for cfg in trainer_configs]
    for trainer in trainers:
        distributed.broadcast_module(trainer.ae, group)  # data parallel: every replica starts from rank 0's

    with distributed.active(group):
        data_parallel = group is not None and group.mode == "data"
        writes = group is None or group.mode == "trainers" or group.is_main
        start_step, consumed, norm_factor = 0, 0, None
        if resume_states is not None:
            start_step, consumed, norm_factor = _restore(trainers, resume_states)
        if data_parallel and hasattr(data, "shard"):
            data.shard(group.rank, group.world_size)  # each replica reads its own disjoint share
        seekable = resume_states is not None and hasattr(data, "skip_batches")
        if seekable:
            data.skip_batches(consumed)  # an ActivationCache jumps straight to where the run stopped

        batches: Iterator = iter(data) if group is None or group.mode == "data" or group.is_main else iter(())
        if resume_states is not None and not seekable:
            for _ in range(consumed):  # replay the stream up to where the interrupted run stopped
                next(batches, None)
        if group is not None and group.mode == "trainers":
            batches = distributed.broadcast_batches(batches, group)  # rank 0 reads, every rank trains on it
        elif data_parallel and not hasattr(data, "shard"):
            batches = (distributed.row_slice(b, group) for b in batches)  # every rank read it: keep a share
        if e2e is not None:
            if resume_states is not None and resume_states[0].get("e2e") != e2e.config:
                raise ValueError(f"the run was saved with e2e={resume_states[0].get('e2e')}, not {e2e.config}")
            batches = map(e2e.prepare, batches)  # token batch -> clean run, once for all trainers

        def activations_of(item):
            return item.x if e2e is not None else item

        first = next(batches, None)
        if _any_rank(group, first is None):
            raise ValueError(
                f"{rank_tag}data yielded no batches: check the data source (empty file, exhausted iterator)"
            )
        keys = _site_keys(activations_of(first), trainers, activations_split_by_head)
        _check_batch(activations_of(first), trainers, keys)
        batches = itertools.chain([first], batches)
        if resume_states is None and normalize_activations:
            peeked = list(itertools.islice(batches, norm_factor_batches))
            norm_factor = get_norm_factor([activations_of(item) for item in peeked])
            if data_parallel:  # the replicas' shards: the root of the mean of their mean squares
                norm_factor = float(distributed.sum_(torch.tensor(norm_factor**2)) / group.world_size) ** 0.5
            logger.info("norm factor %.4f from %d batches", norm_factor, len(peeked))
            batches = itertools.chain(peeked, batches)

        files = _RunFiles(save_dir if writes else None, indices, safetensors, e2e.config if e2e is not None else None)
        files.write_configs(trainers, data, run_cfg, norm_factor)
        log_every = log_steps or max(1, steps // 100)
        show = writes and (group is None or group.is_main)  # one progress bar and one log
        wandb_logger = _WandbLogger(trainers, wandb_entity, wandb_project, run_cfg) if use_wandb and writes else None
        skipped = 0
        bar = tqdm(total=steps, initial=start_step, disable=not (progress and show), desc="trainSAE")
        step = start_step
        frozen = e2e.frozen_model() if e2e is not None else contextlib.nullcontext()
        with _GracefulInterrupt() as interrupt, frozen:
            while step < steps:
                item = next(batches, None)
                act = activations_of(item) if item is not None else None
                exhausted, bad, stop = _flags(group, item is None, act is not None and not _all_finite(act), interrupt)
                if exhausted:
                    logger.warning("data ran out after %d of %d steps; stopping early", step, steps)
                    break
                consumed += 1
                if bad:
                    skipped += 1
                    logger.warning("skipping a batch with NaN/Inf activations (%d skipped so far)", skipped)
                    continue
                inputs = _DeviceCache(act, norm_factor)

                if step % log_every == 0 and (progress or verbose or use_wandb):  # the same on every rank
                    records = log_stats(trainers, step, [inputs.on(t.device, k) for t, k in zip(trainers, keys)])
                    if show or wandb_logger is not None:
                        _report(records, step, bar, verbose and show, wandb_logger, skipped)
                if save_steps is not None and step in save_steps:
                    files.save_weights(trainers, norm_factor, step=step)
                for trainer, key in zip(trainers, keys):
                    extra = e2e.loss_fn(item, trainer, norm_factor) if e2e is not None else None
                    with _autocast(trainer.device, autocast_dtype):
                        trainer.update(step, inputs.on(trainer.device, key), extra)
                step += 1
                bar.update(1)
                if (backup_steps and step % backup_steps == 0) or stop:
                    files.save_resume(trainers, step, consumed, norm_factor)
                    files.save_weights(trainers, norm_factor)  # ae.pt: the latest weights, loadable anywhere
                if stop:
                    bar.close()
                    distributed.barrier(group)
                    raise KeyboardInterrupt(f"training interrupted after step {step}; resume with resume_from")
        bar.close()

        files.save_resume(trainers, step, consumed, norm_factor)
        files.save_weights(trainers, norm_factor)
        distributed.barrier(group)  # every rank's files are complete when trainSAE returns
        if wandb_logger is not None:
            wandb_logger.finish()
        if skipped:
            logger.warning("%d batches with NaN/Inf activations were skipped", skipped)
        for trainer in trainers:
            if norm_factor is not None:
                trainer.ae.scale_biases(norm_factor)
        return [trainer.ae for trainer in trainers]


def _any_rank(group, *flags: bool) -> tuple[bool, ...] | bool:
    """Each flag OR-ed over the ranks (a no-op for one process)."""
    if group is not None:
        t = distributed._all_reduce(torch.tensor([int(f) for f in flags]), torch.distributed.ReduceOp.MAX)
        flags = tuple(bool(v) for v in t.tolist())
    return flags if len(flags) > 1 else flags[0]


def _flags(group, exhausted: bool, bad: bool, interrupt: _GracefulInterrupt) -> tuple[bool, bool, bool]:
    """(data ran out, batch not finite, stop requested), agreed by every rank so that all take the same
    branch (one rank skipping or stopping alone would leave the others waiting in a collective)."""
    exhausted, bad, stop = _any_rank(group, exhausted, bad, interrupt.requested)
    if stop:
        interrupt.requested = True
    return exhausted, bad, stop


class _DeviceCache:
    """The batch moved, cast to fp32 and normalised once per (device, site), shared by all trainers there."""

    def __init__(self, act: torch.Tensor | dict[str, torch.Tensor], norm_factor: float | None):
        self.act, self.norm_factor, self.cache = act, norm_factor, {}

    def on(self, device: torch.device, key: str | int | None = None) -> torch.Tensor:
        if (device, key) not in self.cache:
            x = _select(self.act, key).to(device, non_blocking=True).float()
            self.cache[(device, key)] = x / self.norm_factor if self.norm_factor is not None else x
        return self.cache[(device, key)]


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=resolve_device(device).type, dtype=dtype)


def _restore(trainers: list[SAETrainer], states: list[dict]) -> tuple[int, int, float | None]:
    if len(states) != len(trainers):
        raise ValueError(f"resume folder has {len(states)} trainers but {len(trainers)} configs were given")
    for i, (trainer, state) in enumerate(zip(trainers, states)):
        saved = {k: v for k, v in state["config"].items() if k != "norm_factor"}
        differing = sorted(k for k in set(saved) | set(trainer.config) if saved.get(k) != trainer.config.get(k))
        if differing:
            raise ValueError(
                f"trainer {i}'s config differs from the saved run in {differing}; "
                f"pass trainer_configs=None to resume with the saved configs"
            )
        trainer.load_state_dict(state["trainer"])
    torch.set_rng_state(states[0]["rng"])
    if torch.cuda.is_available() and states[0]["cuda_rng"]:
        torch.cuda.set_rng_state_all(states[0]["cuda_rng"])
    return states[0]["next_step"], states[0]["batches_consumed"], states[0]["norm_factor"]


def _report(records, step, bar, verbose, wandb_logger, skipped) -> None:
    first = records[0]
    postfix = {
        "loss": f"{first.get('e2e_loss', first['loss']):.4g}",
        "L0": f"{first['l0']:.1f}",
        "FVE": f"{first['frac_variance_explained']:.3f}",
    }
    if "kl_loss" in first:
        postfix["KL"] = f"{first['kl_loss']:.4g}"
    if len(records) > 1:
        fves = [r["frac_variance_explained"] for r in records]
        postfix["FVE_all"] = f"{min(fves):.2f}..{max(fves):.2f}"
    if skipped:
        postfix["skipped"] = skipped
    bar.set_postfix(postfix)
    if verbose:
        for i, r in enumerate(records):
            tqdm.write(
                f"step {step} trainer {i}: L0 = {r['l0']:.2f}, "
                f"frac_variance_explained = {r['frac_variance_explained']:.4f}, loss = {r['loss']:.5g}"
            )
    if wandb_logger is not None:
        wandb_logger.log(records, step)
