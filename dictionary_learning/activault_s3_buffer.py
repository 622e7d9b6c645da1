"""Activations precomputed by Activault (Tilde Research's activation store), streamed from S3 or
any S3-compatible server (MinIO, R2, moto, ...). Needs `boto3` (`pip install "dictionary_learning[activault]"`).

The layout under a prefix, as Activault writes it:
    <prefix>/metadata.json     {"shape": [b, l, d], "dtype": "torch.bfloat16", "bytes_per_file": ...,
                                "input_ids_shape": [b, l]}
    <prefix>/statistics.json   (optional, ignored)
    <prefix>/../cfg.json       (optional: the run's config, its token counts summed into `config`)
    <prefix>/<name>            megabatch files: `torch.save` of {"states": [b, l, d], "input_ids": [b, l]}
                               (or of the bare states tensor)

`S3RCache` yields one megabatch at a time, downloading the next ones in background threads with
parallel ranged GETs; `ActivaultS3ActivationBuffer` turns megabatches into shuffled `[batch_size, d]`
batches for `trainSAE`. Differences from the reference's module: files are read with
`torch.load(weights_only=True)` (a file from the bucket cannot run code here); rows left over at
the end of a megabatch are carried into the next batch instead of dropped, and the buffer works
with `return_ids=False` too; a file that cannot be downloaded or read stops the stream with an error
naming it instead of being skipped; no signal handlers are installed; the file order is shuffled
with its own seeded generator instead of the global `random` state.
"""

from __future__ import annotations

import io
import json
import os
import queue
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .shuffle import OwnedShuffle

