"""SAELens's parameterisation of our architectures: the parsed weights of a SAELens SAE, and the
dispatch to the class that claims them. Each class converts itself (`from_saelens`, `to_saelens`),
so an architecture's SAELens names live in its own file.

Conversions are exact where the two parameterisations agree, and otherwise fold the difference
into a bias: SAELens's `apply_b_dec_to_input=False` becomes `b_enc + b_dec @ W_enc` for our classes
that always subtract `b_dec`, and TopK's `rescale_acts_by_decoder_norm` is folded into the encoder
and a unit-norm decoder (so outputs agree to float rounding).
"""

from __future__ import annotations

from typing import Any

import torch

from ..files import CheckpointError
from .base import DICTIONARY_REGISTRY, Dictionary, SaelensWeights

# Architectures we can read, with the weights each needs beyond W_enc/W_dec/b_dec.
SAELENS_ARCHITECTURES = {
    "standard": ("b_enc",),
    "gated": ("b_gate", "b_mag", "r_mag"),
    "jumprelu": ("b_enc", "threshold"),
    "topk": ("b_enc",),
    "batchtopk": ("b_enc", "topk_threshold"),
    "abstopk": ("b_enc",),
    "matching_pursuit": (),  # no encoder of its own: W_enc is W_dec.T
    # transcoders (SAELens's Transcoder classes): W_dec is [d_sae, d_out], the skip ones add W_skip [d_out, d_in]
    "transcoder": ("b_enc",),
    "skip_transcoder": ("b_enc",),
    "jumprelu_transcoder": ("b_enc", "threshold"),
    "jumprelu_skip_transcoder": ("b_enc", "threshold"),
}


def require_field(cfg: dict, key: str, source: str) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{source}: the config has no {key!r} field")
    return cfg[key]


def checked_tensor(state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], source: str) -> torch.Tensor:
    """`state[name]` as fp32, or a CheckpointError naming `source` if it is missing or of another shape."""
    if name not in state:
        raise CheckpointError(f"{source}: weights have no {name!r} (keys: {sorted(state)})")
    t = state[name]
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{source}: {name!r} has shape {tuple(t.shape)} but the config implies {shape}")
    return t.float()


def parse_saelens(cfg: dict, state: dict[str, torch.Tensor], source: str = "SAELens SAE") -> SaelensWeights:
    """Check a SAELens config and state dict against each other and against what we can convert."""
    arch = require_field(cfg, "architecture", source)
    if arch not in SAELENS_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: architecture {arch!r} is not supported; supported: {', '.join(SAELENS_ARCHITECTURES)}"
        )
    for key, allowed in (("normalize_activations", ("none", None)), ("reshape_activations", ("none", None))):
        if cfg.get(key) not in allowed:
            raise CheckpointError(
                f"{source}: {key}={cfg[key]!r} is not supported (only 'none'); fold it into the weights first"
            )
    if cfg.get("activation_fn", "relu") not in ("relu", None):
        raise CheckpointError(f"{source}: activation_fn={cfg['activation_fn']!r} is not supported (only 'relu')")
    D, F = int(require_field(cfg, "d_in", source)), int(require_field(cfg, "d_sae", source))
    transcoder = arch.endswith("transcoder")
    D_out = int(require_field(cfg, "d_out", source)) if transcoder else D
    tied = arch == "matching_pursuit"  # its encoder is its decoder
    W_enc = None if tied else checked_tensor(state, "W_enc", (D, F), source)
    W_dec = checked_tensor(state, "W_dec", (F, D_out), source)
    W_enc = W_dec.T if tied else W_enc
    b_dec = checked_tensor(state, "b_dec", (D_out,), source)
    extra = {
        name: checked_tensor(state, name, () if name == "topk_threshold" else (F,), source)
        for name in SAELENS_ARCHITECTURES[arch]
    }
    if "skip" in arch:
        extra["W_skip"] = checked_tensor(state, "W_skip", (D_out, D), source)
    return SaelensWeights(
        arch=arch,
        cfg=cfg,
        source=source,
        W_enc=W_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        extra=extra,
        subtracts_b_dec=bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder,
    )


def dictionary_from_saelens(cfg: dict, state: dict[str, torch.Tensor], source: str = "SAELens SAE") -> Dictionary:
    """Our dictionary equal to the SAELens SAE with this config and state dict: the registered class
    that claims its architecture (`Dictionary.claims_saelens`) converts it."""
    weights = parse_saelens(cfg, state, source)
    for cls in DICTIONARY_REGISTRY.values():
        if cls.claims_saelens(weights):
            with torch.no_grad():
                return cls.from_saelens(weights)
    raise CheckpointError(f"{source}: no dictionary class reads SAELens architecture {weights.arch!r}")


def saelens_state(ae: Dictionary) -> tuple[dict, dict[str, torch.Tensor]]:
    """(SAELens config fields, SAELens state dict) describing `ae` exactly."""
    fields, state = ae.to_saelens()
    base = {"d_in": ae.activation_dim, "d_sae": ae.dict_size, "apply_b_dec_to_input": True}
    return base | fields, {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
