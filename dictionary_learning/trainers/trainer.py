"""The one training step, written once: every trainer is a loss plus a few hooks on `SAETrainer`.

`SAETrainer.update` does zero_grad, loss, backward, the decoder-norm constraint (gradient projection
and renormalisation), clipping, the optimizer and LR-schedule steps, then the trainer's hooks
(dead-latent counters, thresholds, resampling, k-annealing). `loss(x, step, logging=True)` is pure:
logging never changes training.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch

from .. import distributed, ops, sparse
from ..dictionaries.base import DICTIONARY_REGISTRY, Dictionary, feature_first
from ..ops import remove_parallel_grad_, unit_norm_rows_
from ..sparse import SparseCode

TRAINER_REGISTRY: dict[str, type[SAETrainer]] = {}


def register_trainer(cls: type[SAETrainer]) -> type[SAETrainer]:
    """Class decorator: make a trainer known to trainSAE's config checks, resume and the CLI."""
    if issubclass(cls, RecipeTrainer):
        cls.Config.names()  # its positional order names every field once
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
            f"warmup_steps={warmup_steps} must be >= 0 and < steps={total_steps}; lower warmup_steps (e.g. "
            f"warmup_steps={max(1, total_steps // 20)}, a twentieth of the run) or train longer"
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


