"""ActivationReader: activations of a model's submodules at the kept token positions of each LM
batch (padding out; BOS and unusually large activations optionally out), read through nnsight.
What the shuffled buffer (`buffer`), the disk cache (`cache`), evaluation and the feature pages read.
Text is tokenized with right padding, so every real token sees exactly the positions and context it
would see unpadded."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .config import DEBUG
from .data import Documents, check_item, pack_documents
from .distributed import strided
from .nnsight_io import IO_MODES, Site, model_device, plan_requests, read_activations, resolve_site, torch_model

_END = object()

# The reference's nnsight trace options: scanning and validation only when debugging.
tracer_kwargs = {"scan": DEBUG, "validate": DEBUG}

logger = logging.getLogger(__name__)


class ActivationReader:
    """Reads activations of kept token positions at one or several submodules, one LM batch at a
    time. The base of ActivationBuffer (which shuffles them) and of ActivationCache.build (which
    writes them to disk); see ActivationBuffer for the arguments."""

    def __init__(
        self,
        data: Iterable,
        model,
        submodule,
        d_submodule: int | list[int] | None = None,
        io: str = "out",
        ctx_len: int = 128,
        refresh_batch_size: int = 512,
        remove_bos: bool = False,
        add_special_tokens: bool = True,
        max_activation_norm_multiple: float | None = None,
        pack: bool = True,
    ):
        if io == "in_and_out":
            io = "in_to_out"
        if io not in IO_MODES:
            raise ValueError(f"io must be one of {IO_MODES}, got {io!r}")
        check_positive_ints(ctx_len=ctx_len, refresh_batch_size=refresh_batch_size)
        self.model = model
        self.tokenizer = self._tokenizer_of(model)
        self.io = io
        self.ctx_len, self.refresh_batch_size = int(ctx_len), int(refresh_batch_size)
        self.remove_bos = remove_bos
        self.add_special_tokens = add_special_tokens
        self.max_activation_norm_multiple = max_activation_norm_multiple
        self.multi = isinstance(submodule, (list, tuple, dict))
        subs = (
            submodule if isinstance(submodule, dict) else dict(enumerate(submodule)) if self.multi else {0: submodule}
        )
        self.sites = self._resolve_sites(list(subs.values()), io)
        self.names = [k if isinstance(k, str) else site.name for k, site in zip(subs, self.sites)]
        self.submodule = None if self.multi else self.sites[0].envoy
        ensure_pad_token(self.tokenizer)
        if remove_bos and self.tokenizer.bos_token_id is None:
            logger.warning("the tokenizer has no BOS token: remove_bos drops each row's first token instead")
        self.widths = self._probe_widths()
        expected = d_submodule if isinstance(d_submodule, (list, tuple)) or d_submodule is None else [d_submodule]
        if expected is not None and list(expected) != self.widths:
            raise ValueError(
                f"d_submodule={d_submodule} but the model's activations at {self.names} have width {self.widths}"
            )
        self.d_submodule = self.widths[0] if not self.multi else self.widths
        self.pack, self.loop = pack, False
        self.source, self._stride = data, None
        self.data = self._open()
        self.epochs = 0  # passes over the source completed (with loop)
        self._exhausted = False
        self.items_read = 0  # items (packed contexts, or documents without packing) taken from `data` so far

    # ----------------------------------------------------------- the model (nnsight; see pytorch_buffer)
    def _tokenizer_of(self, model):
        return model.tokenizer

    def _resolve_sites(self, submodules: list, io: str) -> list[Site]:
        sites = [resolve_site(self.model, s, io) for s in submodules]
        self._requests = plan_requests(self.model, sites)
        return sites

    def _device(self) -> torch.device:
        return model_device(self.model)

    def _torch_module(self) -> torch.nn.Module:
        return torch_model(self.model)

    def _read_raw(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
        """One `[B, L, d]` tensor per site (a pair for io="in_to_out"), stopping after the last site."""
        return read_activations(self.model, self.sites, input_ids, attention_mask, self._requests)

    # ------------------------------------------------------------------------------ reading text
    def _open(self) -> Iterator:
        """A fresh pass over the source: this rank's share of its documents, packed into contexts."""
        items = iter(self.source)
        if self._stride is not None:
            items = strided(items, *self._stride)
        if self.pack:
            return pack_documents(items, self.tokenizer, self.ctx_len, self.add_special_tokens)
        return (check_item(item, position) for position, item in enumerate(items))

    def _next_items(self, batch_size: int | None = None) -> list:
        items: list = []
        want = batch_size or self.refresh_batch_size
        read_this_pass = True
        while len(items) < want:
            item = next(self.data, _END)
            if item is not _END:
                items.append(item)
                read_this_pass = True
                continue
            if not self.loop or not read_this_pass:  # the end (or an empty source: looping would spin)
                break
            self.data, self.epochs, read_this_pass = self._open(), self.epochs + 1, False
        return items

    def shard(self, rank: int, world_size: int) -> None:
        """Read only documents rank, rank + world_size, ... of the data stream (data-parallel training)."""
        self._stride = (rank, world_size)
        self._counted_tokens = None  # a share of the source counts differently
        self.data = self._open()

    def text_tokens(self, limit: int | None = None) -> int | None:
        """How many token positions a pass over the source gives (packed or cut at ctx_len as it is
        read; before the BOS and high-norm masks, so an upper bound of the rows), counted by
        tokenizing a fresh pass; None for a source that may be endless or can be read only once,
        or that holds more than `limit` tokens (counting stops there)."""
        if isinstance(self.source, Documents):
            if not self.source.finite:
                return None
        elif not isinstance(self.source, (list, tuple)):
            return None
        counted = getattr(self, "_counted_tokens", None)  # a whole pass already counted: not again
        if counted is None:
            counted = 0
            for item in self._open():
                if isinstance(item, str):
                    item = self.tokenizer(item, add_special_tokens=self.add_special_tokens)["input_ids"]
                counted += min(len(item), self.ctx_len)
                if limit is not None and counted > limit:
                    return None
            self._counted_tokens = counted
        return None if limit is not None and counted > limit else counted

    def text_batch(self, batch_size: int | None = None) -> list:
        """The next `batch_size` items of the data stream (the reference's API, used by evaluate)."""
        items = self._next_items(batch_size)
        if not items:
            raise StopIteration("End of data stream reached")
        return items

    def tokenized_batch(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        return self.tokenize(self.text_batch(batch_size))

    def token_batch(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """`tokenized_batch` (the name the reference's NNsightActivationBuffer uses)."""
        return self.tokenized_batch(batch_size)

    def tokenize(self, items: list) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids` and `attention_mask` `[B, L <= ctx_len]` for strings or token ids."""
        return tokenize_batch(self.tokenizer, items, self.ctx_len, self.add_special_tokens)

    def next_activations(self, return_ids: bool = False) -> list[torch.Tensor] | None:
        """Activations `[N, ...]` per site of the next LM batch (kept positions only), or None at the end."""
        while True:
            items = self._next_items()
            if not items:
                self._exhausted = True
                return None
            self.items_read += len(items)
            acts = self.read(self.tokenize(items), return_ids=return_ids)
            if acts[0].shape[0]:
                return acts

    def read(self, tokens: dict[str, torch.Tensor], return_ids: bool = False) -> list[torch.Tensor]:
        """Activations of the kept positions of a token batch, one `[N, ...]` tensor per site (and,
        with `return_ids`, the `[N]` token ids of those positions last)."""
        raw, keep, input_ids = self.read_padded(tokens)
        kept = [r[keep] for r in raw]
        return kept + [input_ids[keep]] if return_ids else kept

    def read_padded(self, tokens: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """`(activations, keep, input_ids)` of a token batch: one `[B, L, ...]` tensor per site, the
        `[B, L]` mask of the positions `read` keeps, and the ids (for per-text pooling)."""
        device = self._device()
        input_ids = tokens["input_ids"].to(device)
        attention_mask = tokens["attention_mask"].to(device)
        raw = self._read_raw(input_ids, attention_mask)
        raw = [torch.stack(r, dim=2) if isinstance(r, tuple) else r for r in raw]  # in_to_out: [B, L, 2, d]
        return raw, self.keep_mask(input_ids, attention_mask, raw), input_ids

    def keep_mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, acts: list[torch.Tensor]
    ) -> torch.Tensor:
        """`[B, L]` bool: real tokens, minus BOS positions and high-norm positions when asked."""
        keep = attention_mask.bool()
        if self.remove_bos:
            first = torch.zeros_like(keep)
            first[:, 0] = True  # right padding: every row starts at position 0
            bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
            if bos is None:
                keep &= ~first
            elif bos == eos:  # GPT-2 / Pythia: the same id also ends documents; drop only a leading one
                keep &= ~(first & (input_ids == bos))
            else:
                keep &= input_ids != bos
        if self.max_activation_norm_multiple is not None:
            for a in acts:
                norms = a.float().flatten(2).norm(dim=-1)  # [B, L]
                median = norms[keep].median() if keep.any() else norms.median()
                keep &= norms <= median * self.max_activation_norm_multiple
        return keep

    def _probe_widths(self) -> list[int]:
        probe_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        ids = torch.tensor([[probe_id]], device=self._device())
        acts = self._read_raw(ids, torch.ones_like(ids))
        return [(a[1] if isinstance(a, tuple) else a).shape[-1] for a in acts]


def reader_sites(reader) -> list[tuple[Any, list[Site]]]:
    """`(model, its sites)` for each model a reader runs, in order: its own, then a paired buffer's
    other model's. Their sites in that order are a crosscoder's."""
    other = getattr(reader, "other", None)
    return [(reader.model, list(reader.sites))] + ([(other.model, list(other.sites))] if other is not None else [])


def check_positive_ints(**values: Any) -> None:
    """Raise a ValueError naming the first argument that is not a positive integer (3e4 is accepted)."""
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def ensure_pad_token(tokenizer) -> None:
    """Pad with EOS when the tokenizer has no padding token (GPT-2, Pythia, Llama)."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token


def tokenize_batch(tokenizer, items: list, ctx_len: int, add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask` `[B, L <= ctx_len]` for a list of strings or of
    token-id sequences (lists or 1-D tensors), truncated to `ctx_len`."""
    if all(isinstance(item, str) for item in items):
        enc = tokenizer(
            items,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=ctx_len,
            add_special_tokens=add_special_tokens,
            padding_side="right",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    rows = []
    for item in items:
        if not isinstance(item, (list, tuple, torch.Tensor)):
            raise TypeError(f"data must yield strings or non-empty token-id sequences, got {_describe(item)}")
        ids = torch.as_tensor(item) if not isinstance(item, torch.Tensor) else item
        if ids.ndim != 1 or ids.is_floating_point() or ids.numel() == 0:
            raise TypeError(f"data must yield strings or non-empty token-id sequences, got {_describe(item)}")
        rows.append(ids[:ctx_len].long())
    length = max(r.numel() for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : r.numel()] = r
        attention_mask[i, : r.numel()] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _describe(item: Any) -> str:
    if isinstance(item, torch.Tensor):
        return f"a {item.dtype} tensor of shape {tuple(item.shape)}"
    return f"{type(item).__name__} {str(item)[:40]!r}"
