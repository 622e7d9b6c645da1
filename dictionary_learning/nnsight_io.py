"""Everything that depends on nnsight's API lives here, so the next nnsight release touches one file.

Written against nnsight 0.8 (saved values are plain tensors after the trace, early stop is
`tracer.stop()`, values must be requested in the order the model computes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .splice import hidden_of, module_timing, root_module

IO_MODES = ("out", "in", "in_to_out")


@dataclass(frozen=True)
class Site:
    """A submodule of the model and what to read there: its output, its input, or both."""

    name: str  # dotted path in the underlying torch model, e.g. "model.layers.3.mlp"
    envoy: object  # the nnsight envoy of that module
    io: str

    @property
    def module(self) -> nn.Module:
        return self.envoy._module


def wrap_model(hf_model: nn.Module, tokenizer=None):
    """An nnsight model around a loaded Hugging Face causal LM (no copy, no download)."""
    import nnsight

    cls = getattr(nnsight, "TransformersModel", None) or nnsight.LanguageModel
    return cls(hf_model, tokenizer=tokenizer)


def torch_model(model) -> nn.Module:
    """The plain torch module inside an nnsight model (a plain torch model is its own)."""
    return root_module(model)


def model_id(model) -> str:
    """A name for the model: the id `load_default_model` gives the offline default, else its Hub id
    or path, else its family and parameter count."""
    hf = torch_model(model)
    name = getattr(hf, "dictionary_learning_id", "") or getattr(hf.config, "_name_or_path", "")
    return (
        name or getattr(hf, "name_or_path", "") or f"{hf.config.model_type}-{sum(p.numel() for p in hf.parameters())}"
    )


def model_device(model) -> torch.device:
    """Where a model's weights (and so its inputs) live."""
    from .dictionaries.base import device_of

    return device_of(torch_model(model))


def resolve_site(model, submodule, io: str) -> Site:
    """Accept an envoy, a torch module of the model, or a dotted name; check that it belongs to `model`."""
    if io not in IO_MODES:
        raise ValueError(f"io must be one of {IO_MODES} ('in_and_out' is accepted for 'in_to_out'), got {io!r}")
    root = torch_model(model)
    names = {id(m): n for n, m in root.named_modules()}
    if isinstance(submodule, str):
        envoy = model
        try:
            for part in submodule.split("."):
                envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        except (AttributeError, IndexError, TypeError) as e:
            raise ValueError(f"the model has no submodule {submodule!r}") from e
    elif isinstance(submodule, nn.Module):
        if id(submodule) not in names:
            raise ValueError(f"{type(submodule).__name__} is not a submodule of this model")
        return resolve_site(model, names[id(submodule)], io)
    else:
        envoy = submodule
    module = getattr(envoy, "_module", None)
    if module is None or id(module) not in names:
        raise ValueError(f"{submodule!r} is not a submodule of this model")
    return Site(names[id(module)], envoy, io)


def plan_requests(model, sites: Sequence[Site]) -> list[tuple[int, str]]:
    """The (site index, "in"/"out") values to request, in the order the model computes them."""
    requests = [(i, kind) for i, site in enumerate(sites) for kind in _kinds(site.io)]
    timing = module_timing(torch_model(model))
    return sorted(requests, key=lambda r: timing[sites[r[0]].name][0 if r[1] == "in" else 1])


@torch.no_grad()
def read_activations(
    model,
    sites: Sequence[Site],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    requests: list[tuple[int, str]] | None = None,
):
    """Run the model on a token batch, stopping after the last site; return one `[B, L, d]` tensor
    per site (for io="in_to_out", a pair `(input, output)`), on the model's device."""
    requests = requests or plan_requests(model, sites)
    saved: dict[tuple[int, str], object] = {}
    with model.trace(input_ids, attention_mask=attention_mask) as tracer:
        for i, kind in requests:
            envoy = sites[i].envoy
            saved[(i, kind)] = envoy.input.save() if kind == "in" else envoy.output.save()
        tracer.stop()
    result = []
    for i, site in enumerate(sites):
        if site.io == "in_to_out":
            result.append((hidden_of(saved[(i, "in")]), hidden_of(saved[(i, "out")])))
        else:
            result.append(hidden_of(saved[(i, site.io)]))
    return result


def _kinds(io: str) -> tuple[str, ...]:
    return ("in", "out") if io == "in_to_out" else (io,)
