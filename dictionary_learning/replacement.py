"""The replacement model: every MLP of a model replaced at once by transcoders (one per layer) or by
one cross-layer transcoder, as circuit tracing uses it; and how much of the model it keeps.

In a forward pass through the replacement, MLP l's output is its transcoder's reconstruction from
MLP l's actual input (which already carries the errors of the earlier replaced MLPs); a CLT keeps
the codes of the layers it has passed and writes to layer l from all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .dictionaries import CrossLayerTranscoderBase, Dictionary
from .models import get_submodule, num_layers
from .reader import tokenize_batch
from .splice import module_name, run_model

__all__ = ["evaluate_replacement", "mlp_replacements"]


def _mlp_names(model, layers: int) -> list[str]:
    return [module_name(model, get_submodule(model, layer, "mlp")) for layer in range(layers)]


def _check_layers(model, dictionaries) -> int:
    layers = dictionaries.num_layers if isinstance(dictionaries, CrossLayerTranscoderBase) else len(dictionaries)
    if layers != num_layers(model):
        raise ValueError(f"the replacement has {layers} layers, the model {num_layers(model)}: replace every MLP")
    return layers


def mlp_replacements(model, dictionaries: CrossLayerTranscoderBase | Sequence[Dictionary]) -> dict[str, Callable]:
    """`{MLP module name: fn(MLP input) -> MLP output}` for `splice.run_model(transcode=...)`: a
    transcoder per layer (a list, index = layer), or a CLT (its codes kept through the pass)."""
    names = _mlp_names(model, _check_layers(model, dictionaries))
    if not isinstance(dictionaries, CrossLayerTranscoderBase):
        for layer, d in enumerate(dictionaries):
            if isinstance(d, Dictionary) and not d.transcoder:  # it would reconstruct the MLP's input
                raise ValueError(
                    f"layer {layer}: a {type(d).__name__} SAE cannot stand in for an MLP: give transcoders"
                )
        return dict(zip(names, dictionaries))
    clt, codes = dictionaries, []

    def at(layer: int) -> Callable:
        def replace(x: torch.Tensor) -> torch.Tensor:
            if layer == 0:
                codes.clear()  # a new forward pass
            codes.append(clt.encode_layer(x, layer))
            return clt.decode_layer(codes, layer)

        return replace

    return {name: at(layer) for layer, name in enumerate(names)}


def _token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every real (unpadded) position with a real successor: `[n]`."""
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -logp.gather(-1, ids[:, 1:, None])[..., 0][keep]


@dataclass
class _Totals:
    """What `evaluate_replacement` accumulates over its batches."""

    layers: int
    ce: tuple[list, list, list] = field(default_factory=lambda: ([], [], []))  # clean, replaced, zeroed
    kl: list = field(default_factory=list)
    l0: list = field(default_factory=list)
    contexts: int = 0
    rows: int = 0
    err: torch.Tensor | None = None  # [L] summed squared errors of the local reconstructions
    sq: torch.Tensor | None = None  # [L] summed squared norms of the MLP outputs
    total: torch.Tensor | None = None  # [L, D] summed MLP outputs (with sq: their variance)

    def add_local(self, dictionaries, x: torch.Tensor, y: torch.Tensor) -> None:
        """Each layer's reconstruction of the clean MLP output `y [n, L, D]` from its input `x`."""
        if isinstance(dictionaries, CrossLayerTranscoderBase):
            y_hat, f = dictionaries(x, output_features=True)
        else:
            pairs = [ae(x[:, i], output_features=True) for i, ae in enumerate(dictionaries)]
            y_hat, f = torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)
        y = y.double()
        parts = ((y - y_hat.double()).pow(2).sum((0, 2)), y.pow(2).sum((0, 2)), y.sum(0))
        if self.err is None:
            self.err, self.sq, self.total = parts
        else:
            self.err, self.sq, self.total = (a + b for a, b in zip((self.err, self.sq, self.total), parts))
        self.rows += y.shape[0]
        self.l0.append((f != 0).sum(-1).float())

    def summary(self) -> dict[str, Any]:
        ce_clean, ce_replaced, ce_zero = (float(torch.cat(c).mean()) for c in self.ce)
        variance = self.sq - self.total.pow(2).sum(-1) / self.rows  # sum ||y||^2 - ||sum y||^2 / n
        return {
            "ce_clean": ce_clean,
            "ce_replaced": ce_replaced,
            "ce_zero": ce_zero,
            "frac_recovered": (ce_zero - ce_replaced) / (ce_zero - ce_clean),
            "kl_div": float(torch.cat(self.kl).mean()),
            "fve": (1 - self.err / variance).tolist(),
            "l0": torch.cat(self.l0).mean(0).tolist(),
            "n_tokens": self.rows,
            "n_contexts": self.contexts,
        }


@torch.no_grad()
def evaluate_replacement(
    model,
    dictionaries: CrossLayerTranscoderBase | Sequence[Dictionary],
    texts: Iterable[str],
    n_contexts: int = 64,
    ctx_len: int = 128,
    batch_size: int = 16,
) -> dict[str, Any]:
    """On `n_contexts` texts: next-token cross-entropy of the clean model, of the model with every
    MLP replaced (`ce_replaced`) and with every MLP's output zeroed (`ce_zero`); `frac_recovered =
    (ce_zero - ce_replaced) / (ce_zero - ce_clean)`; `kl_div` (clean || replaced) per token; and per
    layer, on the clean model's MLP inputs and outputs: `fve` (variance of the MLP output explained)
    and `l0` (latents per token)."""
    layers = _check_layers(model, dictionaries)
    names = _mlp_names(model, layers)
    replace = mlp_replacements(model, dictionaries)
    zero = {name: torch.zeros_like for name in names}
    reads = [(name, io) for name in names for io in ("in", "out")]
    totals = _Totals(layers)
    texts = iter(texts)
    while totals.contexts < n_contexts:
        batch = [t for _, t in zip(range(min(batch_size, n_contexts - totals.contexts)), texts)]
        if not batch:
            break
        tokens = tokenize_batch(model.tokenizer, batch, ctx_len)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        clean, saved = run_model(model, ids, mask, read=reads)
        replaced, _ = run_model(model, ids, mask, transcode=replace)
        zeroed, _ = run_model(model, ids, mask, replace=zero)
        for ce, logits in zip(totals.ce, (clean, replaced, zeroed)):
            ce.append(_token_ce(logits, ids, mask))
        keep = mask.bool()
        p = torch.log_softmax(clean.float(), -1)[keep]
        q = torch.log_softmax(replaced.float(), -1)[keep]
        totals.kl.append((p.exp() * (p - q)).sum(-1))
        x = torch.stack([saved[(name, "in")][keep] for name in names], 1)  # [n, L, D]
        y = torch.stack([saved[(name, "out")][keep] for name in names], 1)
        totals.add_local(dictionaries, x, y)
        totals.contexts += len(batch)
    if totals.contexts == 0:
        raise ValueError("no text to evaluate the replacement on")
    return totals.summary()
