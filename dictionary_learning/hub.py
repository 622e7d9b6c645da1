"""Sharing dictionaries on the Hugging Face Hub: `push_to_hub` uploads a checkpoint folder (the same
files as a local save), and `load_dictionary("hf://owner/repo/sub/folder")` downloads and loads one.

A Hub address is `hf://<owner>/<repo>[@<revision>][/<folder in the repo>]`. Any folder that
`load_dictionary` reads locally can live there: ours (`ae.pt`/`ae.safetensors` + `config.json`),
SAELens's or sparsify's.
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, snapshot_download

from .files import save_dictionary

HUB_PREFIX = "hf://"


@dataclass(frozen=True)
class HubAddress:
    repo_id: str
    folder: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}{rev}" + (f"/{self.folder}" if self.folder else "")


def is_hub_address(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_hub_address(address: str) -> HubAddress:
    """`hf://owner/repo@rev/a/b` -> HubAddress("owner/repo", "a/b", "rev"); ValueError when malformed."""
    if not is_hub_address(address):
        raise ValueError(f"{address!r} is not a Hub address (hf://owner/repo[@revision][/folder])")
    parts = [p for p in address[len(HUB_PREFIX) :].split("/") if p]
    if len(parts) < 2:
        raise ValueError(f"{address!r}: a Hub address needs owner and repository: hf://owner/repo[/folder]")
    repo, _, revision = parts[1].partition("@")
    return HubAddress(f"{parts[0]}/{repo}", "/".join(parts[2:]), revision or None)


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the Hugging Face Hub opens within `timeout` seconds. True when a
    proxy is configured (we cannot tell) and False in HF_HUB_OFFLINE mode. Without this check an
    offline machine spends most of a minute in the Hub client's retries before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_error(what: str) -> OSError:
    """The one error for a Hub name that cannot be fetched because the Hub is unreachable."""
    return OSError(
        f"could not load {what}: it is not a local folder and the Hugging Face Hub is unreachable (offline?). "
        f"Pass a local path, or use load_default_model() / default_texts() for the bundled SmolLM2-135M-Instruct "
        f"and BBC News text."
    )


def download(address: str | HubAddress, cache_dir: str | Path | None = None) -> Path:
    """The local copy of a Hub folder (downloaded once, then read from the Hugging Face cache).

    Offline, a copy already in the cache is used; without one the error names the repository.
    """
    addr = parse_hub_address(address) if isinstance(address, str) else address
    patterns = [f"{addr.folder}/*"] if addr.folder else None
    kwargs = dict(repo_id=addr.repo_id, revision=addr.revision, allow_patterns=patterns, cache_dir=cache_dir)
    online = hub_reachable()
    try:
        root = Path(snapshot_download(**kwargs, local_files_only=not online))
    except Exception as e:
        if online:
            raise OSError(f"could not download {addr} from the Hugging Face Hub: {e}") from e
        raise OSError(
            f"cannot fetch {addr}: the Hugging Face Hub is unreachable (offline?) and repository "
            f"{addr.repo_id!r} is not in the local Hugging Face cache"
        ) from None
    local = root / addr.folder
    if not local.is_dir() or not any(local.iterdir()):
        raise FileNotFoundError(f"{addr}: repository {addr.repo_id!r} has no folder {addr.folder!r}")
    return local


def push_to_hub(
    ae,
    repo_id: str,
    folder: str = "",
    config: dict | None = None,
    safetensors: bool = True,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload `ae` (weights + `config.json`, as a local save writes them) to `repo_id`/`folder`,
    creating the repository if needed; returns the `hf://` address that `load_dictionary` reads."""
    if not hub_reachable():
        raise OSError(f"cannot push to {repo_id!r}: the Hugging Face Hub is unreachable (offline?)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_dictionary(ae, tmp, config=config, safetensors=safetensors)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            path_in_repo=folder or None,
            revision=revision,
            commit_message=commit_message or f"Upload {type(ae).__name__} ({ae.activation_dim} -> {ae.dict_size})",
        )
    return str(HubAddress(repo_id, folder.strip("/"), revision))


# ------------------------------------------------------------------------------- published sweeps
# The SAEBench Pythia-70m sweeps (the reference's authors' dictionaries): name -> folder in SWEEP_SOURCE.
SWEEPS = {
    "standard": "pythia70m_sweep_standard_ctx128_0712",
    "topk": "pythia70m_sweep_topk_ctx128_0730",
    "gated": "pythia70m_sweep_gated_ctx128_0730",
}
SWEEP_SOURCE = "hf://canrager/lm_sae"


def fetch_sweep_dictionary(sweep: str, site: str, trainer: int, dest: Path) -> Path:
    """Copy `ae.pt` and `config.json` of one published sweep dictionary into
    DEST/dictionaries/<sweep folder>/<site>/trainer_<i> and return that folder (FileNotFoundError
    when the source has none). $DL_SWEEPS_SOURCE replaces the Hub repository (a local mirror, for tests)."""
    import shutil

    folder = f"{SWEEPS[sweep]}/{site}/trainer_{trainer}"
    source = os.environ.get("DL_SWEEPS_SOURCE", SWEEP_SOURCE)
    try:
        local = download(f"{source}/{folder}") if source.startswith(HUB_PREFIX) else Path(source) / folder
    except FileNotFoundError:
        local = Path("/nonexistent")
    if not (local / "ae.pt").is_file():
        raise FileNotFoundError(f"{source} has no dictionary {folder} (sites resid_post_layer_0-5, trainers 0-N)")
    target = dest / "dictionaries" / folder
    target.mkdir(parents=True, exist_ok=True)
    for name in ("ae.pt", "config.json"):
        if (local / name).is_file():
            shutil.copyfile(local / name, target / name)
    return target
