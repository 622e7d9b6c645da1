"""Splicing dictionaries into a model's forward pass: for evaluation, ablations, steering and e2e training.

Works with torch forward hooks on the underlying modules, so it serves nnsight models (inside or
outside a `model.trace`) and plain Hugging Face models alike, and gradients flow through it.

    with splice(model, {"model.layers.3.mlp": ae}):
        logits = model(input_ids).logits                      # layer 3's MLP output is ae(x)
    with splice(model, {"model.layers.3.mlp": ae}, add_error=True, edit=lambda f: f * keep_F):
        ...                                                   # ablate features, keep everything else
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Replacement = Callable[[torch.Tensor], torch.Tensor]


class _Stop(Exception):
    """Raised by a hook once every value a run needs has been read: the rest of the model is skipped."""


def root_module(model) -> nn.Module:
    """The torch module of an nnsight model, or the model itself."""
    module = getattr(model, "_module", model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nnsight or torch model, got {type(model).__name__}")
    return module


def module_name(model, site) -> str:
    """The dotted name of a site given as a name, a torch submodule or an nnsight envoy."""
    root = root_module(model)
    if isinstance(site, str):
        try:
            root.get_submodule(site)
        except AttributeError as e:
            raise ValueError(f"the model has no submodule {site!r}") from e
        return site
    module = getattr(site, "_module", site)
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{site!r} is not a submodule of this model")


def hidden_of(value):
    """Decoder layers and attention blocks return tuples in some versions: the hidden states come first."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _with_hidden(value, hidden):
    return (hidden, *value[1:]) if isinstance(value, (tuple, list)) else hidden


@dataclass
class _Hooked:
    """What happens at one module during a run: read its value, replace it, or stop after it."""

    replace: Replacement | None = None
    read: bool = False
    stop: bool = False
    from_input: Replacement | None = None  # a transcoder: the output becomes fn(the module's first input)


def _install(root: nn.Module, name: str, io: str, spec: _Hooked, saved: dict):
    module = root.get_submodule(name)

    def apply(value: torch.Tensor) -> torch.Tensor:
        if spec.replace is not None:
            new = spec.replace(value)
            if new.shape != value.shape:
                shapes = f"{tuple(new.shape)}, expected {tuple(value.shape)}"
                raise ValueError(f"the replacement at {name} has shape {shapes}")
            value = new.to(value.dtype)
        if spec.read:
            saved[(name, io)] = value
        return value

    if io == "in":

        def pre_hook(mod, args, kwargs):
            if args:
                args = (apply(args[0]), *args[1:])
            else:
                key = next(iter(kwargs))
                kwargs = {**kwargs, key: apply(kwargs[key])}
            if spec.stop:
                raise _Stop
            return args, kwargs

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(mod, args, kwargs, output):
        value = hidden_of(output)
        if spec.from_input is not None:
            new = spec.from_input(args[0] if args else next(iter(kwargs.values())))
            value = new.to(value.dtype).reshape(value.shape)
        hidden = apply(value)
        if spec.stop:
            raise _Stop
        return _with_hidden(output, hidden)

    return module.register_forward_hook(hook, with_kwargs=True)


