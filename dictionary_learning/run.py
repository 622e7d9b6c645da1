"""A training run's folder and the events around its steps: one writer, atomic backups, signals, NaNs.

Layout under `save_dir` (the reference's `trainer_{i}` folders, plus what a resume needs):

    .dictionary_learning.lock            held by the one process writing the run (see safe_io.FolderLock)
    resume.json                          the last complete backup: its step, data position and files
    trainer_{i}/config.json              {"trainer": ..., "buffer": ..., "sha256": {file: digest}, ...}
    trainer_{i}/ae.pt                    latest weights (final, or at the last backup), normalisation folded in
    trainer_{i}/checkpoints/ae_{s}.pt    weights before step s, normalisation folded in
    trainer_{i}/resume_{s}.pt            trainer i's full training state after s steps

A backup writes every trainer's `resume_{s}.pt` first, then `resume.json` naming them with their
sha256 (the one rename that commits the backup), then removes the previous backup's files. A kill
at any instant leaves `resume.json` naming a complete set from one step, so a resumed run
continues every trainer from the same step and batch.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .checkpoint import (
    CheckpointError,
    atomic_torch_save,
    read_config,
    save_dictionary,
    save_recorded,
    torch_load_checked,
    write_config,
)
from .distributed import Group
from .safe_io import FolderLock, atomic_write_json, remove_dead_temporaries

logger = logging.getLogger(__name__)

RESUME_INDEX = "resume.json"
LEGACY_RESUME_FILE = "resume.pt"  # one per trainer, written by versions before the index
RESUME_FORMAT = 2
MAX_CONSECUTIVE_BAD_BATCHES = 100


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C, SIGTERM or SIGUSR1 after saving a resumable state."""


class NonFiniteTrainingError(FloatingPointError):
    """A loss or weight became NaN/Inf; nothing from that step on was written."""


