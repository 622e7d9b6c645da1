"""Recipe configs: frozen records of a trainer's settings, each field documented by the string
below it (that text is the field's `--help`), checked for unknown keys and values that cannot be
right before any work."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import textwrap
from collections.abc import Iterable
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar

from ..dictionaries.base import Dictionary


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
        """Rules between fields (a recipe's Config adds its own); each value alone is checked by `check`."""

    @classmethod
    def names(cls) -> list[str]:
        """Every field, in the constructor's positional order (the fields' own order for a config
        that states none, such as the shared bases)."""
        order = cls.positional.split() or [f.name for f in dataclasses.fields(cls)]
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(order) == fields, f"{cls.__name__}.positional must name each field once: {set(order) ^ fields}"
        return order

    @classmethod
    def from_call(cls, owner: str, args: tuple, kwargs: dict[str, Any]) -> TrainerConfig:
        """The config of a constructor call `owner(*args, **kwargs)`, with Python's own errors for a
        call that does not fit (too many positional arguments, a field given twice or missing) and
        `check`'s for an unknown key or a value that cannot be right."""
        names = cls.names()
        if len(args) > len(names):
            raise TypeError(f"{owner}() takes at most {len(names)} positional arguments ({len(args)} given)")
        given = dict(zip(names, args))
        twice = sorted(set(given) & set(kwargs))
        if twice:
            raise TypeError(f"{owner}() got multiple values for argument {twice[0]!r}")
        cls.check(owner, given | kwargs)
        missing = [f.name for f in dataclasses.fields(cls) if f.default is MISSING and f.name not in given | kwargs]
        if missing:
            raise TypeError(f"{owner}() missing required argument{'s' * (len(missing) > 1)}: {', '.join(missing)}")
        return cls(**given, **kwargs)

    @classmethod
    def check(cls, owner: str, values: dict[str, Any]) -> None:
        """The one check of a trainer's options, before any work (the constructor runs it; the
        command line too, before the model loads): unknown keys (`check_keys`) and values that
        cannot be right whatever the recipe (`check_values`)."""
        cls.check_keys(owner, values)
        cls.check_values(values, owner)

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
    def defaults(cls) -> dict[str, Any]:
        """Each field's default (fields without one are left out)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not MISSING}

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


@dataclass(frozen=True, kw_only=True)
class PenalisedConfig(TrainerConfig):
    """Fields of the recipes with an explicit sparsity penalty."""

    sparsity_warmup_steps: int | None = 2000
    """steps over which the sparsity penalty ramps linearly from 0 to its full weight"""
