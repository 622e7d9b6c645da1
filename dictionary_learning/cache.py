"""ActivationCache: run the model once, keep its activations on disk, train many dictionaries from them.

A cache folder holds safetensors shards (`shard_00000.safetensors`, ...: one `[n, d]` tensor per
site plus the `[n]` token ids) and `manifest.json` (model, sites, io, dtype, widths, token counts,
norm statistics, whether it is complete). Reading serves shuffled batches of a fixed size from a
seeded, reproducible order, and can jump to any batch index, so trainSAE resumes without replay.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .buffer import ActivationReader
from .checkpoint import _atomic_write, atomic_write_json
from .distributed import check_shard
from .nnsight_io import torch_model

FORMAT = "dictionary_learning.activation_cache"
MANIFEST = "manifest.json"


class CacheError(ValueError):
    """A cache folder is missing, partial, foreign, or does not match what was asked for."""


def model_id(model) -> str:
    """A name for the model: its Hub id or path, else its family and parameter count."""
    hf = torch_model(model)
    name = getattr(hf.config, "_name_or_path", "") or getattr(hf, "name_or_path", "")
    return name or f"{hf.config.model_type}-{sum(p.numel() for p in hf.parameters())}"


class ActivationCache:
    """Shuffled batches from a cache folder; an iterable that trainSAE accepts like a buffer.

    Args:
        path: the cache folder (made by `ActivationCache.build`).
        batch_size: rows per batch; batches continue across shard and epoch boundaries.
        seed: fixes the shard order and the in-shard shuffle of every epoch.
        loop: start another epoch (a new order) instead of stopping after one.
        sites: names of the sites to serve (default all); one site gives tensors, several dicts.
        dtype: cast served batches (e.g. to float32 from a bfloat16 cache).
        expected_model / expected_sites: raise CacheError unless the cache matches them.
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 8192,
        shuffle: bool = True,
        seed: int = 0,
        loop: bool = False,
        sites: list[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        expected_model: str | None = None,
        expected_sites: list[str] | None = None,
    ):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest["complete"]:
            raise CacheError(
                f"{self.path} is a partial cache ({self.manifest['n_tokens']} tokens written so far): "
                f"rerun ActivationCache.build with the same folder to finish it"
            )
        names = [s["name"] for s in self.manifest["sites"]]
        if expected_model is not None and expected_model != self.manifest["model"]:
            raise CacheError(f"{self.path} holds activations of {self.manifest['model']!r}, not {expected_model!r}")
        if expected_sites is not None and list(expected_sites) != names:
            raise CacheError(f"{self.path} holds activations of {names}, not {list(expected_sites)}")
        self.sites = list(sites) if sites is not None else names
        unknown = [s for s in self.sites if s not in names]
        if unknown:
            raise CacheError(f"{self.path} has no site {unknown}; it holds {names}")
        for shard in self.manifest["shards"]:
            if not (self.path / shard["file"]).is_file():
                raise CacheError(f"{self.path}: shard {shard['file']} listed in the manifest is missing")
        self.batch_size, self.shuffle, self.seed, self.loop = int(batch_size), shuffle, seed, loop
        self.device, self.dtype = torch.device(device), dtype
        self.n_tokens = self.manifest["n_tokens"]
        if self.n_tokens == 0:
            raise CacheError(f"{self.path} holds no tokens")
        self._start_batch = 0
        self._rank, self._world_size = 0, 1
        self._loaded: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None

    # ------------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        """Batches in one epoch (the last may be partial)."""
        return math.ceil(self.n_tokens / self.batch_size)

    def skip_batches(self, n: int) -> None:
        """Start the next iteration `n` batches later (trainSAE uses this to resume without replay)."""
        self._start_batch += n

    def shard(self, rank: int, world_size: int) -> None:
        """Read only batches rank, rank + world_size, ... (data-parallel training: disjoint shares)."""
        check_shard(rank, world_size)
        self._rank, self._world_size = rank, world_size

    def __iter__(self) -> Iterator:
        index = self._start_batch * self._world_size + self._rank  # batch number in the unsharded stream
        while self.loop or index * self.batch_size < self.n_tokens:
            position = index * self.batch_size
            end = position + self.batch_size if self.loop else min(position + self.batch_size, self.n_tokens)
            parts = self._rows(position, end)
            index += self._world_size
            batch = {name: torch.cat([p[name] for p in parts]) for name in self.sites}
            batch = {k: v.to(self.device, self.dtype) if self.dtype else v.to(self.device) for k, v in batch.items()}
            yield batch if len(self.sites) > 1 else batch[self.sites[0]]

    def _rows(self, start: int, end: int) -> list[dict[str, torch.Tensor]]:
        """Rows [start, end) of the endless stream: epoch after epoch, each a shuffled pass over all shards."""
        parts = []
        while start < end:
            epoch, offset = divmod(start, self.n_tokens)
            order = self._shard_order(epoch)
            sizes = [self.manifest["shards"][k]["n_tokens"] for k in order]
            k = 0
            while offset >= sizes[k]:
                offset -= sizes[k]
                k += 1
            shard = self._shard(epoch, order[k])
            take = min(end - start, sizes[k] - offset)
            parts.append({name: t[offset : offset + take] for name, t in shard.items()})
            start += take
        return parts

    def _shard_order(self, epoch: int) -> list[int]:
        n = len(self.manifest["shards"])
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()

    def _shard(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        if self._loaded is None or self._loaded[0] != (epoch, index):
            tensors = load_file(str(self.path / self.manifest["shards"][index]["file"]))
            if self.shuffle:
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + index)
                perm = torch.randperm(tensors["tokens"].shape[0], generator=gen)
                tensors = {name: tensors[name][perm] for name in [*self.sites, "tokens"]}
            self._loaded = ((epoch, index), tensors)
        return self._loaded[1]

    @property
    def config(self) -> dict[str, Any]:
        """What trainSAE records under "buffer" in config.json."""
        m = self.manifest
        widths = {s["name"]: s["d"] for s in m["sites"]}
        return {
            "cache": str(self.path),
            "model": m["model"],
            "io": m["io"],
            "ctx_len": m["ctx_len"],
            "d_submodule": widths[self.sites[0]] if len(self.sites) == 1 else [widths[s] for s in self.sites],
            "out_batch_size": self.batch_size,
            "submodules": self.sites,
            "n_tokens": self.n_tokens,
        }

    def mean_squared_norm(self, site: str | None = None) -> float:
        """Mean of ||x||^2 over all cached rows of a site (recorded while building)."""
        return self.manifest["norms"][site or self.sites[0]]["mean_squared_norm"]

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        path: str | Path,
        model,
        submodule,
        data: Iterable,
        n_tokens: int,
        io: str = "out",
        ctx_len: int = 128,
        refresh_batch_size: int = 32,
        dtype: torch.dtype = torch.float32,
        shard_tokens: int = 2**16,
        remove_bos: bool = False,
        add_special_tokens: bool = True,
        max_activation_norm_multiple: float | None = None,
        progress: bool = True,
    ) -> ActivationCache:
        """Write about `n_tokens` activations of `model` at `submodule` (one site, or a list / dict
        of sites read in one pass) into `path`, then return a reader of it.

        Interrupted builds resume: calling `build` again with the same folder, model, sites and
        a data source that yields the same documents continues where it stopped.
        """
        from tqdm.auto import tqdm

        path = Path(path)
        reader = ActivationReader(
            data,
            model,
            submodule,
            None,
            io,
            ctx_len,
            refresh_batch_size,
            remove_bos,
            add_special_tokens,
            max_activation_norm_multiple,
        )
        manifest = _start_manifest(path, reader, model, dtype)
        for _ in range(manifest["documents_read"]):  # resume: skip documents already cached
            next(reader.data, None)
        reader.items_read = manifest["documents_read"]
        names = [s["name"] for s in manifest["sites"]]
        pending: list[list[torch.Tensor]] = []
        bar = tqdm(
            total=n_tokens, initial=manifest["n_tokens"], disable=not progress, desc="caching activations", unit="tok"
        )
        while manifest["n_tokens"] < n_tokens:
            acts = reader._next_activations(return_ids=True)
            if acts is None:
                break
            pending.append(acts)
            pending_tokens = sum(a[0].shape[0] for a in pending)
            if pending_tokens >= shard_tokens or manifest["n_tokens"] + pending_tokens >= n_tokens:
                bar.update(_write_shard(path, manifest, names, pending, dtype, reader.items_read, n_tokens))
                pending = []
        if pending:
            bar.update(_write_shard(path, manifest, names, pending, dtype, reader.items_read, n_tokens))
        bar.close()
        manifest["complete"] = True
        atomic_write_json(manifest, path / MANIFEST)
        return cls(path)


