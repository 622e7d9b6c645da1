"""ActivationCache: run the model once, keep its activations on disk, train many dictionaries from them.

A cache folder holds safetensors shards (`shard_00000.safetensors`, ...: one `[n, d]` tensor per
site plus the `[n]` token ids) and `manifest.json` (model, sites, io, dtype, widths, token counts,
norm statistics, whether it is complete). Reading serves shuffled batches of a fixed size from a
seeded, reproducible order, and can jump to any batch index, so trainSAE resumes without replay.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ._version import __version__
from .data import text_record
from .distributed import check_shard
from .nnsight_io import model_id, torch_model
from .reader import ActivationReader
from .safe_io import FolderLock, atomic_write, atomic_write_json, remove_dead_temporaries, sha256_file

logger = logging.getLogger(__name__)

FORMAT = "dictionary_learning.activation_cache"
MANIFEST = "manifest.json"


class CacheError(ValueError):
    """A cache folder is missing, partial, foreign, or does not match what was asked for."""


def model_fingerprint(model) -> str:
    """What tells two models with the same architecture apart: a sha256 of a few of their
    parameter tensors (the first, the middle and the last, up to 1M values each) and of the
    tokenizer's vocabulary. Two checkpoints of one architecture, or a base and a fine-tuned model,
    get different fingerprints."""
    digest = hashlib.sha256()
    params = list(torch_model(model).named_parameters())
    for name, param in [params[0], params[len(params) // 2], params[-1]] if params else []:
        digest.update(f"{name}{tuple(param.shape)}".encode())
        if param.device.type != "meta":  # a model whose weights are not loaded yet has only shapes
            values = param.detach().flatten()[: 1 << 20].to("cpu", torch.float32).contiguous()
            digest.update(values.numpy().tobytes())
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
        digest.update(json.dumps([type(tokenizer).__name__, vocab]).encode())
    return digest.hexdigest()[:32]


class ActivationCache:
    """Shuffled batches from a cache folder; an iterable that trainSAE accepts like a buffer.

    Args:
        path: the cache folder (made by `ActivationCache.build`).
        batch_size: rows per batch; batches continue across shard and epoch boundaries.
        seed: fixes the shard order and the in-shard shuffle of every epoch.
        loop: start another epoch (a new order) instead of stopping after one.
        sites: names of the sites to serve (default all); one site gives tensors, several dicts.
        dtype: cast served batches (e.g. to float32 from a bfloat16 cache).
        stack_sites: serve several sites of one width as `[B, n_sites, d]` (a crosscoder's batches).
        expected_model / expected_sites: raise CacheError unless the cache matches them; the model
            as its id (`model_id`), or as the model itself, which also compares the fingerprint of
            its weights and tokenizer (`model_fingerprint`) when the cache records one.

    Opening checks the manifest (its fields, and its counts against the shards' own headers);
    each shard's sha256 is checked when it is read. Problems raise `CacheError` naming the file.
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
        expected_model: Any = None,
        expected_sites: list[str] | None = None,
        stack_sites: bool = False,
    ):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest["complete"]:
            raise CacheError(
                f"{self.path} is a partial cache ({self.manifest['n_tokens']} tokens written so far): "
                f"rerun ActivationCache.build with the same folder to finish it"
            )
        check_shards(self.path, self.manifest)
        names = [s["name"] for s in self.manifest["sites"]]
        if expected_model is not None:
            _check_model(self.path, self.manifest, expected_model)
        if expected_sites is not None and list(expected_sites) != names:
            raise CacheError(f"{self.path} holds activations of {names}, not {list(expected_sites)}")
        self.sites = list(sites) if sites is not None else names
        unknown = [s for s in self.sites if s not in names]
        if unknown:
            raise CacheError(f"{self.path} has no site {unknown}; it holds {names}")
        widths = {s["name"]: s["d"] for s in self.manifest["sites"]}
        if stack_sites and (len(self.sites) < 2 or len({widths[s] for s in self.sites}) > 1):
            raise CacheError(f"stack_sites=True stacks several sites of one width; {self.path} serves {self.sites}")
        self.stack_sites = stack_sites
        self.batch_size, self.shuffle, self.seed, self.loop = int(batch_size), shuffle, seed, loop
        self.device, self.dtype = torch.device(device), dtype
        self.n_tokens = self.manifest["n_tokens"]
        if self.n_tokens == 0:
            raise CacheError(f"{self.path} holds no tokens")
        self._start_batch = 0
        self._served = 0  # batches served by the current iteration
        self._rank, self._world_size = 0, 1
        self._loaded: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None
        self._hasher: ThreadPoolExecutor | None = None
        self._checks: dict[int, Future] = {}  # shard index -> its sha256, computed ahead of its use

    # ------------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        """Batches in one epoch (the last may be partial)."""
        return math.ceil(self.n_tokens / self.batch_size)

    def skip_batches(self, n: int) -> None:
        """Start the next iteration `n` batches later (trainSAE uses this to resume without replay)."""
        self._start_batch += n

    def state_dict(self) -> dict[str, Any]:
        """The order a resumed run must read in again: the shuffle and its seed."""
        return {"seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Read in the order of an earlier run's reader (`state_dict`)."""
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self._loaded = None

    def shard(self, rank: int, world_size: int) -> None:
        """Read only batches rank, rank + world_size, ... (data-parallel training: disjoint shares)."""
        check_shard(rank, world_size)
        self._rank, self._world_size = rank, world_size

    def __iter__(self) -> Iterator:
        index = self._start_batch * self._world_size + self._rank  # batch number in the unsharded stream
        self._served = 0
        while self.loop or index * self.batch_size < self.n_tokens:
            position = index * self.batch_size
            end = position + self.batch_size if self.loop else min(position + self.batch_size, self.n_tokens)
            parts = self._rows(position, end)
            index += self._world_size
            batch = {name: torch.cat([p[name] for p in parts]) for name in self.sites}
            batch = {k: v.to(self.device, self.dtype) if self.dtype else v.to(self.device) for k, v in batch.items()}
            self._served += 1
            if self.stack_sites:
                yield torch.stack([batch[name] for name in self.sites], dim=1)
            else:
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
            tensors = read_shard(self.path, self.manifest["shards"][index], self._checks.pop(index, None))
            self._check_next(epoch, index)
            if self.shuffle:
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + index)
                perm = torch.randperm(tensors["tokens"].shape[0], generator=gen)
                tensors = {name: tensors[name][perm] for name in [*self.sites, "tokens"]}
            self._loaded = ((epoch, index), tensors)
        return self._loaded[1]

    def _check_next(self, epoch: int, index: int) -> None:
        """Start hashing the shard that comes after `index` in a background thread (hashlib releases
        the GIL), so its check is done, and its bytes are in the page cache, by the time it is read."""
        order = self._shard_order(epoch)
        position = order.index(index)
        if position + 1 == len(order) and not self.loop:
            return
        following = order[position + 1] if position + 1 < len(order) else self._shard_order(epoch + 1)[0]
        entry = self.manifest["shards"][following]
        if following == index or following in self._checks or entry.get("sha256") is None:
            return
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="shard-check")
        self._checks[following] = self._hasher.submit(sha256_file, self.path / entry["file"])

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
            "modules": {site["name"]: site.get("module") for site in m["sites"] if site["name"] in self.sites},
            "n_tokens": self.n_tokens,
            "loop": self.loop,
            "packed": m.get("packed", False),
            "remove_bos": m.get("remove_bos", False),
            "text": m.get("text"),
            "stack_sites": self.stack_sites,
            "n_sites": len(self.sites),
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def batches_left(self, needed: int | None = None) -> int | None:
        """Batches left in this pass (None when looping: endless); `needed` is the buffer's hint."""
        return None if self.loop else max(0, len(self) - self._start_batch - self._served)

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
        pack: bool = True,
        allow_fewer: bool = False,
        stack_sites: bool = False,
    ) -> ActivationCache:
        """Write `n_tokens` activations of `model` at `submodule` (one site, or a list / dict of
        sites read in one pass) into `path`, then return a reader of it.

        Documents are packed into contexts of `ctx_len` tokens (`pack=False`: one truncated context
        per document). When the text holds fewer tokens than asked, the build fails with both
        numbers, before running the model when the source is a list or a finite `Documents` (it is
        tokenized once to count), or when the text runs out (the folder is then a partial cache that
        a build asking for fewer tokens completes); `allow_fewer=True` keeps what there is instead.

        Interrupted builds resume: calling `build` again with the same folder, model (checked by
        its fingerprint), sites and a data source that yields the same documents continues where
        it stopped. One process builds a folder at a time (a lock file); a second one fails at once.
        `stack_sites=True` checks, before the text is read, that the sites can be served stacked (a
        crosscoder's `[B, L, d]`: several sites of one width) and returns a reader that stacks them.
        """
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise CacheError(f"n_tokens must be a positive int, got {n_tokens!r}")
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
            pack,
        )
        if stack_sites and (len(reader.widths) < 2 or len(set(reader.widths)) > 1):
            raise CacheError(
                f"stack_sites=True stacks several sites of one width, got {reader.names} of widths {reader.widths}"
            )
        if not allow_fewer:
            _check_enough_text(path, data, reader, n_tokens)
        with FolderLock(path, "cache build"):
            remove_dead_temporaries(path)
            _fill(path, reader, model, dtype, n_tokens, shard_tokens, progress, allow_fewer)
        return cls(path, stack_sites=stack_sites)


