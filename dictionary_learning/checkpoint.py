"""Checkpoint folders: `ae.pt` or `ae.safetensors` beside `config.json`, read and written safely.

A folder written by the reference's `trainSAE`, by ours, or downloaded from the published Pythia
sets loads with `load_dictionary`. Loading never executes code from a file (`weights_only=True`,
safetensors), and writes go to a temporary file that is renamed into place, so an interrupted
write never leaves a broken checkpoint. config.json records the sha256 of the weights written
beside it; loading checks it, and checks the CRC-32 of every record of a `.pt` file (a zip), so a
flipped bit raises `CheckpointError` instead of loading wrong numbers.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from .dictionaries.base import DICTIONARY_REGISTRY, Dictionary
from .safe_io import atomic_write, atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("ae.safetensors", "ae.pt")
CONFIG_FILE = "config.json"
CHECKSUMS = "sha256"  # config.json: {file name relative to the folder: sha256 of its bytes}
PREVIOUS_CHECKSUMS = "sha256_replaced"  # only while a recorded file is being replaced


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be loaded; the message names the file and the problem."""


class WeightsFile(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    source: str
    bias_scale: float  # != 1 only for the reference's backup files, saved at the normalised scale


# --------------------------------------------------------------------------------------------- writing
def atomic_torch_save(obj: Any, path: str | Path) -> str:
    """`torch.save` to a temporary file in the same folder, then rename over `path`; returns its sha256."""
    return atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def _writer(state_dict: dict[str, torch.Tensor], path: Path) -> Callable[[str], None]:
    if path.suffix == ".safetensors":
        return lambda tmp: save_safetensors(state_dict, tmp)
    return lambda tmp: torch.save(state_dict, tmp)


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path) -> str:
    """Write a state dict as `.safetensors` or (any other suffix) a plain `torch.save` file;
    returns its sha256."""
    path = Path(path)
    return atomic_write(path, _writer(state_dict, path))


def write_config(config: dict, folder: str | Path) -> None:
    """Write `config.json`, keeping the checksums it records of files still in the folder."""
    folder = Path(folder)
    sums = {k: v for k, v in (read_config(folder).get(CHECKSUMS) or {}).items() if (folder / k).is_file()}
    config = {k: v for k, v in config.items() if k not in (CHECKSUMS, PREVIOUS_CHECKSUMS)}
    atomic_write_json(config | ({CHECKSUMS: sums} if sums else {}), folder / CONFIG_FILE)


def save_recorded(
    state_dict: dict[str, torch.Tensor], folder: str | Path, name: str, config: dict | None = None
) -> Path:
    """Write `folder/name` (a state dict) atomically with its sha256 recorded in `folder/config.json`
    (`config`, or the folder's current one), which `load_dictionary` checks.

    The two files change one after the other, so while the new weights are renamed into place
    config.json accepts both their checksum and the one of the file they replace: a kill at any
    instant leaves a folder that loads."""
    folder = Path(folder)
    path = folder / name
    current = read_config(folder)
    base = dict(current if config is None else config)
    base.pop(PREVIOUS_CHECKSUMS, None)
    sums = {k: v for k, v in (current.get(CHECKSUMS) or {}).items() if k != name and (folder / k).is_file()}
    old = (current.get(CHECKSUMS) or {}).get(name) if path.is_file() else None

    def record(digest: str) -> None:
        transition = base | {CHECKSUMS: sums | {name: digest}}
        if old is not None and old != digest:
            transition[PREVIOUS_CHECKSUMS] = {name: old}
        atomic_write_json(transition, folder / CONFIG_FILE)

    digest = atomic_write(path, _writer(state_dict, path), before_rename=record)
    atomic_write_json(base | {CHECKSUMS: sums | {name: digest}}, folder / CONFIG_FILE)
    return path


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
    into the saved copy without touching `ae`. config.json records the weights' sha256, which
    `load_dictionary` verifies.
    """
    if config is None:
        config = {"trainer": ae.architecture_config()}
    name = "ae.safetensors" if safetensors else "ae.pt"
    return save_recorded(ae.scaled_state_dict(bias_scale), folder, name, config)


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


def verify_file(path: Path, accepted: Collection[str] = ()) -> None:
    """Raise `CheckpointError` naming `path` unless its sha256 is one of `accepted` (when any is
    recorded) or, without a recorded checksum, unless every record of a zip (a `.pt` file) has
    the CRC-32 stored with it. Files with neither (older safetensors) are not checked."""
    if accepted:
        actual = sha256_file(path)
        if actual not in accepted:
            raise CheckpointError(
                f"{path} is corrupted or truncated: its sha256 is {actual[:16]}..., not the "
                f"{next(iter(accepted))[:16]}... recorded when it was written (a flipped bit, a partial copy or a "
                f"file from elsewhere). Copy or download it again, or resume the run that wrote it"
            )
        return
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"{path} is truncated or damaged: {e}") from e
        if bad is not None:
            raise CheckpointError(
                f"{path} is corrupted: its record {bad} fails its CRC-32 check (a flipped bit or a partial copy). "
                f"Copy or download it again, or resume the run that wrote it"
            )


def torch_load_checked(path: str | Path, accepted: Collection[str] = ()) -> Any:
    """`torch.load` without running code from the file, after `verify_file`; every failure is a
    `CheckpointError` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the write that made it did not finish")
    verify_file(path, accepted)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds pickled Python objects beyond tensors; it was not loaded because that would "
            f"run code from the file. Re-save it as a plain state dict (torch.save(model.state_dict())). "
            f"Detail: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or is not a PyTorch file: {e or type(e).__name__}") from e


def load_state_dict_file(path: str | Path, accepted: Collection[str] = ()) -> WeightsFile:
    """Read a state dict from `ae.pt`/`ae.safetensors` (or a folder), on CPU, without running code.
    `accepted`: the sha256 digests the file may have (see `verify_file`)."""
    path = resolve_weights_path(path)
    if path.suffix == ".safetensors":
        verify_file(path, accepted)
        try:
            obj: Any = load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is truncated or is not a readable safetensors file: {e}") from e
    else:
        obj = torch_load_checked(path, accepted)
    bias_scale = 1.0
    if isinstance(obj, dict) and isinstance(obj.get("ae"), dict) and "optimizer" in obj:
        # The reference's `backup_steps` overwrite ae.pt with {"ae", "optimizer", "norm_factor", ...},
        # the weights at the normalised scale.
        bias_scale = float(obj.get("norm_factor") or 1.0)
        obj = obj["ae"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return WeightsFile({k: v for k, v in obj.items()}, str(path), bias_scale)


def read_checkpoint(path: str | Path) -> tuple[WeightsFile, dict]:
    """The weights (checked against the sha256 that config.json records for them) and the
    config of a checkpoint folder, or of a weights file inside one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if folder.name == "checkpoints" and not (folder / CONFIG_FILE).is_file():
        folder = folder.parent  # trainer_i/checkpoints/ae_{step}.pt: the run's config is one level up
    config = read_config(folder)
    weights_path = resolve_weights_path(path)
    return load_state_dict_file(weights_path, recorded_checksums(folder, weights_path, config)), config


def recorded_checksums(folder: Path, path: Path, config: dict) -> set[str]:
    """The sha256 digests config.json of `folder` accepts for `path` (empty when none is recorded)."""
    try:
        name = path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return set()
    found = {(config.get(key) or {}).get(name) for key in (CHECKSUMS, PREVIOUS_CHECKSUMS)}
    return {d for d in found if isinstance(d, str)}


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
    weights, config = read_checkpoint(base_path)
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
