"""Text sources for the activation buffer: each yields one document (a string) at a time."""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

HELD_OUT_FRACTION = 0.05
SPLIT_RULE = (
    "a document is held out when the first 8 bytes of sha256(its UTF-8 text), as a fraction of 2^64, "
    "are below held_out_fraction"
)
PARTS = ("train", "held_out")


# ------------------------------------------------------------------- named sources and their split
def document_part(text: str, held_out_fraction: float = HELD_OUT_FRACTION) -> str:
    """ "held_out" or "train" for one document, from a hash of its text alone: the same on every
    machine, in any order, and identical copies of a text always land on the same side."""
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).digest()
    return "held_out" if int.from_bytes(digest[:8], "big") < held_out_fraction * 2**64 else "train"


class Documents:
    """A named text source that can be read more than once, optionally one part of the deterministic
    train / held-out split (`document_part`). Iterating yields its documents (strings) in order.

    `open` returns a fresh iterator of all the source's documents each time it is called. `record`
    (the source, the part and the split rule) is what the cache manifest and config.json keep, so
    evaluation can tell training text from held-out text. `finite` says whether the source ends
    (local files do; a streamed dataset may not be read to its end).
    """

    def __init__(
        self,
        name: str,
        open: Callable[[], Iterable[str]],
        part: str | None = None,
        held_out_fraction: float = HELD_OUT_FRACTION,
        finite: bool = True,
    ):
        if part is not None and part not in PARTS:
            raise ValueError(f"part must be one of {PARTS} or None (every document), got {part!r}")
        if not 0 < held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must lie strictly between 0 and 1, got {held_out_fraction}")
        self.name, self._open, self.part = name, open, part
        self.held_out_fraction, self.finite = float(held_out_fraction), finite

    def __iter__(self) -> Iterator[str]:
        for text in self._open():
            if self.part is None or document_part(text, self.held_out_fraction) == self.part:
                yield text

    def split(self, part: str | None) -> Documents:
        """The same source restricted to `part` ("train", "held_out", or None for every document)."""
        return Documents(self.name, self._open, part, self.held_out_fraction, self.finite)

    @property
    def record(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "part": self.part or "all",
            "held_out_fraction": self.held_out_fraction,
            "split_rule": SPLIT_RULE,
        }

    def __repr__(self) -> str:
        return f"Documents({self.name!r}, part={self.part!r})"


def text_record(data: Any) -> dict[str, Any] | None:
    """The record of a `Documents` source (None for any other iterable: its text is not known)."""
    return data.record if isinstance(data, Documents) else None


def training_overlap(trained: dict | None, evaluated: dict | None) -> str | None:
    """Why evaluating on `evaluated` text would reuse text the dictionary trained on (both are
    `Documents.record`s), or None when it would not, or cannot be known."""
    if not trained or not evaluated or trained.get("source") != evaluated.get("source"):
        return None
    if trained.get("held_out_fraction") != evaluated.get("held_out_fraction"):
        return (
            f"{evaluated['source']} was split with held_out_fraction={trained.get('held_out_fraction')} for training "
            f"and {evaluated.get('held_out_fraction')} here, so the parts overlap"
        )
    if trained.get("part") == "held_out" or (evaluated.get("part") == "held_out" and trained.get("part") == "train"):
        return None

    def described(part: str | None) -> str:
        return "every document" if part in (None, "all") else f"the {part} part"

    return (
        f"the dictionary trained on {described(trained.get('part'))} of {trained['source']}, and "
        f"{described(evaluated.get('part'))} of it is evaluated here"
    )