def _check_enough_text(path: Path, data: Any, reader: ActivationReader, n_tokens: int) -> None:
    available = reader.text_tokens()
    if available is not None and available < n_tokens:
        raise CacheError(_too_little_text(path, n_tokens, available, "holds"))


def _too_little_text(path: Path, asked: int, available: int, verb: str) -> str:
    return (
        f"{path}: {asked:,} tokens asked, but the text {verb} only {available:,}: ask for at most {available:,} "
        f"(--tokens {available}), give more text, or pass allow_fewer=True (--allow-fewer) to keep what there is"
    )


def _fill(
    path: Path,
    reader: ActivationReader,
    model,
    dtype: torch.dtype,
    n_tokens: int,
    shard_tokens: int,
    progress: bool,
    allow_fewer: bool,
) -> None:
    """Write shards into `path` until it holds `n_tokens` rows (continuing a partial build), then mark it complete."""
    from tqdm.auto import tqdm

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
        acts = reader.next_activations(return_ids=True)
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
    if manifest["n_tokens"] == 0:
        raise CacheError(
            f"{path}: the data yielded no tokens ({manifest['documents_read']} documents read), so nothing was "
            f"cached; check the text source (an empty file or dataset, or texts that are all empty)"
        )
    if manifest["n_tokens"] < n_tokens:
        if not allow_fewer:  # left partial: a build asking for fewer tokens completes it
            raise CacheError(_too_little_text(path, n_tokens, manifest["n_tokens"], "ran out after"))
        logger.warning("%s: the text ran out after %d of %d tokens; kept them", path, manifest["n_tokens"], n_tokens)
    manifest["complete"] = True
    atomic_write_json(manifest, path / MANIFEST)


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
    _validate_manifest(file, manifest)
    return manifest