def read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise CacheError(f"{path} does not exist or is not a folder")
    file = path / MANIFEST
    if not file.is_file():
        raise CacheError(f"{path} is not an activation cache: it has no {MANIFEST}")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{file} is not a dictionary_learning activation cache manifest")
    return manifest


def _start_manifest(path: Path, reader: ActivationReader, model, dtype: torch.dtype) -> dict:
    sites = [{"name": n, "module": s.name, "d": d} for n, s, d in zip(reader.names, reader.sites, reader.widths)]
    fresh = {
        "format": FORMAT,
        "version": 1,
        "library_version": __version__,
        "model": model_id(model),
        "sites": sites,
        "io": reader.io,
        "dtype": str(dtype).removeprefix("torch."),
        "ctx_len": reader.ctx_len,
        "remove_bos": reader.remove_bos,
        "n_tokens": 0,
        "documents_read": 0,
        "shards": [],
        "norms": {s["name"]: {"sum_squared_norm": 0.0, "mean_squared_norm": None} for s in sites},
        "complete": False,
    }
    if not (path / MANIFEST).exists():
        path.mkdir(parents=True, exist_ok=True)
        return fresh
    existing = read_manifest(path)
    for key in ("model", "sites", "io", "dtype", "ctx_len", "remove_bos"):
        if existing[key] != fresh[key]:
            raise CacheError(
                f"{path} already holds a cache with {key}={existing[key]!r}, not {fresh[key]!r}; use another folder"
            )
    return existing


