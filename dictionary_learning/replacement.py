"""The replacement model: every MLP of a model replaced at once by transcoders (one per layer) or by
one cross-layer transcoder, as circuit tracing uses it; and how much of the model it keeps.

In a forward pass through the replacement, MLP l's output is its transcoder's reconstruction from
MLP l's actual input (which already carries the errors of the earlier replaced MLPs); a CLT keeps
the codes of the layers it has passed and writes to layer l from all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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
    sums: dict[str, Any] = {"ce": [[], [], []], "kl": [], "err": torch.zeros(layers), "var": [], "l0": [], "n": 0}
    texts = iter(texts)
    while sums["n"] < n_contexts:
        batch = [t for _, t in zip(range(min(batch_size, n_contexts - sums["n"])), texts)]
        if not batch:
            break
        tokens = tokenize_batch(model.tokenizer, batch, ctx_len)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        clean, saved = run_model(model, ids, mask, read=reads)
        replaced, _ = run_model(model, ids, mask, transcode=replace)
        zeroed, _ = run_model(model, ids, mask, replace=zero)
        for i, logits in enumerate((clean, replaced, zeroed)):
            sums["ce"][i].append(_token_ce(logits, ids, mask))
        keep = mask.bool()
        p = torch.log_softmax(clean.float(), -1)[keep]
        q = torch.log_softmax(replaced.float(), -1)[keep]
        sums["kl"].append((p.exp() * (p - q)).sum(-1))
        x = torch.stack([saved[(name, "in")][keep] for name in names], 1)  # [n, L, D]
        y = torch.stack([saved[(name, "out")][keep] for name in names], 1)
        _local(dictionaries, x, y, sums)
        sums["n"] += len(batch)
    if sums["n"] == 0:
        raise ValueError("no text to evaluate the replacement on")
    return _summary(sums)


def _local(dictionaries, x: torch.Tensor, y: torch.Tensor, sums: dict) -> None:
    """Each layer's reconstruction of the clean MLP output from the clean MLP input."""
    if isinstance(dictionaries, CrossLayerTranscoderBase):
        y_hat, f = dictionaries(x, output_features=True)
    else:
        pairs = [ae(x[:, i], output_features=True) for i, ae in enumerate(dictionaries)]
        y_hat, f = torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)
    sums["err"] += (y - y_hat).pow(2).sum((0, 2)).float()
    sums["var"].append(y.float())
    sums["l0"].append((f != 0).sum(-1).float())


def _summary(sums: dict) -> dict[str, Any]:
    ce_clean, ce_replaced, ce_zero = (float(torch.cat(c).mean()) for c in sums["ce"])
    y = torch.cat(sums["var"])
    variance = (y - y.mean(0)).pow(2).sum((0, 2))
    return {
        "ce_clean": ce_clean,
        "ce_replaced": ce_replaced,
        "ce_zero": ce_zero,
        "frac_recovered": (ce_zero - ce_replaced) / (ce_zero - ce_clean),
        "kl_div": float(torch.cat(sums["kl"]).mean()),
        "fve": (1 - sums["err"] / variance).tolist(),
        "l0": torch.cat(sums["l0"]).mean(0).tolist(),
        "n_tokens": int(y.shape[0]),
        "n_contexts": sums["n"],
    }
