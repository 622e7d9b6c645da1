"""Other libraries' folders: SAELens (`cfg.json` + `sae_weights.safetensors`) and sparsify
(`cfg.json` + `sae.safetensors`), read into our classes and written from them, without either
library installed.

Each architecture converts itself to and from SAELens's names (`Dictionary.from_saelens` /
`to_saelens`, dispatched in `dictionaries.saelens`); this module reads and writes the folders.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .dictionaries import AutoEncoderTopK, Dictionary
from .dictionaries.saelens import (
    SAELENS_ARCHITECTURES,
    checked_tensor,
    dictionary_from_saelens,
    require_field,
)
from .files import SAELENS_CONFIG, SAELENS_WEIGHTS, CheckpointError, load_state_dict_file, read_config, save_state_dict
from .safe_io import atomic_write_json

SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
__all__ = [
    "SAELENS_ARCHITECTURES",
    "SAELENS_CONFIG",
    "SAELENS_WEIGHTS",
    "dictionary_from_saelens",
    "folder_format",
    "load_saelens",
    "load_sparsify",
    "saelens_state",
    "save_saelens",
    "save_sparsify",
]


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


def load_saelens(folder: str | Path, device=None, dtype=None) -> tuple[Dictionary, dict]:
    """Read a SAELens SAE folder (`cfg.json` + `sae_weights.safetensors`); returns `(dictionary, cfg)`."""
    folder = Path(folder)
    cfg = read_config(folder, SAELENS_CONFIG)
    state = load_state_dict_file(folder / SAELENS_WEIGHTS).state_dict
    ae = dictionary_from_saelens(cfg, state, source=str(folder))
    return ae.to(device=device, dtype=dtype), cfg


def saelens_state(ae: Dictionary) -> tuple[dict, dict[str, torch.Tensor]]:
    """(SAELens config fields, SAELens state dict) describing `ae` exactly (see `Dictionary.to_saelens`)."""
    return ae.saelens_state()


def save_saelens(ae: Dictionary, folder: str | Path, metadata: dict | None = None) -> Path:
    """Write `ae` as a SAELens folder that `sae_lens.SAE.load_from_disk(folder)` loads with the same outputs.

    `metadata` (e.g. `model_name`, `hook_name`) goes into the config's `metadata` field.
    """
    return ae.save_saelens(folder, metadata)


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
    D = int(require_field(cfg, "d_in", source))
    F = int(cfg.get("num_latents") or D * int(require_field(cfg, "expansion_factor", source)))
    k = int(require_field(cfg, "k", source))
    if not 0 < k <= F:
        raise CheckpointError(f"{source}: k={k} must be in [1, num_latents={F}]")
    ae = AutoEncoderTopK(D, F, k)
    with torch.no_grad():
        ae.encoder.weight.copy_(checked_tensor(state, "encoder.weight", (F, D), source))
        ae.encoder.bias.copy_(checked_tensor(state, "encoder.bias", (F,), source))
        ae.decoder.weight.copy_(checked_tensor(state, "W_dec", (F, D), source).T)
        ae.b_dec.copy_(checked_tensor(state, "b_dec", (D,), source))
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
        "k": ae.active_k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": ae.activation_dim,
    }
    atomic_write_json(cfg, folder / SPARSIFY_CONFIG)
    return folder