# ------------------------------------------------------------------------------------ recipe configs
def _takes_number(default: Any, annotation: str) -> bool:
    """Whether a config field takes a plain number (its default, or an annotation made only of int,
    float and None)."""
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return True
    words = set(re.findall(r"[A-Za-z_]+", annotation or ""))
    return bool(words) and words <= {"int", "float", "None", "Optional"} and bool(words & {"int", "float"})


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """The fields every recipe shares; a recipe's Config inherits them, adds its own and sets its
    defaults. Each field's docstring is its `--help` text. `positional` is the order in which the
    trainer's constructor takes the fields positionally: the reference's order, so that code calling
    `StandardTrainer(steps, dim, size, layer, lm_name, ...)` positionally gets the same meaning here.
    Every field of a trainer is also an attribute of it (`trainer.lr`, `trainer.k`, ...), as in the
    reference."""

    positional: ClassVar[str] = ""

    steps: int
    """training steps; the learning-rate schedule is laid out over them"""
    activation_dim: int
    """width D of the activations"""
    dict_size: int
    """number of latents F"""
    layer: int | None = None
    """layer the activations come from (recorded in config.json)"""
    lm_name: str | None = None
    """model the activations come from (recorded in config.json)"""
    dict_class: type | str = Dictionary
    """the dictionary architecture (a class or its name)"""
    lr: float | None = None
    """Adam learning rate"""
    warmup_steps: int = 1000
    """steps of linear learning-rate warm-up from 0"""
    decay_start: int | None = None
    """step from which the learning rate decays linearly to 0 (None: no decay)"""
    seed: int | None = None
    """seed of the dictionary's initialisation"""
    device: str | None = None
    """device of the dictionary (None: CUDA when available, else CPU)"""
    wandb_name: str = "SAETrainer"
    """name of the run in Weights & Biases"""
    submodule_name: str | None = None
    """model submodule the activations come from (recorded in config.json)"""
    sparse: bool = True
    """train on the firing latents only when few fire (same values and gradients, faster)"""

    def __post_init__(self) -> None:
        self.check_values({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def names(cls) -> list[str]:
        """Every field, in the constructor's positional order."""
        order = cls.positional.split()
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(order) == fields, f"{cls.__name__}.positional must name each field once: {set(order) ^ fields}"
        return order

    @classmethod
    def from_call(cls, owner: str, args: tuple, kwargs: dict[str, Any]) -> TrainerConfig:
        """The config of a constructor call `owner(*args, **kwargs)`, with Python's own errors for a
        call that does not fit (too many positional arguments, a field given twice or missing) and
        `check_keys`' for an unknown keyword."""
        names = cls.names()
        if len(args) > len(names):
            raise TypeError(f"{owner}() takes at most {len(names)} positional arguments ({len(args)} given)")
        given = dict(zip(names, args))
        twice = sorted(set(given) & set(kwargs))
        if twice:
            raise TypeError(f"{owner}() got multiple values for argument {twice[0]!r}")
        cls.check_keys(owner, kwargs)
        missing = [f.name for f in dataclasses.fields(cls) if f.default is MISSING and f.name not in given | kwargs]
        if missing:
            raise TypeError(f"{owner}() missing required argument{'s' * (len(missing) > 1)}: {', '.join(missing)}")
        return cls(**given, **kwargs)

    @classmethod
    def check_keys(cls, owner: str, keys: Iterable[str]) -> None:
        """Raise a TypeError naming unknown keys, their likely intended spelling and the valid ones."""
        valid = cls.names()
        unknown = [k for k in keys if k not in valid]
        if unknown:
            hints = [
                f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1)) else repr(k)
                for k in unknown
            ]
            raise TypeError(f"{owner} got unknown config keys {', '.join(hints)}; valid keys: {', '.join(valid)}")

    @classmethod
    def check_values(cls, values: dict[str, Any], owner: str | None = None) -> None:
        """Raise a clear error for a value that cannot be right whatever the recipe: text or a list
        where the field takes a number, or a number that is NaN/Inf."""
        owner = owner or cls.__name__
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            f = fields.get(key)
            if f is None or value is None or isinstance(value, bool):
                continue
            annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            if _takes_number(f.default, annotation) and not isinstance(value, (int, float)):
                example = f.default if f.default not in (None, MISSING) else 1e-3
                raise TypeError(
                    f"{owner}: {key} must be a number, got {value!r} ({type(value).__name__}); e.g. {key}={example}"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{owner}: {key}={value} is not a finite number")

    @classmethod
    def signature(cls) -> inspect.Signature:
        """The constructor's signature: every field, positional-or-keyword, in `positional` order."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        params = [
            inspect.Parameter(
                name,
                kind,
                default=inspect.Parameter.empty if fields[name].default is MISSING else fields[name].default,
                annotation=fields[name].type,
            )
            for name in cls.names()
        ]
        return inspect.Signature(params)

    @classmethod
    def docs(cls) -> dict[str, str]:
        """Each field's docstring (the text below it in its class), for `--help`."""
        return _field_docs(cls)


@dataclass(frozen=True, kw_only=True)
class TranscoderConfig(TrainerConfig):
    """The transcoder fields of the recipes that train transcoders (TopK, BatchTopK, Standard, JumpReLU)."""

    transcoder: bool = False
    """train a transcoder: encode the input half of each [B, 2, d] batch (or (input, output) pair)
    and reconstruct the output half, with an input bias of its own"""
    output_dim: int | None = None
    """a transcoder's output width (default: activation_dim)"""
    skip_connection: bool = False
    """a transcoder with a learned linear skip path W_skip [d_in, d_out] from input to output (zero init)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.skip_connection or self.output_dim not in (None, self.activation_dim)) and not self.transcoder:
            raise ValueError("skip_connection and output_dim are transcoder options: set transcoder=True")


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (a frozen or .pyc-only install)
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, after in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


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
    target: torch.Tensor | None = None  # what x_hat reconstructs when it is not x (a transcoder's output)


def describe_batch(x: Any) -> str:
    """A batch's shape as errors name it: `[8, 2, 16]`, `a pair of [8, 16] and [9, 32]`, or its type."""
    if isinstance(x, torch.Tensor):
        return str(list(x.shape))
    if isinstance(x, (tuple, list)):
        parts = [str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in x]
        return f"a {len(x)}-tuple of {' and '.join(parts)}"
    return type(x).__name__


class BatchLayoutError(ValueError):
    """A batch whose rank or dimensions are not the layout its trainer takes: the message names
    both, what the batch looks like it holds, and the fix."""

    def __init__(self, trainer: Any, x: Any, fix: str | None = None, where: str = ""):
        self.trainer, self.x, self.fix = trainer, x, fix or layout_hint(trainer, x)
        super().__init__(
            f"{where}{type(trainer).__name__} takes {trainer.batch_layout()}, but the data yields "
            f"{describe_batch(x)}: {self.fix}"
        )


def layout_hint(trainer: Any, x: Any) -> str:
    """What a batch of another layout looks like it holds, and how to give the trainer its own."""
    transcoder = getattr(trainer, "transcoder", False)
    if isinstance(x, (tuple, list)):
        if transcoder and len(x) == 2 and all(isinstance(t, torch.Tensor) for t in x):
            if x[0].shape[0] != x[1].shape[0]:
                return "the input and output halves have different row counts; row i of each must be the same token"
            ae = trainer.ae
            widths = tuple(t.shape[-1] for t in x)
            return (
                f"its widths {widths} must be the trainer's activation_dim={ae.activation_dim} and "
                f"output_dim={ae.output_dim}, each half [B, width]"
            )
        return "an (input, output) pair is a transcoder's batch: pass transcoder=True (--transcoder)"
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        return "yield activation tensors, one row per token"
    width = x.shape[-1]
    if x.ndim == 2:
        if transcoder:
            return (
                "a transcoder needs each site's input and output: read it with io='in_and_out' (--transcoder does; "
                "a cache for it is built with io='in_and_out', `cache --io in_and_out`)"
            )
        return (
            f"the width {width} is not the trainer's activation_dim={trainer.ae.activation_dim}: read the site it "
            f"was made for, or set activation_dim={width}"
        )
    if x.ndim == 3 and x.shape[1] == 2 and not transcoder:
        return (
            "these look like a site's (input, output) rows (io='in_and_out'): pass transcoder=True to train "
            "transcoders (--transcoder), or read io='out'"
        )
    if x.ndim == 3:
        return (
            f"these rows stack {x.shape[1]} sites or heads: train a crosscoder (num_layers={x.shape[1]}, "
            f"--crosscoder), read the sites as separate streams (stack_sites=False: a dict per site), or for "
            f"HeadActivationBuffer pass activations_split_by_head=True"
        )
    if x.ndim == 4 and x.shape[2] == 2:
        return (
            f"these are {x.shape[1]} stacked sites of (input, output) rows (stack_sites=True with io='in_and_out'): "
            f"give each transcoder one site (stack_sites=False), or read io='out' for a crosscoder"
        )
    return "no trainer takes batches of this rank"


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


def recipe_loss(forward: Callable[[Any, torch.Tensor, int | None], StepOutput]) -> Callable:
    """Decorator of each recipe's `loss(self, x, step)`: its body is the recipe's formula and returns
    a `StepOutput`; callers get the reference's convention `loss(x, step=None, logging=False)`: the
    scalar loss, or with `logging=True` a `LossLog(x, x_hat, f, losses)` computed without gradients.
    `SAETrainer.update` reads the whole `StepOutput` through `step_output`."""

    @functools.wraps(forward)
    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, **kwargs: Any):
        x = _to_device(x, self.device)
        if not logging:
            return forward(self, x, step).loss
        with torch.no_grad():
            out = forward(self, x, step)
        losses = {k: float(v) for k, v in out.losses.items()}
        f = out.f.to_dense() if isinstance(out.f, SparseCode) else out.f
        target = out.target if out.target is not None else x
        return LossLog(target, out.x_hat, f.view(*target.shape[:-1], -1), losses)

    del loss.__wrapped__  # its signature is the wrapper's: the reference's, not the body's (x, step)
    loss.step_output = forward
    return loss


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
        ae = self.ae
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

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, **kwargs: Any):
        """The recipe's loss (see `recipe_loss`)."""
        raise NotImplementedError(f"{type(self).__name__} defines no loss")

    def step_output(self, x: torch.Tensor, step: int | None) -> StepOutput:
        """The recipe's forward pass and loss on `x` (already on the device). Changes no state."""
        return type(self).loss.step_output(self, x, step)

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
        out = self.step_output(x, step)
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

    @classmethod
    def check_config_keys(cls, keys: Iterable[str]) -> None:
        """Raise a TypeError naming unknown keys, their likely intended spelling and the valid ones."""
        cls.Config.check_keys(cls.__name__, keys)

    @classmethod
    def check_config_values(cls, config: dict[str, Any]) -> None:
        """Raise a clear error for text where a number goes, or a NaN/Inf (before any work)."""
        cls.Config.check_values(config, cls.__name__)

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


