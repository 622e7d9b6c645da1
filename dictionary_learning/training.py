"""trainSAE: one activation stream -> many trainers in lock-step -> checkpoint folders.

The run's folder (its layout, lock, backups) and the guards around each step (signals, NaN/Inf)
live in `run`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from . import distributed
from ._version import __version__
from .dictionaries import (
    AutoEncoder,  # noqa: F401 (the reference re-exports these names here)
    Dictionary,
)
from .evaluation import (
    evaluate,  # noqa: F401
    frac_variance_explained,
)
from .run import (
    MAX_CONSECUTIVE_BAD_BATCHES,
    GracefulStop,
    NumericGuard,
    RunFolder,
    TrainingInterrupted,
    data_record,
    load_backup,
    norm_factor_of,
    not_replayable,
    restore_data_state,
)
from .run_config import RunConfig
from .sites import site_record
from .trainers.schedules import fit_to_run
from .trainers.standard import StandardTrainer  # noqa: F401
from .trainers.trainer import TRAINER_REGISTRY, BatchLayoutError, RecipeTrainer, SAETrainer, jsonable, resolve_device

if TYPE_CHECKING:
    from .e2e import E2EObjective

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- setup
def build_trainer(config: dict, steps: int, device: str | None = None, new_run: bool = True) -> SAETrainer:
    """Instantiate a trainer from a reference-style config dict (not mutated): `{"trainer": cls, ...}`;
    schedule options that do not fit a short run are fitted to it (`schedules.fit_to_run`)."""
    if not isinstance(config, dict):
        raise TypeError(f"a trainer config must be a dict like {{'trainer': TopKTrainer, ...}}, got {config!r}")
    cfg = dict(config)
    trainer_cls = cfg.pop("trainer", None) or TRAINER_REGISTRY.get(cfg.pop("trainer_class", None))
    if isinstance(trainer_cls, str):
        if trainer_cls not in TRAINER_REGISTRY:
            raise ValueError(f"unknown trainer {trainer_cls!r}; choose one of {', '.join(TRAINER_REGISTRY)}")
        trainer_cls = TRAINER_REGISTRY[trainer_cls]
    if trainer_cls is None:
        raise ValueError(f"a trainer config needs a 'trainer' entry (one of {', '.join(TRAINER_REGISTRY)})")
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, SAETrainer)):
        raise TypeError(
            f"'trainer' must be a trainer class (one of {', '.join(TRAINER_REGISTRY)}), got {trainer_cls!r}"
        )
    if cfg.get("steps") is None:
        cfg["steps"] = steps
    if device is not None and cfg.get("device") is None:
        cfg["device"] = device
    cfg = {k: v for k, v in cfg.items() if k in trainer_cls.config_keys() or k not in _RECORDED_ONLY}
    if issubclass(trainer_cls, RecipeTrainer):
        cfg = fit_to_run(cfg, trainer_cls.Config.defaults(), cfg["steps"], trainer_cls.__name__, new_run)
    return trainer_cls(**cfg)  # its Config checks every key and value


# Keys our config records add beside the constructor arguments; dropped when rebuilding a trainer.
_RECORDED_ONLY = {"trainer_class", "top_k_aux", "group_sizes", "norm_factor"}


def get_norm_factor(data: Iterable[torch.Tensor], steps: int | None = None) -> float:
    """Scale s such that x / s has unit mean squared norm (see `run.norm_factor_of`), measured on
    the first `steps` batches of `data` (the reference's call), or on all of `data` (a list)."""
    batches = list(itertools.islice(iter(data), steps) if steps is not None else data)
    return norm_factor_of(batches)


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


def _tensors_of(batch: Any) -> list[torch.Tensor]:
    """The tensors of a batch: one, a dict's values (several sites), or a transcoder's (input, output) pair."""
    if isinstance(batch, dict):
        return list(batch.values())
    return list(batch) if isinstance(batch, (tuple, list)) else [batch]


def _check_batch(batch: Any, trainers: list[SAETrainer], keys: list[str | int | None]) -> None:
    """Before training: every trainer takes its share of the first batch in its own layout (rank and
    every dimension; `SAETrainer.input_and_target`), or the run stops naming both and the fix."""
    for i, (trainer, key) in enumerate(zip(trainers, keys)):
        try:
            trainer.input_and_target(_select(batch, key))
        except BatchLayoutError as e:
            where = f" (site {key!r})" if isinstance(key, str) else f" (head {key})" if isinstance(key, int) else ""
            raise BatchLayoutError(trainer, e.x, e.fix, where=f"trainer {i}{where}: ") from None


def _select(batch: Any, key: str | int | None) -> torch.Tensor:
    if key is None:
        return batch
    return batch[:, key] if isinstance(key, int) else batch[key]


def _all_finite(batch: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors_of(batch))


def _describe(obj: Any) -> str:
    return f"a tensor of shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else type(obj).__name__


# ---------------------------------------------------------------------------------------- logging
@torch.no_grad()
def log_stats(
    trainers: list[SAETrainer],
    step: int,
    act: torch.Tensor | list[torch.Tensor],
    activations_split_by_head: bool = False,
    transcoder: bool = False,
    log_queues: list | None = None,
    verbose: bool = False,
) -> list[dict[str, float]]:
    """Per trainer: its loss terms, L0 and fraction of variance explained on `act` (one batch for
    all, or one per trainer; with `activations_split_by_head`, `[B, heads, d]` and head i for
    trainer i). Computing them changes no trainer state, so logging cadence does not affect
    training. The reference's `log_queues` (one per trainer, e.g. for `new_wandb_process`) receive
    each record; `verbose` prints them. `transcoder` is the reference's flag: a transcoder's trainer
    knows it is one, and logs compare its reconstruction with the output half of the batch."""
    if isinstance(act, list):
        acts = act
    elif activations_split_by_head:
        acts = [act[:, i] for i in range(len(trainers))]
    else:
        acts = [act] * len(trainers)
    records = []
    for trainer, x in zip(trainers, acts):
        target, x_hat, f, losses = trainer.loss(x, step=step, logging=True)  # the reference's logging tuple
        record = dict(losses)
        record |= {k: float(v) for k, v in getattr(trainer, "extra_logs", {}).items()}  # e2e terms, latest step
        record["l0"] = float((f != 0).float().sum(-1).mean())
        record["frac_variance_explained"] = float(frac_variance_explained(target, x_hat))
        records.append(record)
    for i, record in enumerate(records):
        if verbose:
            tqdm.write(f"step {step} trainer {i}: {record}")
        if log_queues:
            log_queues[i].put(record | {"step": step})
    return records


def new_wandb_process(config: dict, log_queue, entity: str, project: str) -> None:
    """The reference's wandb logger process: one wandb run, fed records through `log_queue` until
    it receives "DONE" (trainSAE itself logs in-process, see `use_wandb`)."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("new_wandb_process needs the optional wandb package: pip install wandb") from e
    run = wandb.init(entity=entity, project=project, config=config, name=config.get("wandb_name"))
    while (record := log_queue.get()) != "DONE":
        run.log(record, step=record.get("step"))
    run.finish()


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
    overwrite: bool = False,
) -> list[Dictionary]:
    """Train every trainer in `trainer_configs` on the same batches of `data`; return the dictionaries.

    Args:
        data: iterable of activation batches `[B, D]` (a buffer, a cache, a list of tensors).
        trainer_configs: reference-style dicts `{"trainer": TopKTrainer, "k": 32, ...}` (not mutated).
            May be None with `resume_from`, to rebuild the trainers from their saved configs.
        steps: number of optimisation steps (batches) to train for.
        save_steps: steps before which `checkpoints/ae_{step}.pt` is written.
        save_dir: the run's folder (layout in `run`). One process writes it at a time (a lock); a
            folder that holds another run is refused unless `overwrite=True`, which removes that run.
        log_steps: cadence of the progress-bar statistics, `verbose` log lines and wandb (default
            steps // 100).
        normalize_activations: divide inputs by a norm factor measured on the first
            `norm_factor_batches` batches (which are still used for training; NaN/Inf and all-zero
            batches are left out of the factor); the factor is folded into the saved and returned
            weights, which therefore work on raw activations.
        autocast_dtype: mixed-precision dtype of the forward passes (master weights stay fp32).
        backup_steps: cadence of the resumable backup (it is also written at every save step, at the
            end, and when Ctrl-C, SIGTERM or SIGUSR1 stops the run after its current step).
        resume_from: a previous `save_dir`; training continues from its last complete backup, with
            the same `steps` (a schedule cannot be stretched once under way).
        activations_split_by_head: batches are `[B, n_heads, d]` (HeadActivationBuffer); trainer i
            trains and is logged on head i.
        transcoder: batches are `[B, 2, d]` (input, output) rows, as `ActivationBuffer(...,
            io="in_and_out")` reads an MLP, or `(input, output)` pairs; each config becomes a transcoder
            (`transcoder=True`: the TopK, BatchTopK, Standard, StandardAprilUpdate and JumpReLU recipes).
        e2e: an `E2EObjective`: end-to-end training with the dictionaries spliced into its model.
            `data` then yields token batches (`TokenBatches`); each is run once through the clean
            model for all trainers, and each trainer's loss becomes the objective's (KL, downstream
            MSE, reweighted local term). Resume checks that the objective is unchanged.
    Returns:
        The trained dictionaries, normalisation folded in.
    Raises:
        TrainingInterrupted: after saving, on Ctrl-C, SIGTERM or SIGUSR1.
        NonFiniteTrainingError: a loss or weight became NaN/Inf (nothing from that step was saved).
    """
    run = RunConfig(
        steps=steps,
        use_wandb=use_wandb,
        wandb_entity=wandb_entity,
        wandb_project=wandb_project,
        save_steps=save_steps,
        save_dir=save_dir,
        log_steps=log_steps,
        activations_split_by_head=activations_split_by_head,
        transcoder=transcoder,
        run_cfg=run_cfg,
        normalize_activations=normalize_activations,
        verbose=verbose,
        device=device,
        autocast_dtype=autocast_dtype,
        backup_steps=backup_steps,
        resume_from=resume_from,
        norm_factor_batches=norm_factor_batches,
        safetensors=safetensors,
        progress=progress,
        e2e=e2e,
        parallel=parallel,
        dist_timeout=dist_timeout,
        overwrite=overwrite,
    )
    return train(data, trainer_configs, run)


def train(data: Iterable, trainer_configs: list[dict] | None, run: RunConfig) -> list[Dictionary]:
    """`trainSAE` with its options as one `RunConfig`: build the trainers (or restore them from the
    run's last backup), take the folder, and train them in lock-step on `data`."""
    if run.transcoder and trainer_configs is not None:
        trainer_configs = [_as_transcoder(config) for config in trainer_configs]
    group = distributed.setup(run.parallel, run.dist_timeout)
    folder = RunFolder(run.save_dir, group, run.safetensors)
    # Resuming in place, the folder is locked before its backup is read; a new run (or one continued
    # into another folder) takes it after the trainers are built, so bad configs touch nothing.
    writes = group is None or group.mode == "trainers" or group.is_main
    with GracefulStop() as stop:
        try:
            if run.resumes_in_place:
                folder.open(resuming=True, overwrite=False)
            resume_states = load_backup(run.resume_from) if run.resume_from is not None else None
            trainers, indices = _build_trainers(trainer_configs, resume_states, run, group, data)
            if not run.resumes_in_place:
                folder.open(resuming=False, overwrite=run.overwrite)
            folder.attach(indices, writes)
            return _Run(trainers, indices, folder, group, stop, run, writes).train(data, resume_states)
        finally:
            folder.close()


def _as_transcoder(config: Any) -> Any:
    """A config with `transcoder=True` (unless it says otherwise), for a recipe that trains transcoders."""
    if not isinstance(config, dict):
        return config  # build_trainer names the problem
    cls = config.get("trainer")
    cls = TRAINER_REGISTRY.get(cls) if isinstance(cls, str) else cls
    if isinstance(cls, type) and "transcoder" not in getattr(cls, "config_keys", lambda: [])():
        raise ValueError(
            f"{cls.__name__} does not train transcoders: use TopKTrainer, BatchTopKTrainer, StandardTrainer, "
            "StandardTrainerAprilUpdate or JumpReluTrainer"
        )
    return {"transcoder": True, **config}


def _build_trainers(trainer_configs, resume_states, run: RunConfig, group, data):
    """The trainers of this process (all, or its share under trainer-parallel torchrun) and their
    indices in the run, restored from `resume_states` when given."""
    steps, device, parallel = run.steps, run.device, run.parallel
    if trainer_configs is None:
        if resume_states is None:
            raise ValueError("trainer_configs is required unless resume_from is given")
        trainer_configs = [s["config"] for s in resume_states]
    if not trainer_configs:
        raise ValueError("trainer_configs is empty: pass at least one trainer config")
    if resume_states is not None:
        _check_resume_steps(resume_states, steps)
    indices = list(range(len(trainer_configs)))
    if group is not None:
        distributed.check_agreement(group, "trainer configs", [jsonable(c) for c in trainer_configs])
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
    trainers = [build_trainer(cfg, steps, device, new_run=resume_states is None) for cfg in trainer_configs]
    for trainer in trainers:
        distributed.broadcast_module(trainer.ae, group)  # data parallel: every replica starts from rank 0's
    if resume_states is not None:
        _restore(trainers, [resume_states[i] for i in indices])
    return trainers, indices


def _check_resume_steps(states: list[dict], steps: int) -> None:
    saved = {s["config"].get("steps") for s in states}
    if saved != {steps}:
        (old,) = saved if len(saved) == 1 else (sorted(saved, key=str)[-1],)
        raise ValueError(
            f"cannot resume with steps={steps}: the run was started with steps={old}, and its learning-rate and "
            f"sparsity schedules (warm-up, decay_start, sparsity warm-up) were laid out for that many steps; past "
            f"their end the learning rate would turn negative. Pass steps={old} to finish the run; to train longer, "
            f"start a new run with the larger steps"
        )


class _Run:
    """One trainSAE call from its first batch to its files: the loop, backups, logging, checks."""

    def __init__(self, trainers, indices, folder: RunFolder, group, stop: GracefulStop, run: RunConfig, writes: bool):
        self.trainers, self.indices, self.folder, self.group = trainers, indices, folder, group
        self.stop, self.run, self.e2e, self.writes = stop, run, run.e2e, writes
        self.guard = NumericGuard(trainers, indices)
        self.rank_tag = f"rank {group.rank}: " if group is not None else ""

    def activations_of(self, item):
        return item.x if self.e2e is not None else item

    def train(self, data, resume_states) -> list[Dictionary]:
        group, trainers, steps = self.group, self.trainers, self.run.steps
        with distributed.active(group):
            step, consumed, norm_factor = 0, 0, None
            if resume_states is not None:
                step, consumed, norm_factor = _resume_position(resume_states)
            if step >= steps:  # a finished run: nothing to train, no data to read
                logger.info("the run in %s already finished its %d steps", self.folder.root, steps)
                return self._finish(norm_factor)
            self.data = data
            if self.folder.root is not None and resume_states is None and (why := not_replayable(data)):
                logger.warning("this run's backups cannot be resumed exactly: %s", why)
            batches, keys, norm_factor = self._stream(data, resume_states, consumed, norm_factor, steps - step)
            records = {"buffer": data.config} if getattr(data, "config", None) is not None else {}
            records |= {"run": self.run.run_cfg} if self.run.run_cfg else {}
            records |= {"e2e": self.e2e.config} if self.e2e is not None else {}
            records["library"] = {"name": "dictionary_learning", "version": __version__}
            self.records = records
            buffer = records.get("buffer")
            self.sites = [site_record(buffer, trainer.config, key) for trainer, key in zip(trainers, keys)]
            self.folder.write_configs(self.folder.configs(trainers, records, norm_factor, self.sites))
            self.norm_factor = norm_factor
            step, consumed, skipped = self._loop(batches, keys, step, consumed)
            self.guard.check(self.folder.describe_last_backup())
            self._backup(step, consumed)
            distributed.barrier(group)  # every rank's files are complete when trainSAE returns
            if skipped:
                logger.warning("%d batches with NaN/Inf activations were skipped", skipped)
            return self._finish(norm_factor)

    def _finish(self, norm_factor: float | None) -> list[Dictionary]:
        """The dictionaries, normalisation folded in."""
        for trainer in self.trainers:
            if norm_factor is not None:
                trainer.ae.scale_biases(norm_factor)
        return [trainer.ae for trainer in self.trainers]

    def _stream(self, data, resume_states, consumed, norm_factor, steps_left: int):
        """The batches from where the run stands, the site key of each trainer, and the norm factor."""
        group, e2e, run = self.group, self.e2e, self.run
        data_parallel = group is not None and group.mode == "data"
        if resume_states is not None:
            restore_data_state(data, resume_states[0].get("data"))  # the same batches again, or an error
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

        if group is None and e2e is None and resume_states is None:
            _check_enough_batches(data, steps_left, drawn=0)  # a short text can be counted before any fill
        first = next(batches, None)
        if _any_rank(group, first is None):
            raise ValueError(
                f"{self.rank_tag}data yielded no batches: check the data source (empty file, exhausted iterator)"
            )
        if group is None and e2e is None:
            _check_enough_batches(data, steps_left)
        keys = _site_keys(self.activations_of(first), self.trainers, run.activations_split_by_head)
        _check_batch(self.activations_of(first), self.trainers, keys)
        batches = itertools.chain([first], batches)
        if resume_states is None and run.normalize_activations:
            peeked = list(itertools.islice(batches, run.norm_factor_batches))
            norm_factor = norm_factor_of([self.activations_of(item) for item in peeked], group)
            logger.info("norm factor %.4f from %d batches", norm_factor, len(peeked))
            batches = itertools.chain(peeked, batches)
        return batches, keys, norm_factor

    def _loop(self, batches, keys, step: int, consumed: int) -> tuple[int, int, int]:
        group, trainers, e2e, folder, run = self.group, self.trainers, self.e2e, self.folder, self.run
        steps = run.steps
        log_every = run.log_steps or max(1, steps // 100)
        check_every = 1 if all(t.device.type == "cpu" for t in trainers) else min(log_every, 100)
        show = self.writes and (group is None or group.is_main)  # one progress bar and one log
        logs = run.progress or run.verbose or run.use_wandb
        wandb_logger = None
        if run.use_wandb and self.writes:  # under trainer-parallel torchrun each rank logs its own
            wandb_logger = _WandbLogger(trainers, run.wandb_entity, run.wandb_project, run.run_cfg)
        skipped, bad_in_a_row = 0, 0
        bar = tqdm(total=steps, initial=step, disable=not (run.progress and show), desc="trainSAE")
        frozen = e2e.frozen_model() if e2e is not None else contextlib.nullcontext()
        with frozen:
            while step < steps:
                item = next(batches, None)
                act = self.activations_of(item) if item is not None else None
                exhausted, bad, stop = _flags(group, item is None, act is not None and not _all_finite(act), self.stop)
                if exhausted:
                    logger.warning("data ran out after %d of %d steps; stopping early", step, steps)
                    break
                consumed += 1
                if bad:
                    skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
                    _check_bad_streak(bad_in_a_row, consumed)
                    logger.warning("skipping a batch with NaN/Inf activations (%d skipped so far)", skipped)
                    continue
                bad_in_a_row = 0
                _check_rows(act, consumed)
                inputs = _DeviceCache(act, self.norm_factor)
                if step % log_every == 0 and logs:  # the same on every rank
                    records = log_stats(trainers, step, [inputs.on(t.device, k) for t, k in zip(trainers, keys)])
                    if show or wandb_logger is not None:
                        _report(records, step, bar, run.verbose and show, wandb_logger, skipped)
                if run.save_steps is not None and step in run.save_steps:
                    self.guard.check(folder.describe_last_backup())
                    folder.save_weights(trainers, self.norm_factor, step=step)
                for position, (trainer, key) in enumerate(zip(trainers, keys)):
                    extra = e2e.loss_fn(item, trainer, self.norm_factor) if e2e is not None else None
                    with _autocast(trainer.device, run.autocast_dtype):
                        loss = trainer.update(step, inputs.on(trainer.device, key), extra)
                    self.guard.record(position, step, loss)
                step += 1
                bar.update(1)
                if step % check_every == 0:
                    self.guard.check(folder.describe_last_backup())
                if (run.backup_steps and step % run.backup_steps == 0) or stop:
                    self.guard.check(folder.describe_last_backup())
                    self._backup(step, consumed)
                if stop:
                    bar.close()
                    distributed.barrier(group)
                    where = f"resume with resume_from={str(folder.root)!r}" if folder.root else "nothing was saved"
                    raise TrainingInterrupted(
                        f"training stopped by {self.stop.requested or 'a signal'} after step {step}; {where}"
                    )
        bar.close()
        if wandb_logger is not None:
            wandb_logger.finish()
        return step, consumed, skipped

    def _backup(self, step: int, consumed: int) -> None:
        # config.json says how many steps the weights saved with it were trained for (fewer than the
        # schedule's `steps` when the data ran out or the run was stopped)
        records = self.records | {"steps_trained": step}
        configs = self.folder.configs(self.trainers, records, self.norm_factor, self.sites)
        run_state = {"norm_factor": self.norm_factor, "e2e": self.e2e.config if self.e2e is not None else None}
        run_state["data"] = data_record(self.data)
        self.folder.save_backup(self.trainers, step, consumed, run_state)
        self.folder.save_weights(self.trainers, self.norm_factor, configs=configs)  # ae.pt and its config.json


def _check_enough_batches(data, steps_left: int, drawn: int = 1) -> None:
    """Fail before training when the data is known to hold fewer batches than the steps left (a
    buffer whose finite text counts short, or ran out during its first fill; a cache read once),
    naming both numbers. `drawn`: batches already taken from it."""
    if not hasattr(data, "batches_left"):
        return
    left = data.batches_left(steps_left) if drawn == 0 else data.batches_left()
    if left is None:
        return
    available = left + drawn
    if available < steps_left:
        size = getattr(data, "out_batch_size", None) or getattr(data, "batch_size", "?")
        raise ValueError(
            f"the data holds {available} batches of {size} activations but {steps_left} steps are asked: train for at "
            f"most {available} steps, give more text (a larger source or cache), or let the data repeat "
            f"(loop=True on the buffer or cache; --loop on the command line)"
        )


def _check_bad_streak(bad_in_a_row: int, consumed: int) -> None:
    if bad_in_a_row >= MAX_CONSECUTIVE_BAD_BATCHES:
        raise ValueError(
            f"the last {bad_in_a_row} batches (up to batch {consumed} of the stream) all held NaN/Inf activations: "
            f"the data source is broken (a bad shard, a model producing NaNs); nothing of them was trained on"
        )


def _check_rows(act: Any, consumed: int) -> None:
    if any(t.shape[0] == 0 for t in _tensors_of(act)):
        raise ValueError(f"batch {consumed} of the data has 0 rows: every batch needs at least one activation")


def _resume_position(states: list[dict]) -> tuple[int, int, float | None]:
    torch.set_rng_state(states[0]["rng"])
    if torch.cuda.is_available() and states[0]["cuda_rng"]:
        torch.cuda.set_rng_state_all(states[0]["cuda_rng"])
    return states[0]["next_step"], states[0]["batches_consumed"], states[0]["norm_factor"]


def _any_rank(group, *flags: bool) -> tuple[bool, ...] | bool:
    """Each flag OR-ed over the ranks (a no-op for one process)."""
    agreed = tuple(distributed.any_over(group, list(flags)))
    return agreed if len(agreed) > 1 else agreed[0]


def _flags(group, exhausted: bool, bad: bool, interrupt: GracefulStop) -> tuple[bool, bool, bool]:
    """(data ran out, batch not finite, stop requested), agreed by every rank so that all take the same
    branch (one rank skipping or stopping alone would leave the others waiting in a collective)."""
    exhausted, bad, stop = _any_rank(group, exhausted, bad, interrupt.requested is not None)
    if stop and interrupt.requested is None:
        interrupt.requested = "a signal on another rank"
    return exhausted, bad, stop


class _DeviceCache:
    """The batch moved, cast to fp32 and normalised once per (device, site), shared by all trainers there."""

    def __init__(self, act: torch.Tensor | dict[str, torch.Tensor], norm_factor: float | None):
        self.act, self.norm_factor, self.cache = act, norm_factor, {}

    def on(self, device: torch.device, key: str | int | None = None) -> torch.Tensor:
        if (device, key) not in self.cache:
            x = _select(self.act, key)
            parts = [t.to(device, non_blocking=True).float() for t in (x if isinstance(x, (tuple, list)) else [x])]
            parts = [t / self.norm_factor if self.norm_factor is not None else t for t in parts]
            self.cache[(device, key)] = tuple(parts) if isinstance(x, (tuple, list)) else parts[0]
        return self.cache[(device, key)]


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=resolve_device(device).type, dtype=dtype)


def _restore(trainers: list[SAETrainer], states: list[dict]) -> None:
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
