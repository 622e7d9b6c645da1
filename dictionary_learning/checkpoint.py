"""Checkpoint folders: `ae.pt` or `ae.safetensors` beside `config.json`, read and written safely.

A folder written by the reference's `trainSAE`, by ours, or downloaded from the published Pythia
sets loads with `load_dictionary`. Loading never executes code from a file (`weights_only=True`,
safetensors), and writes go to a temporary file that is renamed into place, so an interrupted
write never leaves a broken checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from .dictionaries.base import DICTIONARY_REGISTRY, Dictionary

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("ae.safetensors", "ae.pt")
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be loaded; the message names the file and the problem."""


class WeightsFile(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    source: str
    bias_scale: float  # != 1 only for the reference's backup files, saved at the normalised scale


# --------------------------------------------------------------------------------------------- writing
def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temporary file in the same folder, then rename over `path`."""
    _atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj: Any, path: str | Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=4)

    _atomic_write(Path(path), write)


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as `.safetensors` or (any other suffix) a plain `torch.save` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        _atomic_write(path, lambda tmp: save_safetensors(state_dict, tmp))
    else:
        atomic_torch_save(state_dict, path)


def save_dictionary(
    ae: Dictionary,
    folder: str | Path,
    config: dict | None = None,
    safetensors: bool = False,
    bias_scale: float = 1.0,
) -> Path:
    """Write `ae` into `folder` as `ae.pt` (or `ae.safetensors`) plus `config.json`.

    `config` defaults to `{"trainer": ae.architecture_config()}`, which is enough for
    `load_dictionary` and for the reference's loader. `bias_scale` folds a normalisation factor
    into the saved copy without touching `ae`.
    """
    folder = Path(folder)
    weights = folder / ("ae.safetensors" if safetensors else "ae.pt")
    save_state_dict(ae.scaled_state_dict(bias_scale), weights)
    if config is None:
        config = {"trainer": ae.architecture_config()}
    atomic_write_json(config, folder / CONFIG_FILE)
    return weights


# --------------------------------------------------------------------------------------------- reading
def resolve_weights_path(path: str | Path) -> Path:
    """`path` itself if it is a file, else the `ae.safetensors` or `ae.pt` inside the folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"folder {path} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
    raise CheckpointError(f"{path} does not exist")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds pickled Python objects beyond tensors; it was not loaded because that would "
            f"run code from the file. Re-save it as a plain state dict (torch.save(model.state_dict())). "
            f"Detail: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is truncated or is not a PyTorch file: {e}") from e


def load_state_dict_file(path: str | Path) -> WeightsFile:
    """Read a state dict from `ae.pt`/`ae.safetensors` (or a folder), on CPU, without running code."""
    path = resolve_weights_path(path)
    if path.suffix == ".safetensors":
        try:
            obj: Any = load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is truncated or is not a readable safetensors file: {e}") from e
    else:
        obj = _torch_load(path)
    bias_scale = 1.0
    if isinstance(obj, dict) and isinstance(obj.get("ae"), dict) and "optimizer" in obj:
        # The reference's `backup_steps` overwrite ae.pt with {"ae", "optimizer", "norm_factor", ...},
        # the weights at the normalised scale.
        bias_scale = float(obj.get("norm_factor") or 1.0)
        obj = obj["ae"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return WeightsFile({k: v for k, v in obj.items()}, str(path), bias_scale)


def read_config(folder: str | Path, name: str = CONFIG_FILE) -> dict:
    """The parsed `config.json` (or `name`) of a checkpoint folder, or `{}` when there is none."""
    path = Path(folder) / name
    if not path.is_file():
        return {}
    try:
        with open(path) as fh:
            config = json.load(fh)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} should hold a JSON object, got {type(config).__name__}")
    return config


def infer_dictionary_class(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> type[Dictionary]:
    """The registered architecture whose state-dict keys match; the first registered wins a tie."""
    keys = set(state_dict)
    if not keys:
        raise CheckpointError(f"{source} holds an empty state dict and config.json names no dict_class")
    matches = [cls for cls in DICTIONARY_REGISTRY.values() if cls.matches_state_dict(keys)]
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
    if cls.matches_state_dict(set(state_dict)):
        return cls
    # The reference's StandardTrainer records "AutoEncoder" whatever class it trained (its bug 12).
    inferred = infer_dictionary_class(state_dict, source)
    logger.warning(
        "%s: config says %s but the weights are a %s; loading as %s", source, name, inferred.__name__, inferred.__name__
    )
    return inferred


def _check_against_config(ae: Dictionary, config: dict, source: str) -> None:
    trainer = config.get("trainer") or {}
    for key in ("activation_dim", "dict_size"):
        expected = trainer.get(key)
        if expected is not None and int(expected) != getattr(ae, key):
            raise CheckpointError(
                f"{source}: config.json says {key}={expected} but the weights have {key}={getattr(ae, key)}"
            )
    if "k" in trainer and hasattr(ae, "_k") and int(trainer["k"]) != ae._k:
        logger.warning(
            "%s: config.json says k=%s, the weights hold k=%s; using the weights' k", source, trainer["k"], ae._k
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
    folder = base_path if base_path.is_dir() else base_path.parent
    if folder.name == "checkpoints" and not (folder / CONFIG_FILE).is_file():
        folder = folder.parent  # trainer_i/checkpoints/ae_{step}.pt: the run's config is one level up
    config = read_config(folder)
    weights = load_state_dict_file(base_path)
    cls = _choose_class(config, weights.state_dict, weights.source)
    extra = {} if cls._expected_keys() else {"activation_dim": (config.get("trainer") or {}).get("activation_dim")}
    ae = cls.from_state_dict(weights.state_dict, source=weights.source, **extra)
    if weights.bias_scale != 1.0:
        ae.scale_biases(weights.bias_scale)
    _check_against_config(ae, config, weights.source)
    if dtype is not None or device is not None:
        ae = ae.to(device=device, dtype=dtype)
    return ae, config


def get_nested_folders(path: str | Path) -> list[Path]:
    """Every folder under `path` (itself included) that holds `ae.pt` or `ae.safetensors`."""
    found = []
    for root, _dirs, files in os.walk(path):
        if any(name in files for name in WEIGHT_FILES):
            found.append(Path(root))
    return sorted(found)
