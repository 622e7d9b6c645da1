"""Text sources for the activation buffer: each yields one document (a string) at a time."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path


def hf_dataset_to_generator(
    dataset_name: str, split: str = "train", streaming: bool = True, text_key: str = "text", **kwargs
) -> Iterator[str]:
    """Documents of a Hugging Face dataset (streamed by default), from its `text_key` column."""
    import datasets

    from .hub import hub_reachable
    from .models import offline_error

    if not Path(dataset_name).exists() and not hub_reachable():
        raise offline_error(f"dataset {dataset_name!r}")
    try:
        dataset = datasets.load_dataset(dataset_name, split=split, streaming=streaming, **kwargs)
    except (ConnectionError, OSError, FileNotFoundError) as e:
        raise OSError(
            f"could not open dataset {dataset_name!r} (offline, or a wrong name?). Use local files with "
            f"text_files_to_generator / jsonl_to_generator, or default_texts() offline"
        ) from e

    def generate():
        for row in dataset:
            yield row[text_key]

    return generate()


def text_files_to_generator(path: str | Path, pattern: str = "*.txt") -> Iterator[str]:
    """The contents of a text file, or of every file matching `pattern` under a folder (sorted)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"no files matching {pattern!r} under {path}")
    for file in files:
        yield file.read_text(encoding="utf-8", errors="replace")


def jsonl_to_generator(path: str | Path, key: str = "text") -> Iterator[str]:
    """The `key` field of each line of a `.jsonl` or zstandard-compressed `.jsonl.zst` file."""
    path = Path(path)
    with open(path, "rb") as raw:
        if path.suffix == ".zst":
            import zstandard

            stream = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        else:
            stream = io.TextIOWrapper(raw, encoding="utf-8")
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}, line {number}: expected a JSON object with a {key!r} field") from e


def zst_to_generator(data_path: str | Path) -> Iterator[str]:
    """The reference's name for reading a `.jsonl.zst` file of `{"text": ...}` lines."""
    return jsonl_to_generator(data_path)