# What each manifest field must be: a JSON type, or a check of the value.
_MANIFEST_FIELDS: dict[str, Any] = {
    "model": str,
    "sites": list,
    "io": str,
    "dtype": str,
    "ctx_len": int,
    "n_tokens": int,
    "documents_read": int,
    "shards": list,
    "norms": dict,
    "complete": bool,
}


def _validate_manifest(file: Path, m: dict) -> None:
    """Raise CacheError naming `file` unless the manifest's fields have their types and agree."""

    def fail(problem: str) -> CacheError:
        return CacheError(f"{file} is damaged or was edited: {problem}. Rebuild the cache (a new folder)")

    for key, kind in _MANIFEST_FIELDS.items():
        if key not in m:
            raise fail(f"the field {key!r} is missing")
        if not isinstance(m[key], kind) or (kind is int and isinstance(m[key], bool)):
            raise fail(f"{key} should be a {kind.__name__}, got {m[key]!r}")
    for site in m["sites"]:
        if not (isinstance(site, dict) and isinstance(site.get("name"), str) and _is_count(site.get("d"), 1)):
            raise fail(f"a site should be {{'name': str, 'd': int, ...}}, got {site!r}")
    for shard in m["shards"]:
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and _is_count(shard.get("n_tokens"), 0)):
            raise fail(f"a shard entry should be {{'file': str, 'n_tokens': int, ...}}, got {shard!r}")
        if "/" in shard["file"] or "\\" in shard["file"] or shard["file"].startswith("."):
            raise fail(f"shard file name {shard['file']!r} is not a plain name inside the folder")
    listed = sum(shard["n_tokens"] for shard in m["shards"])
    if m["n_tokens"] < 0 or listed != m["n_tokens"]:
        raise fail(f"n_tokens is {m['n_tokens']} but the shards listed hold {listed} rows")
    if m["complete"] and not m["shards"]:
        raise fail("it is marked complete but lists no shards")


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CacheError(f"{path} is truncated ({size} bytes): rebuild the cache")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CacheError(f"{path} is truncated or is not a safetensors file: rebuild the cache")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CacheError(f"{path} has a damaged header ({e}): rebuild the cache") from e
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        raise CacheError(
            f"{path} is {size} bytes but its header describes {8 + n + max(ends, default=0)}: the file is truncated "
            f"or was appended to; rebuild the cache"
        )
    return header