def run_model(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    replace: Mapping[str, Replacement] | None = None,
    read: Sequence[str | tuple[str, str]] = (),
    io: str = "out",
    logits: bool = True,
    transcode: Mapping[str, Replacement] | None = None,
) -> tuple[torch.Tensor | None, dict]:
    """One forward pass with the values at `replace`'s sites (their output, or with io="in" their
    first input) replaced by `fn(value)`, and the outputs of `transcode`'s sites replaced by
    `fn(their first input)` (a transcoder standing in for an MLP).

    Returns `(logits or None, {entry: value})` for each entry of `read`: a site name (read with
    `io`) or a `(name, "in" | "out")` pair; values at replaced sites are read after replacement.
    With `logits=False` the model stops after the last value it needs. Gradients flow as in any
    torch computation (wrap in `torch.no_grad()` when none are wanted)."""
    for mode in (io, *(entry[1] for entry in read if isinstance(entry, tuple))):
        if mode not in ("in", "out"):
            raise ValueError(f"io must be 'in' or 'out', got {mode!r}")
    root = root_module(model)
    read_keys = {entry: entry if isinstance(entry, tuple) else (entry, io) for entry in read}
    specs: dict[tuple[str, str], _Hooked] = {(name, io): _Hooked(replace=fn) for name, fn in (replace or {}).items()}
    for name, fn in (transcode or {}).items():
        specs.setdefault((name, "out"), _Hooked()).from_input = fn
    for key in read_keys.values():
        specs.setdefault(key, _Hooked()).read = True
    if not logits:
        if not specs:
            raise ValueError("nothing to compute: ask for logits or name a site to read")
        specs[last_executed(root, list(specs))].stop = True
    saved: dict[tuple[str, str], torch.Tensor] = {}
    handles = [_install(root, name, mode, spec, saved) for (name, mode), spec in specs.items()]
    out = None
    try:
        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
        out = root(input_ids=input_ids, **kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [entry for entry, key in read_keys.items() if key not in saved]
    if missing:
        raise RuntimeError(f"the forward pass never reached {missing}")
    return (out.logits if logits else None), {entry: saved[key] for entry, key in read_keys.items()}


def module_timing(root: nn.Module) -> dict[str, tuple[float, float]]:
    """For each module, when its input and its output become available, estimated from the module
    tree: a module's input precedes its children's, its output follows its last descendant's.
    Siblings are assumed to run in registration order, which holds for the supported transformer
    families (nnsight also needs values requested in this order)."""
    names = [name for name, _ in root.named_modules()]
    timing = {}
    for rank, name in enumerate(names):
        prefix = f"{name}." if name else ""
        last = rank
        while last + 1 < len(names) and names[last + 1].startswith(prefix):
            last += 1
        timing[name] = (rank, last + 0.5)
    return timing


def last_executed(root: nn.Module, keys: list[tuple[str, str]]) -> tuple[str, str]:
    """The (site, io) whose value becomes available last."""
    timing = module_timing(root)
    return max(keys, key=lambda key: timing[key[0]][0 if key[1] == "in" else 1])


# --------------------------------------------------------------------------------- user-facing splice
def dictionary_replacement(
    dictionary: nn.Module,
    add_error: bool = False,
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Replacement:
    """`x -> decode(edit(encode(x)))` computed in the dictionary's dtype and device; with `add_error`,
    plus the reconstruction error `x - decode(encode(x))` (treated as a constant by autograd), so
    that without `edit` the model computes exactly what it computed before."""

    def replace(x: torch.Tensor) -> torch.Tensor:
        param = next(dictionary.parameters(), None)
        device, dtype = (param.device, param.dtype) if param is not None else (x.device, torch.float32)
        h = x.to(device, dtype)
        if edit is None and not add_error:
            x_hat = dictionary(h)
        else:
            f = dictionary.encode(h)
            x_hat = dictionary.decode(edit(f) if edit is not None else f)
            if add_error:
                x_hat = x_hat + (h - dictionary.decode(f)).detach()
        return x_hat.to(x.device, x.dtype)

    return replace


@contextlib.contextmanager
def splice(
    model,
    dictionaries: Mapping,
    io: str = "out",
    add_error: bool = False,
    edit: Callable[[torch.Tensor], torch.Tensor] | Mapping | None = None,
) -> Iterator[None]:
    """Within the block, every forward pass of `model` (plain calls, `model.trace`, `generate`)
    runs with the activations at each site replaced by its dictionary's reconstruction.

    Args:
        dictionaries: `{site: dictionary}`; a site is a dotted module name, a torch submodule or an
            nnsight envoy. A dictionary may also be any function `x -> x'` (e.g. zero ablation).
        io: replace each site's output ("out") or first input ("in").
        add_error: add back the reconstruction error, so the model's output is unchanged unless
            `edit` changes the features (attribution, steering and ablation experiments).
        edit: `f -> f'` applied to the features before decoding (one function, or `{site: fn}`).
    """
    if io not in ("in", "out"):
        raise ValueError(f"io must be 'in' or 'out', got {io!r}")
    root = root_module(model)
    handles = []
    try:
        for site, dictionary in dictionaries.items():
            name = module_name(model, site)
            site_edit = edit.get(site, edit.get(name)) if isinstance(edit, Mapping) else edit
            if isinstance(dictionary, nn.Module) and hasattr(dictionary, "encode"):
                fn = dictionary_replacement(dictionary, add_error, site_edit)
            elif callable(dictionary):
                fn = dictionary
            else:
                raise TypeError(f"the value for site {name!r} must be a dictionary or a function, not {dictionary!r}")
            handles.append(_install(root, name, io, _Hooked(replace=fn), {}))
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["dictionary_replacement", "module_name", "run_model", "splice"]
