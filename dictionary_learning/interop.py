"""Other libraries' folders: SAELens (`cfg.json` + `sae_weights.safetensors`) and sparsify
(`cfg.json` + `sae.safetensors`), read into our classes and written from them, without either
library installed.

Conversions are exact where the two parameterisations agree, and otherwise fold the difference
into a bias: SAELens's `apply_b_dec_to_input=False` becomes `b_enc + b_dec @ W_enc` for our classes
that always subtract `b_dec`, and TopK's `rescale_acts_by_decoder_norm` is folded into the encoder
and a unit-norm decoder (so outputs agree to float rounding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, atomic_write_json, load_state_dict_file, read_config, save_state_dict
from .dictionaries import (
    AutoEncoder,
    AutoEncoderNew,
    AutoEncoderTopK,
    BatchTopKSAE,
    Dictionary,
    GatedAutoEncoder,
    JumpReluAutoEncoder,
    MatryoshkaBatchTopKSAE,
)

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"

# Architectures we can read, with the weights each needs beyond W_enc/W_dec/b_dec.
SAELENS_ARCHITECTURES = {
    "standard": ("b_enc",),
    "gated": ("b_gate", "b_mag", "r_mag"),
    "jumprelu": ("b_enc", "threshold"),
    "topk": ("b_enc",),
    "batchtopk": ("b_enc", "topk_threshold"),
}


def folder_format(folder: str | Path) -> str | None:
    """ "saelens", "sparsify" or None (not a foreign folder) from the files in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / SAELENS_WEIGHTS).is_file() and (folder / SAELENS_CONFIG).is_file():
        return "saelens"
    if (folder / SPARSIFY_WEIGHTS).is_file() and (folder / SPARSIFY_CONFIG).is_file():
        return "sparsify"
    return None


def _require(cfg: dict, key: str, source: str) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{source}: the config has no {key!r} field")
    return cfg[key]


def _check_shape(state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], source: str) -> torch.Tensor:
    if name not in state:
        raise CheckpointError(f"{source}: weights have no {name!r} (keys: {sorted(state)})")
    t = state[name]
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{source}: {name!r} has shape {tuple(t.shape)} but the config implies {shape}")
    return t.float()


# -------------------------------------------------------------------------------------- SAELens
def dictionary_from_saelens(cfg: dict, state: dict[str, torch.Tensor], source: str = "SAELens SAE") -> Dictionary:
    """Our dictionary equal to the SAELens SAE with this config and state dict."""
    arch = _require(cfg, "architecture", source)
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
    D, F = int(_require(cfg, "d_in", source)), int(_require(cfg, "d_sae", source))
    W_enc = _check_shape(state, "W_enc", (D, F), source)
    W_dec = _check_shape(state, "W_dec", (F, D), source)
    b_dec = _check_shape(state, "b_dec", (D,), source)
    extra = {
        name: _check_shape(state, name, () if name == "topk_threshold" else (F,), source)
        for name in SAELENS_ARCHITECTURES[arch]
    }
    subtracts_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    # Input term that our b_dec-subtracting classes must add back when SAELens did not subtract b_dec.
    shift_F = torch.zeros(F) if subtracts_b_dec else b_dec @ W_enc

    with torch.no_grad():
        if arch == "standard":
            if not subtracts_b_dec:  # exactly AutoEncoderNew: f = ReLU(W_enc x + b_enc), x_hat = W_dec f + b_dec
                ae = AutoEncoderNew(D, F)
                ae.encoder.bias.copy_(extra["b_enc"])
                ae.decoder.bias.copy_(b_dec)
            else:
                ae = AutoEncoder(D, F)
                ae.encoder.bias.copy_(extra["b_enc"])
                ae.bias.copy_(b_dec)
            ae.encoder.weight.copy_(W_enc.T)
            ae.decoder.weight.copy_(W_dec.T)
        elif arch == "gated":
            ae = GatedAutoEncoder(D, F)
            ae.encoder.weight.copy_(W_enc.T)
            ae.decoder.weight.copy_(W_dec.T)
            ae.decoder_bias.copy_(b_dec)
            ae.r_mag.copy_(extra["r_mag"])
            ae.gate_bias.copy_(extra["b_gate"] + shift_F)
            ae.mag_bias.copy_(extra["b_mag"] + extra["r_mag"].exp() * shift_F)
        elif arch == "jumprelu":
            ae = JumpReluAutoEncoder(D, F)
            ae.W_enc.copy_(W_enc)
            ae.W_dec.copy_(W_dec)
            ae.b_dec.copy_(b_dec)
            ae.threshold.copy_(extra["threshold"])
            ae.b_enc.copy_(extra["b_enc"] - (b_dec @ W_enc if subtracts_b_dec else 0))
        else:  # topk, batchtopk
            k = int(_require(cfg, "k", source))
            if k != cfg["k"] or not 0 < k <= F:
                raise CheckpointError(f"{source}: k={cfg['k']!r} must be an integer in [1, d_sae={F}]")
            b_enc = extra["b_enc"] + shift_F
            if cfg.get("rescale_acts_by_decoder_norm", False):  # fold ||W_dec row|| into the encoder
                norms_F = W_dec.norm(dim=-1).clamp_min(1e-8)
                W_enc, b_enc, W_dec = W_enc * norms_F, b_enc * norms_F, W_dec / norms_F[:, None]
            ae = (AutoEncoderTopK if arch == "topk" else BatchTopKSAE)(D, F, k)
            ae.encoder.weight.copy_(W_enc.T)
            ae.encoder.bias.copy_(b_enc)
            ae.decoder.weight.copy_(W_dec.T)
            ae.b_dec.copy_(b_dec)
            if arch == "batchtopk":
                ae.threshold.copy_(extra["topk_threshold"])
    return ae