def _write_shard(
    path: Path,
    manifest: dict,
    names: list[str],
    pending: list[list[torch.Tensor]],
    dtype: torch.dtype,
    documents_read: int,
    n_tokens: int,
) -> int:
    """Append one shard (atomically), then record it in the manifest; returns the tokens written."""
    columns = [torch.cat([acts[i] for acts in pending]) for i in range(len(names) + 1)]
    keep = min(columns[0].shape[0], n_tokens - manifest["n_tokens"])
    tensors = {name: col[:keep].to("cpu", dtype).contiguous() for name, col in zip(names, columns)}
    tensors["tokens"] = columns[-1][:keep].to("cpu", torch.int32).contiguous()
    file = f"shard_{len(manifest['shards']):05d}.safetensors"
    _atomic_write(path / file, lambda tmp: save_file(tensors, tmp))
    for name in names:
        norms = manifest["norms"][name]
        norms["sum_squared_norm"] += float(tensors[name].float().flatten(1).pow(2).sum())
    manifest["shards"].append({"file": file, "n_tokens": keep})
    manifest["n_tokens"] += keep
    manifest["documents_read"] = documents_read
    for name in names:
        norms = manifest["norms"][name]
        norms["mean_squared_norm"] = norms["sum_squared_norm"] / manifest["n_tokens"]
    atomic_write_json(manifest, path / MANIFEST)
    return keep
