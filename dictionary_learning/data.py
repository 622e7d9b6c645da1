"""Text sources for the activation buffer: each yields one document (a string) at a time."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from fractions import Fraction
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


# ----------------------------------------------------- the reference's mixed and packed generators
def randomly_remove_system_prompt(text: str, freq: float, system_prompt: str | None = None) -> str:
    """With probability `freq`, `text` without `system_prompt` (which must occur in it); otherwise,
    or with no prompt given, `text` unchanged."""
    if system_prompt is None or random.random() >= freq:
        return text
    if system_prompt not in text:
        raise ValueError(f"the system prompt to remove does not occur in the text: {system_prompt[:60]!r}")
    return text.replace(system_prompt, "")


def _mixing_pattern(frac: float, name: str) -> tuple[int, int]:
    """(main, total): take `main` items of the first source, then `total - main` of the second."""
    if not 0 < frac < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {frac}")
    fraction = Fraction(frac).limit_denominator()
    return fraction.numerator, fraction.denominator


def _interleave(first: Iterator[str], second: Iterator[str], frac: float, name: str) -> Iterator[str]:
    """`first` and `second` in the proportion `frac` : 1 - frac, in fixed runs, until either ends."""
    n_first, total = _mixing_pattern(frac, name)
    while True:
        for i in range(total):
            item = next(first if i < n_first else second, None)
            if item is None:
                return
            yield item


def _packed(texts: Iterator[str], min_chars: int, bos: str, eos: str, pack: bool) -> Iterator[str]:
    """With `pack`, consecutive texts joined by `eos` until at least `min_chars` characters, each
    pack prefixed by `bos`; without, each text prefixed by `bos`."""
    if not pack:
        for text in texts:
            yield bos + text
        return
    group: list[str] = []
    chars = 0
    for text in texts:
        group.append(text)
        chars += len(text)
        if chars >= min_chars:
            yield bos + eos.join(group)
            group, chars = [], 0
    if group:
        yield bos + eos.join(group)


def _special_tokens(tokenizer) -> tuple[str, str]:
    eos = tokenizer.eos_token or ""
    return tokenizer.bos_token or eos, eos


def hf_sequence_packing_dataset_to_generator(
    tokenizer,
    pretrain_dataset: str = "HuggingFaceFW/fineweb",
    min_chars: int = 1,
    split: str = "train",
    streaming: bool = True,
    pretrain_key: str = "text",
    sequence_pack_pretrain: bool = True,
) -> Iterator[str]:
    """Documents of `pretrain_dataset` packed into texts of at least `min_chars` characters (BOS, then
    the documents joined by EOS), or each document after a BOS with `sequence_pack_pretrain=False`.
    Tokenize the result with `add_special_tokens=False`: the special tokens are already in the text."""
    bos, eos = _special_tokens(tokenizer)
    documents = hf_dataset_to_generator(pretrain_dataset, split=split, streaming=streaming, text_key=pretrain_key)
    return _packed(documents, min_chars, bos, eos, sequence_pack_pretrain)


def hf_mixed_dataset_to_generator(
    tokenizer,
    pretrain_dataset: str = "HuggingFaceFW/fineweb",
    chat_dataset: str = "lmsys/lmsys-chat-1m",
    min_chars: int = 1,
    pretrain_frac: float = 0.9,
    split: str = "train",
    streaming: bool = True,
    pretrain_key: str = "text",
    chat_key: str = "conversation",
    sequence_pack_pretrain: bool = True,
    sequence_pack_chat: bool = False,
    system_prompt_to_remove: str | None = None,
    system_prompt_removal_freq: float = 0.9,
) -> Iterator[str]:
    """Pretraining documents and chat conversations (rendered with the tokenizer's chat template)
    mixed in the proportion `pretrain_frac`, each side packed as in
    `hf_sequence_packing_dataset_to_generator`; ends when either dataset does. With
    `system_prompt_to_remove`, that prompt is cut from a rendered chat with probability
    `system_prompt_removal_freq`."""
    _mixing_pattern(pretrain_frac, "pretrain_frac")  # checked before any download
    pretrain = hf_sequence_packing_dataset_to_generator(
        tokenizer, pretrain_dataset, min_chars, split, streaming, pretrain_key, sequence_pack_pretrain
    )
    conversations = hf_dataset_to_generator(chat_dataset, split=split, streaming=streaming, text_key=chat_key)
    chats = (
        randomly_remove_system_prompt(
            tokenizer.apply_chat_template(conversation, tokenize=False),
            system_prompt_removal_freq,
            system_prompt_to_remove,
        )
        for conversation in conversations
    )
    # A rendered chat starts with the template's own BOS: packing adds none before it.
    chats = _packed(chats, min_chars, "", "", True) if sequence_pack_chat else chats
    return _interleave(pretrain, chats, pretrain_frac, "pretrain_frac")


def simple_hf_mixed_dataset_to_generator(
    main_name: str,
    aux_name: str,
    main_frac: float = 0.9,
    split: str = "train",
    streaming: bool = True,
    main_key: str = "text",
    aux_key: str = "text",
) -> Iterator[str]:
    """Documents of two datasets mixed in the proportion `main_frac`, until either ends."""
    _mixing_pattern(main_frac, "main_frac")
    main = hf_dataset_to_generator(main_name, split=split, streaming=streaming, text_key=main_key)
    aux = hf_dataset_to_generator(aux_name, split=split, streaming=streaming, text_key=aux_key)
    return _interleave(main, aux, main_frac, "main_frac")