def check_shards(path: Path, manifest: dict) -> None:
    """Every shard the manifest lists exists, is whole (its size agrees with its header), and holds
    the rows and widths the manifest says. Cheap: reads the headers only."""
    widths = {s["name"]: s["d"] for s in manifest["sites"]}
    for shard in manifest["shards"]:
        file = path / shard["file"]
        if not file.is_file():
            raise CacheError(f"{path}: shard {shard['file']} listed in the manifest is missing")
        header = _safetensors_header(file)
        for name in [*widths, "tokens"]:
            entry = header.get(name)
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if not shape or shape[0] != shard["n_tokens"] or (name in widths and shape[-1] != widths[name]):
                raise CacheError(
                    f"{file}: tensor {name!r} has shape {shape}, but the manifest says {shard['n_tokens']} rows"
                    + (f" of width {widths[name]}" if name in widths else "")
                    + "; the shard and the manifest disagree: rebuild the cache"
                )


def read_shard(path: Path, shard: dict, digest: Future | None = None) -> dict[str, torch.Tensor]:
    """A shard's tensors, checked against the sha256 the manifest records for it (`digest`: that
    file's sha256 being computed ahead, if it is)."""
    file = path / shard["file"]
    expected = shard.get("sha256")
    if expected is not None and (digest.result() if digest is not None else sha256_file(file)) != expected:
        raise CacheError(
            f"{file} is corrupted: its sha256 differs from the one recorded in {MANIFEST} when it was written "
            f"(a flipped bit or a partial copy). Copy the cache again or rebuild it"
        )
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error type, without the file name
        raise CacheError(f"{file} cannot be read as safetensors: {e}") from e


def _check_model(path: Path, manifest: dict, expected: Any) -> None:
    if isinstance(expected, str):
        if expected != manifest["model"]:
            raise CacheError(f"{path} holds activations of {manifest['model']!r}, not {expected!r}")
        return
    name, fingerprint = model_id(expected), model_fingerprint(expected)
    if name != manifest["model"] or manifest.get("model_fingerprint", fingerprint) != fingerprint:
        raise CacheError(
            f"{path} holds activations of {manifest['model']!r} (fingerprint "
            f"{manifest.get('model_fingerprint', '?')[:12]}), not of the given model {name!r} (fingerprint "
            f"{fingerprint[:12]}): same name or architecture, other weights or tokenizer. Build a cache for this model"
        )


def _start_manifest(path: Path, reader: ActivationReader, model, dtype: torch.dtype) -> dict:
    sites = [{"name": n, "module": s.name, "d": d} for n, s, d in zip(reader.names, reader.sites, reader.widths)]
    fresh = {
        "format": FORMAT,
        "version": 1,
        "library_version": __version__,
        "model": model_id(model),
        "model_fingerprint": model_fingerprint(model),
        "sites": sites,
        "io": reader.io,
        "dtype": str(dtype).removeprefix("torch."),
        "ctx_len": reader.ctx_len,
        "remove_bos": reader.remove_bos,
        "packed": reader.pack,
        "text": text_record(reader.source),
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
    for key in ("model", "model_fingerprint", "sites", "io", "dtype", "ctx_len", "remove_bos", "packed", "text"):
        if key in existing and existing[key] != fresh[key]:
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
    digest = atomic_write(path / file, lambda tmp: save_file(tensors, tmp))
    for name in names:
        norms = manifest["norms"][name]
        norms["sum_squared_norm"] += float(tensors[name].float().flatten(1).pow(2).sum())
    manifest["shards"].append({"file": file, "n_tokens": keep, "sha256": digest})
    manifest["n_tokens"] += keep
    manifest["documents_read"] = documents_read
    for name in names:
        norms = manifest["norms"][name]
        norms["mean_squared_norm"] = norms["sum_squared_norm"] / manifest["n_tokens"]
    atomic_write_json(manifest, path / MANIFEST)
    return keep
