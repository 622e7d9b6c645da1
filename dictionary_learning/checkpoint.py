"""Checkpoint folders into dictionaries: `load_dictionary` picks the architecture and the format.

A folder written by the reference's `trainSAE`, by ours, or downloaded from the published Pythia
sets loads with `load_dictionary`, as do SAELens and sparsify folders (see `interop`). Reading and
writing the files themselves (atomically, with checksums, never running code) is `files`'.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .dictionaries.base import DICTIONARY_REGISTRY, Dictionary
from .files import (
    CHECKSUMS,
    CONFIG_FILE,
    PREVIOUS_CHECKSUMS,
    WEIGHT_FILES,
    CheckpointError,
    WeightsFile,
    atomic_torch_save,
    load_state_dict_file,
    read_checkpoint,
    read_config,
    recorded_checksums,
    resolve_weights_path,
    save_dictionary,
    save_recorded,
    save_state_dict,
    torch_load_checked,
    verify_file,
    write_config,
)
from .safe_io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [  # the file functions live in `files`; these names stay importable from here
    "CHECKSUMS",
    "CONFIG_FILE",
    "PREVIOUS_CHECKSUMS",
    "WEIGHT_FILES",
    "CheckpointError",
    "WeightsFile",
    "atomic_torch_save",
    "atomic_write_json",
    "get_nested_folders",
    "infer_dictionary_class",
    "load_dictionary",
    "load_state_dict_file",
    "read_checkpoint",
    "read_config",
    "recorded_checksums",
    "resolve_weights_path",
    "save_dictionary",
    "save_recorded",
    "save_state_dict",
    "torch_load_checked",
    "verify_file",
    "write_config",
]


def infer_dictionary_class(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> type[Dictionary]:
    """The registered architecture whose state-dict keys match; the first registered wins a tie."""
    keys = set(state_dict)
    if not keys:
        raise CheckpointError(f"{source} holds an empty state dict and config.json names no dict_class")
    matches = [cls for cls in DICTIONARY_REGISTRY.values() if cls.matches_state_dict(keys, state_dict)]
    if not matches:
        raise CheckpointError(
            f"{source}: keys {sorted(keys)} match no known dictionary architecture ({', '.join(DICTIONARY_REGISTRY)})"
        )
    if len(matches) > 1:
        logger.warning(
            "%s: keys fit %s; loading as %s (name dict_class in config.json to choose)",
            source,
            [c.__name__ for c in matches],
            matches[0].__name__,
        )
    return matches[0]


def _choose_class(config: dict, state_dict: dict[str, torch.Tensor], source: str) -> type[Dictionary]:
    name = (config.get("trainer") or {}).get("dict_class")
    if name is None:
        return infer_dictionary_class(state_dict, source)
    cls = DICTIONARY_REGISTRY.get(name)
    if cls is None:
        raise CheckpointError(
            f"{source}: config.json names dict_class {name!r}, which is not one of {', '.join(DICTIONARY_REGISTRY)}"
        )
    if cls.matches_state_dict(set(state_dict), state_dict):
        return cls
    # The reference's StandardTrainer records "AutoEncoder" whatever class it trained (its bug 12).
    inferred = infer_dictionary_class(state_dict, source)
    logger.warning(
        "%s: config says %s but the weights are a %s; loading as %s", source, name, inferred.__name__, inferred.__name__
    )
    return inferred


def _check_against_config(ae: Dictionary, config: dict, source: str) -> None:
    trainer = config.get("trainer") or {}
    for key in ("activation_dim", "dict_size", "output_dim"):
        expected = trainer.get(key)
        if expected is not None and int(expected) != getattr(ae, key):
            raise CheckpointError(
                f"{source}: config.json says {key}={expected} but the weights have {key}={getattr(ae, key)}"
            )
    if "k" in trainer and hasattr(ae, "active_k") and int(trainer["k"]) != ae.active_k:
        logger.warning(
            "%s: config.json says k=%s, the weights hold k=%s; using the weights' k", source, trainer["k"], ae.active_k
        )


def load_dictionary(
    base_path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Dictionary, dict]:
    """Load a checkpoint folder (or weights file) and return `(dictionary, config)`.

    `base_path` may be a Hub address, `hf://owner/repo[@revision]/folder` (downloaded once, see `hub`).
    SAELens folders (`cfg.json` + `sae_weights.safetensors`) and sparsify folders (`cfg.json` +
    `sae.safetensors`) are recognised by their files and converted (see `interop`); `config` is
    then their `cfg.json`.

    The class comes from `config["trainer"]["dict_class"]` when present, else from the state-dict
    keys (the published `10_32768` Pythia dictionaries have no class name in their config).
    """
    from .hub import download, is_hub_address  # both build on this module
    from .interop import folder_format, load_saelens, load_sparsify

    if is_hub_address(base_path):
        base_path = download(base_path)
    base_path = Path(base_path)

    foreign = folder_format(base_path)
    if foreign is not None and not any((base_path / name).is_file() for name in ("ae.pt", "ae.safetensors")):
        return (load_saelens if foreign == "saelens" else load_sparsify)(base_path, device=device, dtype=dtype)
    weights, config = read_checkpoint(base_path)
    cls = _choose_class(config, weights.state_dict, weights.source)
    extra = {} if cls._expected_keys() else {"activation_dim": (config.get("trainer") or {}).get("activation_dim")}
    ae = cls.from_state_dict(weights.state_dict, source=weights.source, **extra)
    if weights.bias_scale != 1.0:
        ae.scale_biases(weights.bias_scale)
    _check_against_config(ae, config, weights.source)
    if (config.get("trainer") or {}).get("transcoder"):  # a same-width JumpReLU transcoder's keys are an SAE's
        ae.transcoder = True
    if dtype is not None or device is not None:
        ae = ae.to(device=device, dtype=dtype)
    return ae, config


def get_nested_folders(path: str | Path) -> list[str]:
    """Every folder under `path` (itself included) that holds `ae.pt` or `ae.safetensors`, as
    strings (the reference's return type: its scripts do `folder + "/ae.pt"`), sorted."""
    found = []
    for root, _dirs, files in os.walk(path):
        if any(name in files for name in WEIGHT_FILES):
            found.append(str(root))
    return sorted(found)
