"""The one training step, written once: every trainer is a loss plus a few hooks on `SAETrainer`.

A step (`SAETrainer.update`) reads top to bottom: move the batch, the recipe's `_prepare` hook,
the recipe's `loss(x, step)` (a plain method of its own file that returns a `StepOutput`: the loss,
its parts, the code), zero_grad, backward, gradient averaging under torchrun, the optimizer step
(`optim.ConstrainedAdam`: decoder-norm constraint and clipping), the schedule step, then the
recipe's `_commit` (counters, thresholds from the step's output) and `_after_step` (resampling)
hooks. Configs live in `configs`, the optimizer in `optim`, schedules in `schedules`, resampling in
`resampling`, the batch layouts in `layout`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .. import distributed, ops, sparse
from ..dictionaries.base import DICTIONARY_REGISTRY, Dictionary
from ..sparse import SparseCode
from .configs import PenalisedConfig, TrainerConfig, TranscoderConfig  # noqa: F401
from .layout import BatchLayoutError
from .optim import (  # noqa: F401 (the reference's trainers.trainer names)
    ConstrainedAdam,
    adam,
    remove_gradient_parallel_to_decoder_directions,
    set_decoder_norm_to_unit_norm,
)
from .resampling import resample_dead_features
from .schedules import get_lr_schedule, get_sparsity_warmup_fn

TRAINER_REGISTRY: dict[str, type[SAETrainer]] = {}


def register_trainer(cls: type[SAETrainer]) -> type[SAETrainer]:
    """Class decorator: make a trainer known to trainSAE's config checks, resume and the CLI."""
    if issubclass(cls, RecipeTrainer):
        cls.Config.names()  # its positional order names every field once
    TRAINER_REGISTRY[cls.__name__] = cls
    return cls


@dataclass
class StepOutput:
    """What a recipe's `loss(x, step)` returns: the loss, its parts for logging, the code, and what
    the state hooks need (`commit`).

    Code written against the reference reads `trainer.loss(x, step)` as the scalar loss and
    `trainer.loss(x, step, logging=True)` as the tuple `(x, x_hat, f, losses)`; a StepOutput serves
    both: `backward()`, `item()`, `detach()` and `float()` are the loss's, and it unpacks into that
    tuple (f dense, losses as floats)."""

    loss: torch.Tensor
    x_hat: torch.Tensor
    f: torch.Tensor | SparseCode  # `[..., F]` or, on a sparse path, the kept entries of `[B, F]`
    losses: dict[str, Any]
    commit: dict[str, Any] = field(default_factory=dict)
    target: torch.Tensor = field(kw_only=True)  # what x_hat reconstructs: the batch, or a transcoder's output

    def dense_f(self) -> torch.Tensor:
        """The code as a dense tensor shaped like the target's rows: `[..., F]`."""
        f = self.f.to_dense() if isinstance(self.f, SparseCode) else self.f
        return f.reshape(*self.target.shape[:-1], -1)

    # ------------------------------------------------------------- the reference's return values
    def backward(self, *args: Any, **kwargs: Any) -> None:
        self.loss.backward(*args, **kwargs)

    def item(self) -> float:
        return self.loss.item()

    def detach(self) -> torch.Tensor:
        return self.loss.detach()

    def __float__(self) -> float:
        return float(self.loss)

    def __iter__(self) -> Iterator[Any]:
        losses = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in self.losses.items()}
        yield from (self.target, self.x_hat, self.dense_f(), losses)


def jsonable(value: Any) -> Any:
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def resolve_device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _SignatureOfConfig:
    """`inspect.signature(Trainer)` of a trainer built from its Config: the Config's fields in the
    reference's positional order (None, so inspect reads `__init__`, for a class with its own)."""

    def __get__(self, instance: Any, owner: type) -> inspect.Signature | None:
        if instance is not None:
            raise AttributeError("__signature__")
        return owner.Config.signature() if owner.__init__ is RecipeTrainer.__init__ else None