# ------------------------------------------------------------------------------------- resampling
@torch.no_grad()
def resample_dead_features(
    ae: Dictionary,
    optimizer: torch.optim.Optimizer,
    dead_F: torch.Tensor,
    x_BD: torch.Tensor,
    y_BD: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-initialise dead features from badly reconstructed inputs (Bricken et al. 2023, "Towards
    Monosemanticity", neuron resampling); returns the indices of the resampled features.

    Rows of the batch are drawn without replacement with probability proportional to their
    reconstruction error ||x - x_hat||. Each dead feature f (the first min(#dead, B) by index)
    gets decoder direction v/||v|| and encoder direction v * 0.2 * (mean encoder norm of alive
    features); its feature-indexed biases and its Adam moments are zeroed. Works for any
    architecture through its `FeatureLayout`. A transcoder's target `y_BD` (its output) gives the
    error and the decoder directions; the encoder directions come from the inputs of the same rows.
    """
    dead_idx = dead_F.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return dead_idx
    x_BD = x_BD.reshape(-1, x_BD.shape[-1]).to(ae.decoder_FD().device)
    y_BD = x_BD if y_BD is None else y_BD.reshape(-1, y_BD.shape[-1]).to(x_BD.device)
    # All-zero inputs would give a zero direction: never draw them.
    nonzero_B = (x_BD.norm(dim=-1) > 0) & (y_BD.norm(dim=-1) > 0)
    err_B = (y_BD - ae(x_BD)).norm(dim=-1).float() * nonzero_B
    if not bool(err_B.sum() > 0):
        err_B = nonzero_B.float() if bool(nonzero_B.any()) else torch.ones_like(err_B)
    n = min(dead_idx.numel(), x_BD.shape[0])
    rows = torch.multinomial(err_B, n, replacement=False)
    v_ND, u_ND = x_BD[rows], y_BD[rows]
    dead_idx = dead_idx[:n]

    encoder_FD = ae.encoder_FD()
    alive_F = ~dead_F
    alive_norm = encoder_FD[alive_F].norm(dim=-1).mean() if bool(alive_F.any()) else torch.tensor(1.0)
    encoder_FD[dead_idx] = (v_ND * alive_norm * 0.2).to(encoder_FD.dtype)
    decoder_FD = ae.decoder_FD()
    decoder_FD[dead_idx] = (u_ND / u_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(decoder_FD.dtype)
    for name, dim in ae.layout.feature_biases:
        feature_first(ae.get_parameter(name).data, dim)[dead_idx] = 0.0

    for param, dim in ae.feature_parameters():
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                feature_first(state[key], dim)[dead_idx] = 0.0
    return dead_idx


@dataclass(frozen=True, kw_only=True)
class PenalisedConfig(TrainerConfig):
    """Fields of the recipes with an explicit sparsity penalty."""

    sparsity_warmup_steps: int | None = 2000
    """steps over which the sparsity penalty ramps linearly from 0 to its full weight"""


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
