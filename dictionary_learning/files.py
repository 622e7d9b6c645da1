"""Files of one dictionary: weights (`ae.pt` / `ae.safetensors`) beside `config.json`, written and
read safely, with no knowledge of the architectures (that is `checkpoint.load_dictionary`'s job).

Writes go to a temporary file that is renamed into place, so an interrupted write never leaves a
broken file. config.json records the sha256 of the weights written beside it; reading checks it,
and checks the CRC-32 of every record of a `.pt` file (a zip), so a flipped bit raises
`CheckpointError` instead of loading wrong numbers. Loading never executes code from a file
(`weights_only=True`, safetensors).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from .safe_io import atomic_write, atomic_write_json, sha256_file

WEIGHT_FILES = ("ae.safetensors", "ae.pt")
CONFIG_FILE = "config.json"
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
CHECKSUMS = "sha256"  # config.json: {file name relative to the folder: sha256 of its bytes}
PREVIOUS_CHECKSUMS = "sha256_replaced"  # the digest of the file the last save replaced (see save_recorded)


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
    (`config`, or the folder's current one), which `load_dictionary` checks; config.json is written
    once, between the new file's write and its rename into place.

    The two files change one after the other, so config.json accepts both the new file's checksum
    and the one of the file it replaces (until the next save): a kill at any instant leaves a
    folder that loads."""
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

    atomic_write(path, _writer(state_dict, path), before_rename=record)
    return path


def save_dictionary(
    ae: Any,
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
                f"file from elsewhere). Copy or download it again, or resume the run that wrote it; if you replaced "
                f"it on purpose, delete its entry under 'sha256' in the config.json beside it"
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


def write_saelens_folder(
    fields: dict[str, Any], state: dict[str, torch.Tensor], folder: str | Path, metadata: dict | None = None
) -> Path:
    """Write a SAELens folder: `sae_weights.safetensors` and `cfg.json` (the architecture's `fields`
    plus SAELens's fixed ones and `metadata`)."""
    folder = Path(folder)
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
