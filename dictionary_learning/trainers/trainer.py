"""The one training step, written once: every trainer is a loss plus a few hooks on `SAETrainer`.

`SAETrainer.update` does zero_grad, loss, backward, the decoder-norm constraint (gradient projection
and renormalisation), clipping, the optimizer and LR-schedule steps, then the trainer's hooks
(dead-latent counters, thresholds, resampling, k-annealing). `loss(x, step, logging=True)` is pure:
logging never changes training.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch

from .. import distributed, ops, sparse
from ..dictionaries.base import DICTIONARY_REGISTRY, Dictionary, feature_first
from ..ops import remove_parallel_grad_, unit_norm_rows_
from ..sparse import SparseCode

TRAINER_REGISTRY: dict[str, type[SAETrainer]] = {}


def register_trainer(cls: type[SAETrainer]) -> type[SAETrainer]:
    """Class decorator: make a trainer known to trainSAE's config checks, resume and the CLI."""
    TRAINER_REGISTRY[cls.__name__] = cls
    return cls


# ------------------------------------------------------------------------------------------ schedules
def get_lr_schedule(
    total_steps: int,
    warmup_steps: int,
    decay_start: int | None = None,
    resample_steps: int | None = None,
    sparsity_warmup_steps: int | None = None,
) -> Callable[[int], float]:
    """LR multiplier for step s: linear warmup, then 1, then linear decay to 0 from `decay_start`.

    With `resample_steps`, the warmup restarts after every resampling period instead.
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be >= 0 and < steps={total_steps}; lower warmup_steps or train longer"
        )
    if decay_start is not None:
        if resample_steps is not None:
            raise ValueError("decay_start cannot be combined with resample_steps")
        if not warmup_steps < decay_start < total_steps:
            raise ValueError(f"decay_start={decay_start} must lie between warmup_steps={warmup_steps} and steps")
        if sparsity_warmup_steps is not None and decay_start <= sparsity_warmup_steps:
            raise ValueError(f"decay_start={decay_start} must be > sparsity_warmup_steps={sparsity_warmup_steps}")
    if resample_steps is not None and not 0 < resample_steps < total_steps:
        raise ValueError(f"resample_steps={resample_steps} must be > 0 and < steps={total_steps}")

    def schedule(s: int) -> float:
        if s > total_steps:  # LambdaLR asks for step `steps` after the last update, never beyond
            raise ValueError(
                f"learning-rate schedule asked for step {s}, past the {total_steps} steps it was laid out for: "
                f"a run cannot continue past its steps (start a new run with more steps)"
            )
        if resample_steps is not None:
            factor = min((s % resample_steps) / warmup_steps, 1.0) if warmup_steps else 1.0
        elif s < warmup_steps:
            factor = s / warmup_steps
        elif decay_start is not None and s >= decay_start:
            factor = (total_steps - s) / (total_steps - decay_start)
        else:
            factor = 1.0
        assert 0.0 <= factor <= 1.0, f"learning-rate factor {factor} at step {s} is outside [0, 1]"
        return factor

    return schedule


def get_sparsity_warmup_fn(total_steps: int, sparsity_warmup_steps: int | None = None) -> Callable[[int], float]:
    """Multiplier of the sparsity penalty: ramps linearly from 0 to 1 over `sparsity_warmup_steps`."""
    if sparsity_warmup_steps is not None and not 0 <= sparsity_warmup_steps < total_steps:
        raise ValueError(f"sparsity_warmup_steps={sparsity_warmup_steps} must be >= 0 and < steps={total_steps}")
    if not sparsity_warmup_steps:
        return lambda s: 1.0
    return lambda s: min(s / sparsity_warmup_steps, 1.0)


# -------------------------------------------------------------------- decoder helpers (reference API)
def _check_decoder_shape(W_dec_DF: torch.Tensor, activation_dim: int, d_sae: int) -> None:
    if tuple(W_dec_DF.shape) != (activation_dim, d_sae):
        expected = (activation_dim, d_sae)
        raise ValueError(f"decoder shape {tuple(W_dec_DF.shape)} != (activation_dim, d_sae) = {expected}")


def set_decoder_norm_to_unit_norm(W_dec_DF: torch.Tensor, activation_dim: int, d_sae: int) -> torch.Tensor:
    """Unit-norm columns of a `[D, F]` decoder, in place (the reference's helper, same signature)."""
    _check_decoder_shape(W_dec_DF, activation_dim, d_sae)
    return unit_norm_rows_(W_dec_DF.data.T).T


def remove_gradient_parallel_to_decoder_directions(
    W_dec_DF: torch.Tensor, W_dec_DF_grad: torch.Tensor, activation_dim: int, d_sae: int
) -> torch.Tensor:
    """Project out each column's parallel gradient component, in place (reference signature)."""
    _check_decoder_shape(W_dec_DF, activation_dim, d_sae)
    return remove_parallel_grad_(W_dec_DF.data.T, W_dec_DF_grad.T).T


def adam(
    params: Iterable, constrained: Iterable = (), max_grad_norm: float | None = None, **kwargs: Any
) -> ConstrainedAdam:
    """The optimizer of every recipe: `ConstrainedAdam` on the fused kernel (one pass over all
    parameters instead of a Python loop of small ops, which dominates small dictionaries' steps)."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return ConstrainedAdam(params, constrained, fused=fused, max_grad_norm=max_grad_norm, **kwargs)


class ConstrainedAdam(torch.optim.Adam):
    """Adam that keeps each feature direction of `constrained_params` at unit norm: the one
    implementation of the decoder-norm constraint.

    Entries are parameters (Linear-style `[D, F]` decoders, a feature is a column, as in the
    reference) or `(parameter, feature_dim)` pairs. Each step removes the gradient component
    parallel to each feature direction, clips the gradient norm of all parameters to
    `max_grad_norm` when given (after the projection, as the reference's TopK and JumpReLU trainers
    do), takes the Adam step, and renormalises the directions.
    """

    def __init__(
        self,
        params: Iterable,
        constrained_params: Iterable,
        lr: float,
        betas=(0.9, 0.999),
        max_grad_norm: float | None = None,
        **kwargs,
    ):
        super().__init__(params, lr=lr, betas=betas, **kwargs)
        self.constrained_params = [p if isinstance(p, tuple) else (p, 1) for p in constrained_params]
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):
        for p, dim in self.constrained_params:
            if p.grad is not None:
                remove_parallel_grad_(feature_first(p.data, dim), feature_first(p.grad, dim))
        if self.max_grad_norm is not None:
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        loss = super().step(closure)
        for p, dim in self.constrained_params:
            unit_norm_rows_(feature_first(p.data, dim))
        return loss


# -------------------------------------------------------------------------------------- trainer base
class LossLog(NamedTuple):
    """What `loss(x, step, logging=True)` returns; unpacks like the reference's 4-tuple."""

    x: torch.Tensor
    x_hat: torch.Tensor
    f: torch.Tensor
    losses: dict[str, float]


@dataclass
class StepOutput:
    """One forward pass: the loss, its parts for logging, and what the state hooks need."""

    loss: torch.Tensor
    x_hat: torch.Tensor
    f: torch.Tensor | SparseCode  # `[..., F]` or, on a sparse path, the kept entries of `[B, F]`
    losses: dict[str, Any]
    commit: dict[str, Any] = field(default_factory=dict)


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


def _takes_number(param: inspect.Parameter) -> bool:
    """Whether a constructor parameter takes a plain number (its default, or an annotation made only
    of int, float and None)."""
    default = param.default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return True
    annotation = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", "")
    words = set(re.findall(r"[A-Za-z_]+", annotation or ""))
    return bool(words) and words <= {"int", "float", "None", "Optional"} and bool(words & {"int", "float"})


def resolve_device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SAETrainer:
    """Base of every training recipe. Subclasses implement `_compute` and set the class flags."""

    # Attributes saved for resume besides ae/optimizer/scheduler.
    state_attrs: ClassVar[tuple[str, ...]] = ()
    logging_parameters: ClassVar[list[str]] = []
    # The logged loss term that is the reconstruction error at the site (reweighted by e2e training).
    reconstruction_term: ClassVar[str] = "l2_loss"
    # Train on the non-zero features only: the TopK family always, the L1/JumpReLU/Gated recipes on
    # CPU when few fire (`sparse.SPARSE_MAX_DENSITY`).
    sparse: bool = False

    ae: Dictionary
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap each subclass `__init__` so that its arguments become the trainer's config record."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if not hasattr(self, "_init_args"):
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                self._init_args = {k: v for k, v in bound.arguments.items() if k != "self"}
            init(self, *args, **kw)

        cls.__init__ = recording_init

    def __init__(self, seed: int | None = None):
        """The reference's base constructor, for trainers written against it; ours call `_setup`."""
        self.seed = seed
        self.steps_done = 0

    # ------------------------------------------------------------------------------------ setup
    def _setup(self, seed, device, dict_class, *dict_args, **dict_kwargs) -> None:
        """Seed, choose the device and build the dictionary (seeded before construction)."""
        SAETrainer.__init__(self, seed)
        if seed is not None:
            torch.manual_seed(seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(seed)
        self.device = resolve_device(device)
        if isinstance(dict_class, str):
            dict_class = DICTIONARY_REGISTRY[dict_class]
        self.ae = dict_class(*dict_args, **dict_kwargs).to(self.device)

    def _decoder_constraint(self) -> list[tuple[torch.nn.Parameter, int]]:
        """What ConstrainedAdam keeps at unit norm: the decoder, with its feature dimension."""
        name, dim = self.ae.layout.decoder
        return [(self.ae.get_parameter(name), dim)]

    def _set_schedule(self, lr_lambda: Callable[[int], float]) -> None:
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=lr_lambda)

    @classmethod
    def config_keys(cls) -> list[str]:
        """The constructor arguments a config dict may contain."""
        params = inspect.signature(cls.__init__).parameters
        return [name for name, p in params.items() if name != "self" and p.kind is not p.VAR_KEYWORD]

    @classmethod
    def check_config_keys(cls, keys: Iterable[str]) -> None:
        """Raise a TypeError naming unknown keys, their likely intended spelling and the valid ones."""
        valid = cls.config_keys()
        unknown = [k for k in keys if k not in valid]
        if unknown:
            hints = [
                f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1)) else repr(k)
                for k in unknown
            ]
            raise TypeError(
                f"{cls.__name__} got unknown config keys {', '.join(hints)}; valid keys: {', '.join(valid)}"
            )

    @classmethod
    def check_config_values(cls, config: dict[str, Any]) -> None:
        """Raise a clear error for a value that cannot be right whatever the recipe: text or a list
        where the constructor takes a number, or a number that is NaN/Inf."""
        params = inspect.signature(cls.__init__).parameters
        for key, value in config.items():
            param = params.get(key)
            if param is None or value is None or isinstance(value, bool):
                continue
            if _takes_number(param) and not isinstance(value, (int, float)):
                raise TypeError(
                    f"{cls.__name__}: {key} must be a number, got {value!r} ({type(value).__name__}); "
                    f"e.g. {key}={param.default if param.default not in (None, inspect.Parameter.empty) else 1e-3}"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{cls.__name__}: {key}={value} is not a finite number")

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable record of every constructor argument, plus resolved values."""
        cfg: dict[str, Any] = {"trainer_class": type(self).__name__}
        cfg |= {k: jsonable(v) for k, v in self._init_args.items()}
        cfg |= jsonable(self._resolved_config())
        cfg["dict_class"] = type(self.ae).__name__
        cfg["device"] = str(self.device)
        return cfg

    def _resolved_config(self) -> dict[str, Any]:
        """Values computed in the constructor that belong in the config (e.g. a default lr)."""
        return {}

    @property
    def max_density(self) -> float:
        """Feature density below which a step takes the sparse path (0: never)."""
        return sparse.SPARSE_MAX_DENSITY if self.sparse else 0.0

    def get_logging_parameters(self) -> dict[str, Any]:
        """Current values of the trainer's `logging_parameters` (the reference's API)."""
        return {name: getattr(self, name) for name in self.logging_parameters}

    # ------------------------------------------------------------------------- the training step
    def _compute(self, x: torch.Tensor, step: int | None) -> StepOutput:
        """Forward pass and loss. Must not change any state."""
        raise NotImplementedError

    def _prepare(self, step: int, x: torch.Tensor) -> None:
        """Hook before the forward pass (e.g. data-dependent initialisation, current k)."""

    def _commit(self, out: StepOutput, step: int) -> None:
        """Hook after the forward pass: update counters and statistics from `out.commit`."""

    def _after_step(self, step: int, x: torch.Tensor) -> None:
        """Hook after the optimizer step (e.g. resampling)."""

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False):
        """The training loss on `x` (scalar), or with `logging=True` a `LossLog(x, x_hat, f, losses)`."""
        x = x.to(self.device)
        if not logging:
            return self._compute(x, step).loss
        with torch.no_grad():
            out = self._compute(x, step)
        losses = {k: float(v) for k, v in out.losses.items()}
        f = out.f.to_dense() if isinstance(out.f, SparseCode) else out.f
        return LossLog(x, out.x_hat, f.view(*x.shape[:-1], -1), losses)

    def update(
        self, step: int, activations: torch.Tensor, extra_loss: Callable[[StepOutput], tuple] | None = None
    ) -> torch.Tensor:
        """One optimisation step on a batch `[B, D]`; returns the (detached) loss without a host sync.

        `extra_loss(out) -> (loss, logs)` replaces the trainer's loss by another built from its
        forward output (e2e training); its logs are kept in `extra_logs` for logging."""
        x = activations.to(self.device)
        self._prepare(step, x)
        out = self._compute(x, step)
        loss = out.loss
        if extra_loss is not None:
            loss, self.extra_logs = extra_loss(out)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.ae.parameters(), x.numel() // x.shape[-1])
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


# ------------------------------------------------------------------------------------- resampling
@torch.no_grad()
def resample_dead_features(
    ae: Dictionary, optimizer: torch.optim.Optimizer, dead_F: torch.Tensor, x_BD: torch.Tensor
) -> torch.Tensor:
    """Re-initialise dead features from badly reconstructed inputs (Bricken et al. 2023, "Towards
    Monosemanticity", neuron resampling); returns the indices of the resampled features.

    Rows of the batch are drawn without replacement with probability proportional to their
    reconstruction error ||x - x_hat||. Each dead feature f (the first min(#dead, B) by index)
    gets decoder direction v/||v|| and encoder direction v * 0.2 * (mean encoder norm of alive
    features); its feature-indexed biases and its Adam moments are zeroed. Works for any
    architecture through its `FeatureLayout`.
    """
    dead_idx = dead_F.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return dead_idx
    x_BD = x_BD.reshape(-1, x_BD.shape[-1]).to(ae.decoder_FD().device)
    # All-zero inputs would give a zero direction: never draw them.
    err_B = (x_BD - ae(x_BD)).norm(dim=-1).float() * (x_BD.norm(dim=-1) > 0)
    if not bool(err_B.sum() > 0):
        err_B = (x_BD.norm(dim=-1) > 0).float() if bool((x_BD != 0).any()) else torch.ones_like(err_B)
    n = min(dead_idx.numel(), x_BD.shape[0])
    v_ND = x_BD[torch.multinomial(err_B, n, replacement=False)]
    dead_idx = dead_idx[:n]

    encoder_FD = ae.encoder_FD()
    alive_F = ~dead_F
    alive_norm = encoder_FD[alive_F].norm(dim=-1).mean() if bool(alive_F.any()) else torch.tensor(1.0)
    encoder_FD[dead_idx] = (v_ND * alive_norm * 0.2).to(encoder_FD.dtype)
    decoder_FD = ae.decoder_FD()
    decoder_FD[dead_idx] = (v_ND / v_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(decoder_FD.dtype)
    for name, dim in ae.layout.feature_biases:
        feature_first(ae.get_parameter(name).data, dim)[dead_idx] = 0.0

    for param, dim in ae.feature_parameters():
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                feature_first(state[key], dim)[dead_idx] = 0.0
    return dead_idx


class PenalisedTrainer(SAETrainer):
    """Trainers with an explicit sparsity penalty: ConstrainedAdam, sparsity warmup and resampling.

    Dead features are counted in steps (a feature silent on the whole batch gets +1) when
    `resample_steps` is set; every `resample_steps` steps those silent for more than half a period
    are resampled, and the LR warmup restarts.
    """

    state_attrs = ("steps_since_active", "resampled_features")
    reconstruction_term = "mse_loss"

    def _init_penalised(
        self,
        steps: int,
        lr: float,
        warmup_steps: int,
        sparsity_warmup_steps: int | None,
        decay_start: int | None,
        resample_steps: int | None,
        betas: tuple[float, float] = (0.9, 0.999),
        constrained: bool = True,
        max_grad_norm: float | None = None,
    ) -> None:
        self.steps = steps
        self.lr = lr
        self.resample_steps = resample_steps
        self.sparsity_warmup_fn = get_sparsity_warmup_fn(steps, sparsity_warmup_steps)
        lr_fn = get_lr_schedule(steps, warmup_steps, decay_start, resample_steps, sparsity_warmup_steps)
        constraint = self._decoder_constraint() if constrained else ()
        self.optimizer = adam(self.ae.parameters(), constraint, max_grad_norm, lr=lr, betas=betas)
        self._set_schedule(lr_fn)
        self.steps_since_active = (
            torch.zeros(self.ae.dict_size, dtype=torch.long, device=self.device) if resample_steps else None
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
            resampled = resample_dead_features(self.ae, self.optimizer, dead_F, x)
            distributed.broadcast_trainer_state(self)  # replicas drew different rows: keep rank 0's
            self.steps_since_active[resampled] = 0
            self.resampled_features += resampled.numel()

    def resample_neurons(self, deads: torch.Tensor, activations: torch.Tensor) -> None:
        """The reference's name for resampling the dead features `deads` (bool `[F]`) from `activations`."""
        resampled = resample_dead_features(self.ae, self.optimizer, deads, activations)
        if self.steps_since_active is not None:
            self.steps_since_active[resampled] = 0
        self.resampled_features += resampled.numel()