MB = 1024 * 1024
BUCKET_NAME = os.environ.get("S3_BUCKET_NAME", "main")
_SIDE_FILES = ("metadata.json", "statistics.json", "cfg.json")
_DTYPES = {f"torch.{name}": getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64")}


def create_s3_client(
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
    endpoint_url: str | None = None,
    region_name: str | None = None,
):
    """A boto3 S3 client: credentials from the arguments or $AWS_ACCESS_KEY_ID /
    $AWS_SECRET_ACCESS_KEY, the server from `endpoint_url` or $S3_ENDPOINT_URL (AWS when unset),
    path-style addressing and s3v4 signatures (what S3-compatible servers expect)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise ImportError("reading Activault data needs boto3: pip install 'dictionary_learning[activault]'") from e
    return boto3.client(
        "s3",
        aws_access_key_id=aws_access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=aws_secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        endpoint_url=endpoint_url or os.environ.get("S3_ENDPOINT_URL"),
        region_name=region_name or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def shuffle_megabatch_tokens(t: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """The tokens of a `[b, l, d]` megabatch in a random order (across sequences), same shape."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    rows = t.reshape(t.shape[0] * t.shape[1], -1)
    return rows[torch.randperm(rows.shape[0], generator=generator)].reshape(t.shape)


class S3RCache:
    """The megabatches under one or several prefixes of a bucket, one `[b, l, d]` tensor (or, with
    `return_ids`, a dict {"states", "input_ids"}) per file. `concurrency` ranged GETs of
    `chunk_size` bytes download a file; `n_workers` files download at once, at most `buffer_size`
    ahead of the reader. `shuffle` permutes the tokens within each megabatch (not with
    `return_ids`); `preserve_file_order` reads files in key order instead of a seeded shuffle;
    `paths` restricts the files to these keys."""

    @classmethod
    def from_credentials(cls, aws_access_key_id: str, aws_secret_access_key: str, *args, **kwargs) -> S3RCache:
        return cls(create_s3_client(aws_access_key_id, aws_secret_access_key), *args, **kwargs)

    def __init__(
        self,
        s3_client,
        s3_prefix: str | list[str],
        bucket_name: str = BUCKET_NAME,
        device: str = "cpu",
        concurrency: int = 100,
        chunk_size: int = MB * 16,
        buffer_size: int = 2,
        shuffle: bool = True,
        preserve_file_order: bool = False,
        seed: int = 42,
        paths: list[str] | None = None,
        n_workers: int = 1,
        return_ids: bool = False,
    ) -> None:
        if min(concurrency, chunk_size, buffer_size, n_workers) < 1:
            raise ValueError("concurrency, chunk_size, buffer_size and n_workers must be >= 1")
        self.s3_client = s3_client if s3_client is not None else create_s3_client()
        self.s3_prefix = s3_prefix
        self.bucket_name = bucket_name
        self.device = device
        self.concurrency, self.chunk_size = concurrency, chunk_size
        self.buffer_size, self.n_workers = buffer_size, n_workers
        self.shuffle, self.preserve_file_order = shuffle, preserve_file_order
        self.seed, self.paths, self.return_ids = seed, paths, return_ids
        self._initial_file_index = 0
        self._file_index = 0
        self._stop = threading.Event()
        self.sync()

    # ------------------------------------------------------------------------------ the listing
    @property
    def prefixes(self) -> list[str]:
        return [self.s3_prefix] if isinstance(self.s3_prefix, str) else list(self.s3_prefix)

    def _read_json(self, key: str, required: bool = True) -> dict | None:
        try:
            body = self.s3_client.get_object(Bucket=self.bucket_name, Key=key)["Body"].read()
        except Exception as e:  # botocore's errors: no such key or bucket, access denied, no server
            if not required:
                return None
            raise OSError(f"could not read s3://{self.bucket_name}/{key}: {e}") from e
        try:
            loaded = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"s3://{self.bucket_name}/{key} is not valid JSON ({e}): Activault writes it as JSON"
            ) from e
        if not isinstance(loaded, dict):
            raise ValueError(f"s3://{self.bucket_name}/{key} holds {type(loaded).__name__}, not a JSON object")
        return loaded

    def sync(self) -> None:
        """(Re)list the files and read the metadata of every prefix."""
        self.metadata, self.config, files = None, {"total_tokens": 0, "n_total_files": 0}, []
        for prefix in self.prefixes:
            metadata = self._read_json(f"{prefix}/metadata.json")
            shape = metadata.get("shape")
            if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) for n in shape)):
                raise ValueError(
                    f's3://{self.bucket_name}/{prefix}/metadata.json needs "shape": [b, l, d] (three integers), '
                    f"got {shape!r}"
                )
            if "dtype" not in metadata:
                raise ValueError(f's3://{self.bucket_name}/{prefix}/metadata.json has no "dtype" key')
            if self.metadata is None:
                self.metadata = metadata
            elif metadata["shape"][1:] != self.metadata["shape"][1:] or metadata["dtype"] != self.metadata["dtype"]:
                raise ValueError(
                    f"the prefixes hold different activations: {prefix} has shape {metadata['shape']} and dtype "
                    f"{metadata['dtype']}, {self.prefixes[0]} has {self.metadata['shape']} and {self.metadata['dtype']}"
                )
            cfg = self._read_json(f"{prefix.rsplit('/', 1)[0]}/cfg.json", required=False) or {}
            for key in self.config:
                self.config[key] += cfg.get(key, 0)
            for page in self.s3_client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket_name, Prefix=prefix
            ):
                files += [
                    (obj["Key"], obj["Size"])
                    for obj in page.get("Contents", [])
                    if obj["Key"].rsplit("/", 1)[-1] not in _SIDE_FILES
                ]
        if self.metadata["dtype"] not in _DTYPES:
            raise ValueError(f"unknown activation dtype {self.metadata['dtype']!r} (known: {', '.join(_DTYPES)})")
        if self.paths is not None:
            wanted = set(self.paths)
            files = [f for f in files if f[0] in wanted]
        files.sort()
        if not self.preserve_file_order:
            random.Random(self.seed).shuffle(files)
        if not files:
            raise ValueError(f"no megabatch files under {self.prefixes} in bucket {self.bucket_name!r}")
        self._files = files

    def __len__(self) -> int:
        return len(self._files)

    @property
    def current_file_index(self) -> int:
        """How many files the reader has taken so far (a resume point for `set_file_index`)."""
        return self._file_index

    def set_file_index(self, index: int) -> None:
        """Start the next iteration at file `index` of the listing."""
        self._initial_file_index = index

    # ----------------------------------------------------------------------------- downloading
    def _download(self, key: str, size: int, pool: ThreadPoolExecutor) -> bytes:
        def chunk(start: int) -> bytes:
            end = min(start + self.chunk_size, size) - 1
            for attempt in range(5):
                try:
                    response = self.s3_client.get_object(Bucket=self.bucket_name, Key=key, Range=f"bytes={start}-{end}")
                    return response["Body"].read()
                except Exception:
                    if attempt == 4:
                        raise
            raise AssertionError("unreachable")

        return b"".join(pool.map(chunk, range(0, size, self.chunk_size)))

    def _decode(self, key: str, data: bytes, index: int):
        try:
            loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as e:
            raise OSError(f"s3://{self.bucket_name}/{key} is not a readable megabatch file ({e})") from e
        states = loaded["states"] if isinstance(loaded, dict) else loaded
        if not isinstance(states, torch.Tensor) or list(states.shape[1:]) != list(self.metadata["shape"][1:]):
            raise ValueError(
                f"s3://{self.bucket_name}/{key} holds {getattr(states, 'shape', type(states))}, not the "
                f"[*, {', '.join(map(str, self.metadata['shape'][1:]))}] of metadata.json"
            )
        if self.return_ids:
            if not isinstance(loaded, dict) or "input_ids" not in loaded:
                raise ValueError(f"s3://{self.bucket_name}/{key} has no input_ids (return_ids=True needs them)")
            return {"states": states.to(self.device), "input_ids": loaded["input_ids"].to(self.device)}
        if self.shuffle:
            states = shuffle_megabatch_tokens(states, None if self.seed is None else self.seed + index)
        return states.to(self.device)

    def _worker(self, todo: queue.Queue, done: dict, ready: threading.Condition, slots: threading.Semaphore):
        """Download files in listing order; a slot is taken before a file, so that the files being
        downloaded or waiting for the reader are never more than `buffer_size`."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            while True:
                slots.acquire()
                if self._stop.is_set():
                    return
                try:
                    index, (key, size) = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    result = self._decode(key, self._download(key, size, pool), index)
                except Exception as e:  # handed to the reader, which raises it
                    result = e
                with ready:
                    done[index] = result
                    ready.notify_all()

    def __iter__(self) -> Iterator[Any]:
        self._stop.clear()
        todo: queue.Queue = queue.Queue()
        for index in range(self._initial_file_index, len(self._files)):
            todo.put((index, self._files[index]))
        done: dict[int, Any] = {}
        ready, slots = threading.Condition(), threading.Semaphore(self.buffer_size)
        workers = [
            threading.Thread(target=self._worker, args=(todo, done, ready, slots), daemon=True)
            for _ in range(self.n_workers)
        ]
        for worker in workers:
            worker.start()
        try:
            for index in range(self._initial_file_index, len(self._files)):
                with ready:
                    ready.wait_for(lambda i=index: i in done)
                    result = done.pop(index)
                slots.release()
                if isinstance(result, Exception):
                    raise result
                self._file_index = index + 1
                yield result
        finally:
            self._stop.set()
            for _ in workers:
                slots.release()  # wakes a worker waiting for a free slot, so that it sees the stop

    def close(self) -> None:
        """Stop the background downloads."""
        self._stop.set()


class ActivaultS3ActivationBuffer:
    """Shuffled `[batch_size, d]` batches of the tokens of an `S3RCache`'s megabatches: each file's
    `[b, l, d]` states are flattened to tokens, shuffled (by the cache, or here when it does not), and
    served; rows left when a file runs out start the next batch. Iteration ends with the data (a last
    partial batch is dropped)."""

    def __init__(
        self, cache: S3RCache, batch_size: int = 8192, device: str = "cpu", io: str = "out", seed: int | None = None
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cache, self.batch_size, self.device, self.io = cache, batch_size, device, io
        self.d_submodule = cache.metadata["shape"][-1]
        self._files = iter(cache)
        self._rows = torch.empty(0, self.d_submodule)
        self.shuffle, self._served = OwnedShuffle(seed), 0  # used when the cache does not shuffle

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to read the same batches again: this shuffle's seed, and whether
        the cache's own order (file order and token shuffle) is seeded, which replay needs."""
        state = self.shuffle.state_dict()
        if self.replay_problem:
            state["not_replayable"] = self.replay_problem
        return state

    @property
    def replay_problem(self) -> str | None:
        """Why this stream cannot be read again in the same order (None when it can)."""
        if self.cache.seed is None and not self.cache.preserve_file_order:
            return (
                "its S3RCache has seed=None, so its file order differs on every read; open the cache with a seed "
                "(S3RCache(..., seed=42), the default) or preserve_file_order=True to make a run resumable"
            )
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the shuffle seed of an earlier run's buffer (`state_dict`); the buffer must be unread."""
        if self._served or self.shuffle.started:
            raise ValueError("load_state_dict needs an unread buffer: build a new ActivaultS3ActivationBuffer")
        self.shuffle.load_state_dict(state)

    @property
    def config(self) -> dict[str, Any]:
        """What trainSAE records under "buffer" in config.json."""
        return {
            "type": "activault_s3",
            "bucket": self.cache.bucket_name,
            "prefix": self.cache.s3_prefix,
            "d_submodule": self.d_submodule,
            "out_batch_size": self.batch_size,
            "io": self.io,
            "device": str(self.device),
            "n_sites": 1,
        }

    def __iter__(self) -> ActivaultS3ActivationBuffer:
        return self

    def __next__(self) -> torch.Tensor:
        while self._rows.shape[0] < self.batch_size:
            megabatch = next(self._files)  # StopIteration ends the stream
            states = megabatch["states"] if isinstance(megabatch, dict) else megabatch
            new = states.reshape(-1, self.d_submodule)
            if not self.cache.shuffle or self.cache.return_ids:  # else the cache already shuffled its tokens
                new = new[torch.randperm(new.shape[0], generator=self.shuffle.generator()).to(new.device)]
            self._rows = torch.cat([self._rows.to(new.device, new.dtype), new]) if self._rows.numel() else new
        batch, self._rows = self._rows[: self.batch_size], self._rows[self.batch_size :]
        self._served += 1
        return batch.to(self.device)

    def close(self) -> None:
        self.cache.close()