# --------------------------------------------------------------------------------------------- signals
class GracefulStop:
    """The first Ctrl-C, SIGTERM (what SLURM and Kubernetes send before preempting) or SIGUSR1
    (SLURM's `--signal`) asks the run to finish its step, save and stop; a second one aborts at once."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped at once, without saving")
        self.requested = signal.Signals(signum).name
        logger.warning(
            "%s received: saving after this step (send it again to stop at once)", signal.Signals(signum).name
        )

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


# ------------------------------------------------------------------------------------------ NaN guard
class NumericGuard:
    """Notices the first step at which a trainer's loss or weights stop being finite.

    The flags stay on the trainers' devices and are read by `check` (before every write, and every
    `check_every` steps), so a GPU step waits for no host transfer."""

    def __init__(self, trainers: list, indices: list[int]):
        self.trainers, self.indices = trainers, indices
        self.first_bad = [torch.full((), -1, dtype=torch.long, device=t.device) for t in trainers]
        self.last_loss = [torch.zeros((), device=t.device) for t in trainers]

    def record(self, position: int, step: int, loss: torch.Tensor) -> None:
        trainer = self.trainers[position]
        sums = torch.stack([p.detach().float().sum() for p in trainer.ae.parameters()])
        finite = torch.isfinite(loss).all() & torch.isfinite(sums).all()
        bad = self.first_bad[position]
        self.first_bad[position] = torch.where(~finite & (bad < 0), step, bad)
        self.last_loss[position] = torch.where(bad < 0, loss.detach().float(), self.last_loss[position])

    def check(self, last_backup: str) -> None:
        for position, bad in enumerate(self.first_bad):
            step = int(bad)
            if step >= 0:
                trainer = self.trainers[position]
                raise NonFiniteTrainingError(
                    f"trainer {self.indices[position]} ({type(trainer).__name__}): the loss or the weights became "
                    f"NaN/Inf at step {step} (loss {float(self.last_loss[position]):.4g}); training stopped and "
                    f"nothing from that step on was written ({last_backup}). Likely causes: a learning rate or "
                    f"penalty too large or not a number, or activations of extreme scale (normalize_activations=True)"
                )


def norm_factor_of(batches: list[torch.Tensor], group: Group | None = None) -> float:
    """Scale s such that x / s has unit mean squared norm (Anthropic's normalisation, see
    arXiv 2408.05147 section 3.1): `s = sqrt(mean over rows of ||x||^2)`, over every rank's rows.

    Batches with NaN/Inf values (which trainSAE skips) and all-zero batches are left out; if none is
    left, or the factor is not a positive finite number, it raises ValueError."""
    if batches and isinstance(batches[0], dict):
        raise NotImplementedError("normalize_activations with several sites per batch is not supported yet")
    total, rows, left_out = torch.zeros((), dtype=torch.float64), 0, 0
    for b in batches:
        parts = b if isinstance(b, (tuple, list)) else [b]  # a transcoder's (input, output) pair: one factor
        sq = torch.cat([p.reshape(-1, p.shape[-1]).double().pow(2).sum(-1) for p in parts])
        if sq.numel() == 0 or not bool(torch.isfinite(sq).all()) or not bool((sq > 0).any()):
            left_out += 1
            continue
        total, rows = total + sq.sum(), rows + sq.numel()
    sums = torch.stack([total, torch.tensor(float(rows), dtype=torch.float64)])
    if group is not None and group.mode == "data":
        sums = distributed.sum_(sums)  # trainSAE runs this inside distributed.active(group)
    factor = float((sums[0] / sums[1]).sqrt()) if sums[1] > 0 else float("nan")
    if not factor > 0 or factor == float("inf"):
        raise ValueError(
            f"cannot measure the activation norm factor: {left_out} of {len(batches)} normalisation batches were "
            f"NaN/Inf or all zeros, and the rest give {factor}. Check the data, or raise norm_factor_batches"
        )
    if left_out:
        logger.warning("norm factor: %d of %d batches were NaN/Inf or all zeros and left out", left_out, len(batches))
    return factor


# ------------------------------------------------------------------------------------------ the folder
class RunFolder:
    """The files of one run; every method is a no-op when `save_dir` is None or this rank writes
    nothing (a data-parallel replica other than rank 0).

    `open` takes the folder's lock (rank 0), removes temporaries of writers that died, and, for a
    new run, refuses a folder that holds another run unless `overwrite` (which removes it first).
    """

    def __init__(self, save_dir: str | Path | None, group: Group | None, safetensors: bool = False):
        self.root = Path(save_dir) if save_dir is not None else None
        self.group, self.safetensors = group, safetensors
        self.dirs: list[Path] = []
        self.lock: FolderLock | None = None
        self.last_backup: int | None = None

    def attach(self, indices: list[int], writes: bool) -> None:
        """The trainers this process writes: `trainer_{i}` for each of `indices` (none if not `writes`)."""
        self.dirs = [self.root / f"trainer_{i}" for i in indices] if self.root is not None and writes else []

    def open(self, resuming: bool, overwrite: bool) -> None:
        if self.root is None:
            return

        def take() -> None:
            self.lock = FolderLock(self.root, "trainSAE run").acquire()
            remove_dead_temporaries(self.root)
            if resuming:
                return
            previous = previous_run_files(self.root)
            if previous and not overwrite:
                self.close()
                shown = ", ".join(p.name for p in previous[:4]) + (", ..." if len(previous) > 4 else "")
                raise FileExistsError(
                    f"{self.root} already holds a run ({shown}): pass overwrite=True to replace it, "
                    f"resume_from={str(self.root)!r} to continue it, or choose another save_dir"
                )
            for path in previous:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

        distributed.on_main(self.group, take)
        distributed.barrier(self.group)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def describe_last_backup(self) -> str:
        if self.root is None:
            return "no save_dir was given"
        if self.last_backup is None:
            return f"{self.root} holds no backup of this run"
        return f"the last good state, after step {self.last_backup}, is in {self.root}; resume_from continues it"

    # ---------------------------------------------------------------------------------------- writing
    @staticmethod
    def configs(
        trainers: list, records: dict[str, Any], norm_factor: float | None, sites: list[dict] | None = None
    ) -> list[dict[str, Any]]:
        """Each trainer's config.json: its trainer config, the run's records, and its site."""
        configs = []
        for i, trainer in enumerate(trainers):
            config: dict[str, Any] = {"trainer": trainer.config} | ({"site": sites[i]} if sites else {})
            if norm_factor is not None:
                config["trainer"]["norm_factor"] = norm_factor  # already folded into the saved weights
            configs.append(config | records)
        return configs

    def write_configs(self, configs: list[dict[str, Any]]) -> None:
        """Write each trainer's config.json (before any weights: the run's start)."""
        for folder, config in zip(self.dirs, configs):
            write_config(config, folder)

    def save_weights(
        self, trainers: list, norm_factor: float | None, step: int | None = None, configs: list[dict] | None = None
    ) -> None:
        """`ae.pt` (or with `step`, `checkpoints/ae_{step}.pt`), normalisation folded in; with
        `configs`, config.json becomes those (written once, with the weights' checksum)."""
        for i, (folder, trainer) in enumerate(zip(self.dirs, trainers)):
            scale = norm_factor or 1.0
            if step is None:
                config = configs[i] if configs is not None else read_config(folder)
                save_dictionary(trainer.ae, folder, config, self.safetensors, bias_scale=scale)
            else:
                save_recorded(trainer.ae.scaled_state_dict(scale), folder, f"checkpoints/ae_{step}.pt")

    def save_backup(self, trainers: list, next_step: int, consumed: int, run_state: dict[str, Any]) -> None:
        """Every trainer's state after `next_step` steps, committed as one unit by `resume.json`."""
        if self.root is None:
            return
        written = {}
        for folder, trainer in zip(self.dirs, trainers):
            state = {
                "format": RESUME_FORMAT,
                "trainer": trainer.state_dict(),
                "config": trainer.config,
                "next_step": next_step,
                "batches_consumed": consumed,
                **run_state,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
            name = f"{folder.name}/resume_{next_step}.pt"
            written[folder.name] = {"file": name, "sha256": atomic_torch_save(state, self.root / name)}
        for part in distributed.gather_objects(self.group if self._every_rank_writes() else None, written):
            written |= part

        def commit() -> None:
            if not written:
                return
            ordered = sorted(written.items(), key=lambda kv: int(kv[0].split("_")[1]))
            index = {"format": RESUME_FORMAT, "next_step": next_step, "batches_consumed": consumed}
            atomic_write_json(index | {"trainers": [entry for _, entry in ordered]}, self.root / RESUME_INDEX)

        distributed.on_main(self.group, commit)
        distributed.barrier(self.group)
        for folder in self.dirs:  # the previous backup is no longer needed
            for old in folder.glob("resume_*.pt"):
                if old.name != f"resume_{next_step}.pt":
                    old.unlink(missing_ok=True)
            (folder / LEGACY_RESUME_FILE).unlink(missing_ok=True)
        self.last_backup = next_step

    def _every_rank_writes(self) -> bool:
        return self.group is not None and self.group.mode == "trainers"


def previous_run_files(root: Path) -> list[Path]:
    """What a run leaves in its folder (trainer_* folders, the resume index), oldest layout included."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("trainer_") and p.name[8:].isdigit()]
    if (root / RESUME_INDEX).exists():
        found.append(root / RESUME_INDEX)
    return sorted(found)


# ------------------------------------------------------------------------------------------- resuming
# Entries of a data source's record that may change between a run and its resume: where the data
# lives on this machine, and the state that `load_state_dict` restores rather than compares.
_MAY_DIFFER_ON_RESUME = {"device", "cache", "seed", "shuffle"}


def data_record(data: Any) -> dict[str, Any]:
    """What a backup keeps of the data source: its record (`config`) and the random state it owns
    (`state_dict()`: a buffer's shuffle seed, a cache reader's order), for `restore_data_state`."""
    from .trainers.trainer import jsonable

    config = getattr(data, "config", None)
    state = data.state_dict() if callable(getattr(data, "state_dict", None)) else None
    return {"config": jsonable(config) if isinstance(config, dict) else None, "state": state}


def not_replayable(data: Any) -> str | None:
    """Why a resumed run could not read `data`'s batches again exactly (a source's `replay_problem`;
    None when it can, or does not say)."""
    return getattr(data, "replay_problem", None)


def restore_data_state(data: Any, saved: dict[str, Any] | None) -> None:
    """Before a resumed run reads its first batch: refuse a data source that differs from the one
    the run was trained on (its recorded settings) or that cannot serve the same batches again,
    and give it back the random state it had (`load_state_dict`). Backups of earlier versions
    recorded nothing: nothing is checked."""
    if saved is None:
        return
    state = saved.get("state")
    if isinstance(state, dict) and state.get("not_replayable"):
        raise ValueError(f"this run cannot be resumed exactly: {state['not_replayable']}")
    config, recorded = getattr(data, "config", None), saved.get("config")
    if isinstance(config, dict) and isinstance(recorded, dict):
        from .trainers.trainer import jsonable

        now = jsonable(config)
        keys = (set(now) | set(recorded)) - _MAY_DIFFER_ON_RESUME
        differing = sorted(k for k in keys if now.get(k) != recorded.get(k))
        if differing:
            shown = "; ".join(f"{k}: {recorded.get(k)!r} then, {now.get(k)!r} now" for k in differing[:4])
            raise ValueError(
                f"the data source differs from the one the run was trained on ({shown}): resume with the same "
                f"data and settings, or start a new run"
            )
    if state is not None:
        if not callable(getattr(data, "load_state_dict", None)):
            raise ValueError(
                f"the run was trained on a data source with a random state ({sorted(state)}) but is resumed with "
                f"{type(data).__name__}, which cannot take it: resume with the same kind of data source"
            )
        data.load_state_dict(state)


def load_backup(resume_from: str | Path) -> list[dict]:
    """Every trainer's state from the last complete backup of a run folder, checked: each file
    against the sha256 that `resume.json` records, and all of them from the same step."""
    root = Path(resume_from)
    index_path = root / RESUME_INDEX
    if index_path.is_file():
        index = read_config(root, RESUME_INDEX)
        entries = index.get("trainers")
        if index.get("format") != RESUME_FORMAT or not isinstance(entries, list) or not entries:
            raise CheckpointError(f"{index_path} is not a resume index of this library (format {RESUME_FORMAT})")
        states = [torch_load_checked(root / e["file"], {e["sha256"]}) for e in entries]
        expected = index.get("next_step")
    else:
        folders = sorted(root.glob("trainer_*"), key=lambda p: int(p.name.split("_")[1]))
        if not folders:
            raise FileNotFoundError(f"cannot resume: {root} holds no trainer_* folders")
        missing = [f / LEGACY_RESUME_FILE for f in folders if not (f / LEGACY_RESUME_FILE).is_file()]
        if missing:
            raise FileNotFoundError(
                f"cannot resume: {root} has no {RESUME_INDEX} and {missing[0]} does not exist "
                f"(was the run saved with save_dir, and did it reach a backup?)"
            )
        states = [torch_load_checked(f / LEGACY_RESUME_FILE) for f in folders]
        expected = states[0].get("next_step")
    steps = [s.get("next_step") if isinstance(s, dict) else None for s in states]
    if any(step != expected for step in steps):
        raise CheckpointError(
            f"{root}: the trainers' resume states are from different steps ({steps}); this backup was interrupted "
            f"before every trainer was written and cannot be resumed consistently. Restart the run"
        )
    return states
