"""RunConfig: every option of a training run besides its data and trainer configs, as one typed,
frozen record (`trainSAE` takes them as keywords, the reference's signature, and builds one)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .distributed import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from .e2e import E2EObjective

PARALLEL_MODES = ("data", "trainers")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How `trainSAE` runs; each field's docstring says what it does."""

    steps: int
    """optimisation steps (batches) to train for; the schedules are laid out over them"""
    use_wandb: bool = False
    """log each trainer to its own Weights & Biases run (needs the optional wandb package)"""
    wandb_entity: str = ""
    """the W&B entity (team or user)"""
    wandb_project: str = ""
    """the W&B project"""
    save_steps: list[int] | None = None
    """steps before which `checkpoints/ae_{step}.pt` is written"""
    save_dir: str | Path | None = None
    """the run's folder (layout in `run`): one writer at a time; a folder holding another run is
    refused unless `overwrite`"""
    log_steps: int | None = None
    """cadence of the progress-bar statistics, verbose lines and wandb (None: steps // 100)"""
    activations_split_by_head: bool = False
    """batches are `[B, n_heads, d]` (HeadActivationBuffer): trainer i trains on head i"""
    transcoder: bool = False
    """batches are a site's `[B, 2, d]` (input, output) rows or `(input, output)` pairs: every config
    becomes a transcoder"""
    run_cfg: dict | None = None
    """extra entries recorded in each config.json under "run" (and sent to wandb)"""
    normalize_activations: bool = False
    """divide inputs by a norm factor measured on the first `norm_factor_batches` batches; the
    factor is folded into the saved and returned weights"""
    verbose: bool = False
    """print the logged statistics"""
    device: str | None = None
    """device of the trainers whose config names none"""
    autocast_dtype: torch.dtype = torch.float32
    """mixed-precision dtype of the forward passes (master weights stay float32)"""
    backup_steps: int | None = None
    """cadence of the resumable backup (also written at save steps, at the end and on a signal)"""
    resume_from: str | Path | None = None
    """a previous save_dir: continue from its last complete backup (with the same steps)"""
    norm_factor_batches: int = 10
    """batches measured for the norm factor"""
    safetensors: bool = False
    """write the weights as model.safetensors instead of ae.pt"""
    progress: bool = True
    """show a progress bar"""
    e2e: E2EObjective | None = None
    """end-to-end training with the dictionaries spliced into the objective's model"""
    parallel: str = "data"
    """under torchrun: split each batch over the processes ("data") or the trainers ("trainers")"""
    dist_timeout: float = DEFAULT_TIMEOUT_S
    """seconds a collective may wait under torchrun before the run fails"""
    overwrite: bool = False
    """replace a run already in save_dir"""

    def __post_init__(self) -> None:
        if not _positive_int(self.steps):
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not _positive_int(self.norm_factor_batches):
            raise ValueError(f"norm_factor_batches must be a positive int, got {self.norm_factor_batches!r}")
        for name in ("backup_steps", "log_steps"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.transcoder and self.e2e is not None:
            raise ValueError("e2e training splices SAEs into the model: transcoder=True does not combine with e2e")
        if self.save_dir is None and self.resume_from is not None:
            object.__setattr__(self, "save_dir", self.resume_from)  # a resumed run writes where it was

    @property
    def resumes_in_place(self) -> bool:
        """Whether the run continues in the folder it resumes from."""
        if self.resume_from is None:
            return False
        return Path(self.save_dir).resolve() == Path(self.resume_from).resolve()

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def record(self) -> dict[str, Any]:
        """The options as plain values (for logs and tests)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