class SAETrainer:
    """Base of every training recipe: the one training step (`update`), the resume state and the
    config record. A recipe (`RecipeTrainer`) adds its Config, its `loss` and a few hooks."""

    # Attributes saved for resume besides ae/optimizer/scheduler.
    state_attrs: ClassVar[tuple[str, ...]] = ()
    logging_parameters: ClassVar[list[str]] = []
    # Train on the non-zero features only: the TopK family always, the L1/JumpReLU/Gated recipes on
    # CPU when few fire (`sparse.SPARSE_MAX_DENSITY`).
    sparse: bool = False

    ae: Dictionary
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device

    def __init__(self, seed: int | None = None):
        """The reference's base constructor, for trainers written against it."""
        self.seed = seed
        self.steps_done = 0

    def _set_schedule(self, lr_lambda: Callable[[int], float]) -> None:
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=lr_lambda)

    def _decoder_constraint(self) -> list[tuple[torch.nn.Parameter, int]]:
        """What ConstrainedAdam keeps at unit norm: the decoder, with its feature dimension."""
        name, dim = self.ae.layout.decoder
        return [(self.ae.get_parameter(name), dim)]

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable record of the trainer's settings (`{"trainer_class": ..., ...}`)."""
        return {"trainer_class": type(self).__name__, "dict_class": type(self.ae).__name__, "device": str(self.device)}

    @property
    def max_density(self) -> float:
        """Feature density below which a step takes the sparse path (0: never)."""
        return sparse.SPARSE_MAX_DENSITY if self.sparse else 0.0

    def get_logging_parameters(self) -> dict[str, Any]:
        """Current values of the trainer's `logging_parameters` (the reference's API)."""
        return {name: getattr(self, name) for name in self.logging_parameters}

    # ------------------------------------------------------------------------- the training step
    def input_and_target(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """What the dictionary encodes and what it reconstructs, from a batch of this trainer's
        layout (`batch_layout`): `(x, x)` for an SAE's `[B, D]`; for a transcoder the input and
        output halves of `[B, 2, D]` rows (the buffer's io="in_and_out"), or the two tensors of an
        `(input [B, D], output [B, D_out])` pair. Any other rank or width is refused (`BatchLayoutError`)."""
        ae, x = self.ae, _to_device(x, self.device)
        if not getattr(self, "transcoder", False):
            if not (isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[-1] == ae.activation_dim):
                raise BatchLayoutError(self, x)
            return x, x
        d_in, d_out = ae.activation_dim, getattr(ae, "output_dim", ae.activation_dim)
        if isinstance(x, (tuple, list)):
            ok = len(x) == 2 and all(isinstance(t, torch.Tensor) and t.ndim == 2 for t in x)
            if not ok or (x[0].shape[-1], x[1].shape[-1]) != (d_in, d_out) or x[0].shape[0] != x[1].shape[0]:
                raise BatchLayoutError(self, x)
            return x[0], x[1]
        if not (isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1] == 2 and d_in == d_out == x.shape[-1]):
            raise BatchLayoutError(self, x)
        return x[:, 0], x[:, 1]

    def batch_layout(self) -> str:
        """The batches this trainer takes, as errors name them."""
        ae = self.ae
        if not getattr(self, "transcoder", False):
            return f"[B, {ae.activation_dim}] activations"
        d_in, d_out = ae.activation_dim, getattr(ae, "output_dim", ae.activation_dim)
        rows = f"[B, 2, {d_in}] (input, output) rows or " if d_in == d_out else ""
        return f"{rows}(input [B, {d_in}], output [B, {d_out}]) pairs"

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, **kwargs: Any) -> StepOutput:
        """The recipe's forward pass and loss on a batch (the reference's signature; `logging` and
        other keywords change nothing: the `StepOutput` is also the reference's logging tuple).
        Changes no state. Each recipe defines it, first in its class, in its own file."""
        raise NotImplementedError(f"{type(self).__name__} defines no loss")

    def _prepare(self, step: int, x: torch.Tensor) -> None:
        """Hook before the forward pass (e.g. data-dependent initialisation, current k)."""

    def _commit(self, out: StepOutput, step: int) -> None:
        """Hook after the forward pass: update counters and statistics from `out.commit`."""

    def _after_step(self, step: int, x: torch.Tensor) -> None:
        """Hook after the optimizer step (e.g. resampling)."""

    def update(
        self, step: int, activations: torch.Tensor, extra_loss: Callable[[StepOutput], tuple] | None = None
    ) -> torch.Tensor:
        """One optimisation step on a batch `[B, D]`; returns the (detached) loss without a host sync.

        `extra_loss(out) -> (loss, logs)` replaces the trainer's loss by another built from its
        forward output (e2e training); its logs are kept in `extra_logs` for logging."""
        x = _to_device(activations, self.device)  # a tensor, or a transcoder's (input, output) pair
        self._prepare(step, x)
        out = self.loss(x, step)
        loss = out.loss
        if extra_loss is not None:
            loss, self.extra_logs = extra_loss(out)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        x_in = self.input_and_target(x)[0]
        distributed.average_gradients(self.ae.parameters(), x_in.numel() // x_in.shape[-1])
        self.optimizer.step()  # ConstrainedAdam: the decoder-norm constraint and clipping are its job
        self.scheduler.step()
        self._commit(out, step)
        self._after_step(step, x)
        self.steps_done = step + 1
        return loss.detach()

    # ------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: weights, optimizer, schedule, counters."""
        return {
            "ae": self.ae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": {name: getattr(self, name) for name in self.state_attrs},
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output, wherever it was saved; tensors move to this trainer's device."""
        self.ae.load_state_dict(state["ae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name, value in state["state"].items():
            setattr(self, name, _to_device(value, self.device))
        self.steps_done = state["steps_done"]


class RecipeTrainer(SAETrainer):
    """A trainer built from its `Config`: the constructor takes the Config's fields (positionally in
    the reference's order, or by keyword), seeds, builds the dictionary on the device, copies every
    field onto the trainer and calls the recipe's `setup(cfg)`."""

    Config: ClassVar[type[TrainerConfig]] = TrainerConfig
    __signature__ = _SignatureOfConfig()

    def __init__(self, *args: Any, **kwargs: Any):
        cfg = self.Config.from_call(type(self).__name__, args, kwargs)
        super().__init__(cfg.seed)
        self.cfg = cfg
        for name in cfg.names():
            setattr(self, name, getattr(cfg, name))
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(cfg.seed)
        self.device = resolve_device(cfg.device)
        dict_class = DICTIONARY_REGISTRY[cfg.dict_class] if isinstance(cfg.dict_class, str) else cfg.dict_class
        self.ae = dict_class(*self.dictionary_args(cfg), **self._transcoder_args(cfg, dict_class)).to(self.device)
        self.setup(cfg)

    def dictionary_args(self, cfg: TrainerConfig) -> tuple:
        """Positional arguments of the dictionary's constructor."""
        return cfg.activation_dim, cfg.dict_size

    def _transcoder_args(self, cfg: TrainerConfig, dict_class: type) -> dict[str, Any]:
        """The dictionary's transcoder keywords (none for an SAE)."""
        if not getattr(cfg, "transcoder", False):
            return {}
        if not getattr(dict_class, "can_transcode", False):
            raise ValueError(f"{dict_class.__name__} cannot be a transcoder: keep the recipe's default dict_class")
        return {"output_dim": cfg.output_dim, "transcoder": True, "skip_connection": cfg.skip_connection}

    def setup(self, cfg: TrainerConfig) -> None:
        """Build the optimizer, the schedule and the recipe's state."""
        raise NotImplementedError

    @classmethod
    def config_keys(cls) -> list[str]:
        """The constructor arguments a config dict may contain."""
        return cls.Config.names()

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable record of every constructor argument, plus resolved values."""
        record = {"trainer_class": type(self).__name__}
        record |= {name: jsonable(getattr(self.cfg, name)) for name in self.cfg.names()}
        record |= jsonable(self._resolved_config())
        return record | super().config

    def _resolved_config(self) -> dict[str, Any]:
        """Values computed in the constructor that belong in the config (e.g. a default lr)."""
        return {}


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def tokens_since_fired(counter_F: torch.Tensor, fired_F: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
    """Each latent's count of tokens since it last fired, after a batch of `n_rows` rows in which
    `fired_F` fired; under data-parallel training over every replica's rows. Also returns the
    number of tokens the batch counts for."""
    n_tokens = n_rows * distributed.world_size()
    return torch.where(distributed.any_(fired_F), 0, counter_F + n_tokens), n_tokens


def default_topk_lr(dict_size: int) -> float:
    """Learning-rate rule of Gao et al. 2024 (section 2.3 / appendix): 2e-4 scaled by 1/sqrt(F / 2^14)."""
    return 2e-4 / math.sqrt(dict_size / 2**14)


class PenalisedTrainer(RecipeTrainer):
    """Trainers with an explicit sparsity penalty: ConstrainedAdam, sparsity warmup and resampling.

    Dead features are counted in steps (a feature silent on the whole batch gets +1) when
    `resample_steps` is set; every `resample_steps` steps those silent for more than half a period
    are resampled, and the LR warmup restarts.
    """

    Config = PenalisedConfig
    state_attrs = ("steps_since_active", "resampled_features")
    # The optimizer: Adam's betas, whether the decoder is kept at unit norm, gradient clipping.
    betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    constrained: ClassVar[bool] = True
    max_grad_norm: ClassVar[float | None] = None

    def setup(self, cfg: PenalisedConfig) -> None:
        self.resample_steps = getattr(cfg, "resample_steps", None)
        self.sparsity_warmup_fn = get_sparsity_warmup_fn(cfg.steps, cfg.sparsity_warmup_steps)
        lr_fn = get_lr_schedule(
            cfg.steps, cfg.warmup_steps, cfg.decay_start, self.resample_steps, cfg.sparsity_warmup_steps
        )
        constraint = self._decoder_constraint() if self.constrained else ()
        self.optimizer = adam(self.ae.parameters(), constraint, self.max_grad_norm, lr=cfg.lr, betas=self.betas)
        self._set_schedule(lr_fn)
        self.steps_since_active = (
            torch.zeros(self.ae.dict_size, dtype=torch.long, device=self.device) if self.resample_steps else None
        )
        self.resampled_features = 0

    def sparsity_scale(self, step: int | None) -> float:
        return 1.0 if step is None else self.sparsity_warmup_fn(step)

    def _commit(self, out: StepOutput, step: int) -> None:
        if self.steps_since_active is not None:
            fired_F = distributed.any_(ops.fired_features(out.f))  # ReLU/gated features are >= 0
            self.steps_since_active = torch.where(fired_F, 0, self.steps_since_active + 1)

    def _after_step(self, step: int, x: torch.Tensor) -> None:
        if self.resample_steps is not None and step % self.resample_steps == 0:
            dead_F = self.steps_since_active > self.resample_steps / 2
            resampled = resample_dead_features(self.ae, self.optimizer, dead_F, *self.input_and_target(x))
            distributed.broadcast_trainer_state(self)  # replicas drew different rows: keep rank 0's
            self.steps_since_active[resampled] = 0
            self.resampled_features += resampled.numel()

    def resample_neurons(self, deads: torch.Tensor, activations: torch.Tensor) -> None:
        """The reference's name for resampling the dead features `deads` (bool `[F]`) from `activations`."""
        resampled = resample_dead_features(self.ae, self.optimizer, deads, activations)
        if self.steps_since_active is not None:
            self.steps_since_active[resampled] = 0
        self.resampled_features += resampled.numel()