def load_saelens(folder: str | Path, device=None, dtype=None) -> tuple[Dictionary, dict]:
    """Read a SAELens SAE folder (`cfg.json` + `sae_weights.safetensors`); returns `(dictionary, cfg)`."""
    folder = Path(folder)
    cfg = read_config(folder, SAELENS_CONFIG)
    state = load_state_dict_file(folder / SAELENS_WEIGHTS).state_dict
    ae = dictionary_from_saelens(cfg, state, source=str(folder))
    return ae.to(device=device, dtype=dtype), cfg


def saelens_state(ae: Dictionary) -> tuple[dict, dict[str, torch.Tensor]]:
    """(SAELens config fields, SAELens state dict) describing `ae` exactly."""
    D, F = ae.activation_dim, ae.dict_size
    sd = {k: v.detach().float().cpu() for k, v in ae.state_dict().items()}
    cfg: dict[str, Any] = {"d_in": D, "d_sae": F, "apply_b_dec_to_input": True}
    if type(ae) is AutoEncoder:
        cfg["architecture"] = "standard"
        state = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"], "b_dec": sd["bias"]}
        state["W_dec"] = sd["decoder.weight"].T
    elif type(ae) is AutoEncoderNew:
        cfg |= {"architecture": "standard", "apply_b_dec_to_input": False}
        state = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"], "b_dec": sd["decoder.bias"]}
        state["W_dec"] = sd["decoder.weight"].T
    elif type(ae) is GatedAutoEncoder:
        cfg["architecture"] = "gated"
        state = {"W_enc": sd["encoder.weight"].T, "W_dec": sd["decoder.weight"].T, "b_dec": sd["decoder_bias"]}
        state |= {"b_gate": sd["gate_bias"], "b_mag": sd["mag_bias"], "r_mag": sd["r_mag"]}
    elif type(ae) is JumpReluAutoEncoder:
        cfg |= {"architecture": "jumprelu", "apply_b_dec_to_input": bool(ae.apply_b_dec_to_input)}
        state = {k: sd[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    elif type(ae) is AutoEncoderTopK:
        cfg |= {"architecture": "topk", "k": ae._k, "rescale_acts_by_decoder_norm": False}
        state = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"], "b_dec": sd["b_dec"]}
        state["W_dec"] = sd["decoder.weight"].T
    elif type(ae) in (BatchTopKSAE, MatryoshkaBatchTopKSAE):
        # Inference of both is a global threshold on ReLU(pre): SAELens's JumpReLU with that threshold everywhere.
        threshold = float(sd["threshold"])
        if threshold < 0:
            raise ValueError(
                f"{type(ae).__name__} has no inference threshold yet (threshold={threshold}); "
                "train past threshold_start_step before exporting"
            )
        cfg["architecture"] = "jumprelu"
        if type(ae) is BatchTopKSAE:
            W_enc, b_enc, W_dec = sd["encoder.weight"].T, sd["encoder.bias"], sd["decoder.weight"].T
        else:
            W_enc, b_enc, W_dec = sd["W_enc"], sd["b_enc"], sd["W_dec"]
        state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": sd["b_dec"]}
        state["threshold"] = torch.full((F,), threshold)
    else:
        raise ValueError(f"{type(ae).__name__} has no SAELens equivalent")
    return cfg, {k: v.contiguous() for k, v in state.items()}


def save_saelens(ae: Dictionary, folder: str | Path, metadata: dict | None = None) -> Path:
    """Write `ae` as a SAELens folder that `sae_lens.SAE.load_from_disk(folder)` loads with the same outputs.

    `metadata` (e.g. `model_name`, `hook_name`) goes into the config's `metadata` field.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fields, state = saelens_state(ae)
    cfg = {
        **fields,
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": dict(metadata or {}),
    }
    save_state_dict(state, folder / SAELENS_WEIGHTS)
    atomic_write_json(cfg, folder / SAELENS_CONFIG)
    return folder


# ------------------------------------------------------------------------------------- sparsify
def load_sparsify(folder: str | Path, device=None, dtype=None) -> tuple[AutoEncoderTopK, dict]:
    """Read a sparsify (EleutherAI) TopK SAE folder (`cfg.json` + `sae.safetensors`) into AutoEncoderTopK."""
    folder = Path(folder)
    source = str(folder)
    cfg = read_config(folder, SPARSIFY_CONFIG)
    for key, ok in (("activation", "topk"), ("transcode", False), ("skip_connection", False)):
        if cfg.get(key, ok) != ok:
            raise CheckpointError(f"{source}: {key}={cfg[key]!r} is not supported (only {ok!r})")
    state = load_state_dict_file(folder / SPARSIFY_WEIGHTS).state_dict
    D = int(_require(cfg, "d_in", source))
    F = int(cfg.get("num_latents") or D * int(_require(cfg, "expansion_factor", source)))
    k = int(_require(cfg, "k", source))
    if not 0 < k <= F:
        raise CheckpointError(f"{source}: k={k} must be in [1, num_latents={F}]")
    ae = AutoEncoderTopK(D, F, k)
    with torch.no_grad():
        ae.encoder.weight.copy_(_check_shape(state, "encoder.weight", (F, D), source))
        ae.encoder.bias.copy_(_check_shape(state, "encoder.bias", (F,), source))
        ae.decoder.weight.copy_(_check_shape(state, "W_dec", (F, D), source).T)
        ae.b_dec.copy_(_check_shape(state, "b_dec", (D,), source))
    return ae.to(device=device, dtype=dtype), cfg


def save_sparsify(ae: AutoEncoderTopK, folder: str | Path) -> Path:
    """Write an AutoEncoderTopK as a sparsify folder (`SparseCoder.load_from_disk` reads it)."""
    if type(ae) is not AutoEncoderTopK:
        raise ValueError(f"sparsify holds TopK SAEs only, not {type(ae).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu() for k, v in ae.state_dict().items()}
    state = {
        "encoder.weight": sd["encoder.weight"].contiguous(),
        "encoder.bias": sd["encoder.bias"],
        "W_dec": sd["decoder.weight"].T.contiguous(),
        "b_dec": sd["b_dec"],
    }
    save_state_dict(state, folder / SPARSIFY_WEIGHTS)
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, ae.dict_size // ae.activation_dim),
        "normalize_decoder": True,
        "num_latents": ae.dict_size,
        "k": ae._k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": ae.activation_dim,
    }
    atomic_write_json(cfg, folder / SPARSIFY_CONFIG)
    return folder