# ---------------------------------------------------------------------------------- packing
def pack_documents(
    documents: Iterable, tokenizer, ctx_len: int, add_special_tokens: bool = True, batch: int = 64
) -> Iterator[list[int]]:
    """Documents as contexts of `ctx_len` token ids: the documents are tokenized, joined into one
    stream with the tokenizer's EOS after each, and cut into pieces; each context starts with the
    tokens the tokenizer puts before any text (Llama's BOS; none for GPT-2, Pythia or SmolLM2) when
    `add_special_tokens`. No token is dropped (the last context may be shorter), so a corpus yields
    about (its tokens) / ctx_len contexts instead of one per document. Items that are already token
    ids pass through unchanged."""
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"]) if add_special_tokens else []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    room = ctx_len - len(prefix)
    if room < 1:
        raise ValueError(f"ctx_len={ctx_len} leaves no room for text after the {len(prefix)} special tokens")
    stream: list[int] = []
    pending: list[str] = []

    def tokenize_pending() -> None:
        if not pending:
            return
        for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.extend(separator)
        pending.clear()

    for position, item in enumerate(documents):
        if not isinstance(check_item(item, position), str):
            yield item
            continue
        pending.append(item)
        if len(pending) >= batch:
            tokenize_pending()
            while len(stream) >= room:
                yield prefix + stream[:room]
                del stream[:room]
    tokenize_pending()
    while stream:
        yield prefix + stream[:room]
        del stream[:room]


def hf_dataset_to_generator(
    dataset_name: str, split: str = "train", streaming: bool = True, text_key: str = "text", **kwargs
) -> Iterator[str]:
    """Documents of a Hugging Face dataset (streamed by default), from its `text_key` column."""
    import datasets

    from .hub import hub_reachable, offline_error

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


def text_files_to_generator(
    path: str | Path, pattern: str = "*.txt", encoding: str = "utf-8", errors: str = "strict"
) -> Iterator[str]:
    """The contents of a text file, or of every file matching `pattern` under a folder (sorted).
    A file that is not valid `encoding` stops the reading with an error naming it, unless `errors`
    says what to do instead (Python's codec error handlers: "replace" substitutes U+FFFD)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"no files matching {pattern!r} under {path}")
    for file in files:
        yield _decode(file.read_bytes(), encoding, errors, str(file))


def _decode(data: bytes, encoding: str, errors: str, where: str) -> str:
    try:
        return data.decode(encoding, errors)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where} is not valid {encoding} (byte {e.start}: {e.reason}): give its encoding (encoding=..., "
            f"--encoding latin-1 on the command line), or errors='replace' (--errors replace) to read undecodable "
            f"bytes as U+FFFD"
        ) from None
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r} or error handler {errors!r} (reading {where})") from None


def jsonl_to_generator(
    path: str | Path, key: str = "text", encoding: str = "utf-8", errors: str = "strict"
) -> Iterator[str]:
    """The `key` field (a string) of each line of a `.jsonl` or zstandard-compressed `.jsonl.zst`
    file; a line that is not such an object, or not valid `encoding` (see `text_files_to_generator`
    for `errors`), stops the reading with an error naming the file and line."""
    path = Path(path)
    with open(path, "rb") as raw:
        if path.suffix == ".zst":
            import zstandard

            raw = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        for number, line in enumerate(raw, 1):
            text = _decode(line, encoding, errors, f"{path}, line {number},")
            if not text.strip():
                continue
            try:
                value = json.loads(text)[key]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
                raise ValueError(f"{path}, line {number}: expected a JSON object with a {key!r} field") from e
            if not isinstance(value, str):
                shown = "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
                raise ValueError(f"{path}, line {number}: the {key!r} field is {shown}, not a string")
            yield value


def check_item(item: Any, position: int) -> Any:
    """A document (a string) or a token-id sequence (a list / 1-D integer tensor) as the data's
    `position`-th item, or a TypeError naming the item and what the data must yield."""
    if isinstance(item, str):
        return item
    ids = item.tolist() if hasattr(item, "tolist") and getattr(item, "ndim", 1) == 1 else item
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return item
    shown = (
        f"{type(item).__name__} {str(item)[:40]!r}" if not hasattr(item, "shape") else f"a tensor {list(item.shape)}"
    )
    hint = " (token ids go as one sequence per item: [[5, 6, 7]], not [5, 6, 7])" if isinstance(item, int) else ""
    raise TypeError(
        f"item {position} of the data is {shown}: the data must yield documents (strings) or token-id sequences{hint}"
    )


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
