"""ActivationBuffer: shuffled batches of a model's activations at one or several submodules.

The buffer holds `n_ctxs * ctx_len` token activations. It serves random unread rows and, once half
of them have been served, refills the served slots with activations of fresh text, so batches mix
tokens of many documents. Padding positions never enter it; BOS positions and unusually large
activations (attention sinks) can be left out. Text is tokenized with right padding, so every
real token sees exactly the positions and context it would see unpadded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .config import DEBUG
from .data import Documents, check_item, pack_documents, text_record
from .distributed import strided
from .nnsight_io import (
    IO_MODES,
    Site,
    model_device,
    model_id,
    plan_requests,
    read_activations,
    resolve_site,
    torch_model,
)

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
        device = self._device()
        input_ids = tokens["input_ids"].to(device)
        attention_mask = tokens["attention_mask"].to(device)
        raw = self._read_raw(input_ids, attention_mask)
        raw = [torch.stack(r, dim=2) if isinstance(r, tuple) else r for r in raw]  # in_to_out: [B, L, 2, d]
        keep = self.keep_mask(input_ids, attention_mask, raw)
        kept = [r[keep] for r in raw]
        return kept + [input_ids[keep]] if return_ids else kept

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


class ActivationBuffer(ActivationReader):
    """Iterator of shuffled activation batches `[out_batch_size, d]` read from `model` at `submodule`.

    Args:
        data: iterator of strings, or of token-id sequences (lists or 1-D tensors).
        model: an nnsight model (see `load_model` / `load_default_model`).
        submodule: an envoy (`model.model.layers[3].mlp`), a torch submodule, a dotted name, or a
            list / dict of those to read several sites in one forward pass; batches are then
            dicts `{name: tensor}` and trainSAE routes each to the trainers whose
            `submodule_name` matches.
        d_submodule: expected width(s); inferred when None, checked when given.
        io: "out" (the module's output), "in" (its input) or "in_to_out" (both, as `[N, 2, d]`).
        n_ctxs: contexts the buffer holds (a float such as 3e4 is accepted).
        dtype: storage dtype; bfloat16 halves memory (trainSAE trains in fp32 regardless).
        remove_bos: leave out BOS positions (every BOS token; when BOS and EOS share an id, only
            a row's first token), or each row's first token when the tokenizer has no BOS.
        max_activation_norm_multiple: leave out positions whose norm exceeds this multiple of
            the batch median (e.g. 10 for Qwen's attention sinks).
        pack: tokenize the documents into one stream (EOS after each) and cut it into contexts of
            `ctx_len` tokens (`data.pack_documents`), so no text is cut off; False gives the
            reference's one context per document, truncated. Token-id items are never repacked.
        loop: start the source again when it ends (it must be readable twice: a list, or a
            `Documents` such as `default_texts()`); without it, trainSAE refuses to start when a
            short source cannot fill its steps.
        stack_sites: with several sites of one width, serve `[B, n_sites, d]` tensors (the sites
            in the order given) instead of dicts: a crosscoder's batches.
        seed: seed of the buffer's own shuffle generator. None draws one from torch's global
            generator at the first fill (so a seeded program is reproducible); either way the buffer
            owns its shuffle from then on, and `state_dict` / `load_state_dict` carry it into a
            resumed run (trainSAE does this), which therefore sees the same batches.
    """

    def __init__(
        self,
        data: Iterable,
        model,
        submodule,
        d_submodule: int | list[int] | None = None,
        io: str = "out",
        n_ctxs: int | float = 30000,
        ctx_len: int = 128,
        refresh_batch_size: int = 512,
        out_batch_size: int = 8192,
        device: str | torch.device = "cpu",
        remove_bos: bool = False,
        add_special_tokens: bool = True,
        max_activation_norm_multiple: float | None = None,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
        pack: bool = True,
        loop: bool = False,
        stack_sites: bool = False,
    ):
        check_positive_ints(n_ctxs=n_ctxs, out_batch_size=out_batch_size)
        if loop and iter(data) is data:
            raise ValueError(
                "loop=True reads the data again after it ends, so it needs a source that can be read more than once "
                "(a list, or a Documents source such as default_texts()), not a one-shot iterator or generator"
            )
        super().__init__(
            data,
            model,
            submodule,
            d_submodule,
            io,
            ctx_len,
            refresh_batch_size,
            remove_bos,
            add_special_tokens,
            max_activation_norm_multiple,
            pack,
        )
        self.loop = loop
        if stack_sites and (not self.multi or len(set(self.widths)) > 1):
            raise ValueError(
                f"stack_sites=True stacks several sites of one width, got sites {self.names} of widths {self.widths}"
            )
        self.stack_sites = stack_sites
        self.n_ctxs, self.out_batch_size = int(n_ctxs), int(out_batch_size)
        self.device = torch.device(device)
        self.seed = seed
        self.generator: torch.Generator | None = None  # made at the first fill (see `_shuffle_generator`)
        self.dtype = dtype or next(self._torch_module().parameters()).dtype
        self.capacity = self.n_ctxs * self.ctx_len
        row_shape = self._row_shape()
        self.storage = [
            torch.empty(self.capacity, *row_shape, d, dtype=self.dtype, device=self.device) for d in self.widths
        ]
        self._order = torch.empty(0, dtype=torch.long)  # unread slots, in serving order
        self._ptr = 0
        self._filled = 0  # slots below this index have held data
        self._pending: list[torch.Tensor] | None = None

    # ---------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        with torch.no_grad():
            if self.unread < self.capacity // 2 and not self._exhausted:
                self.refresh()
            if self.unread == 0:
                raise StopIteration("End of data stream reached")
            idx = self._order[self._ptr : self._ptr + self.out_batch_size]
            self._ptr += idx.numel()
            idx = idx.to(self.device)
            batch = [store[idx] for store in self.storage]
        if self.stack_sites:
            return torch.stack(batch, dim=1)
        return dict(zip(self.names, batch)) if self.multi else batch[0]

    def _row_shape(self) -> tuple[int, ...]:
        """Shape of one stored row besides its width: `(2,)` for io="in_to_out" (input, output)."""
        return (2,) if self.io == "in_to_out" else ()

    @property
    def unread(self) -> int:
        return self._order.numel() - self._ptr

    def batches_left(self, needed: int | None = None) -> int | None:
        """How many batches the buffer can still serve, when that is known: after its source has run
        out; or, before the first fill and given the `needed` batches, at most the batches its text
        holds when a pass over a finite source (a list, a local `Documents`) counts fewer tokens
        than that (`text_tokens`, which stops counting there). None while more may come."""
        if self.loop:
            return None
        if self._exhausted and self._pending is None:
            return -(-self.unread // self.out_batch_size)
        if needed is not None and self._filled == 0 and self._stride is None:
            tokens = self.text_tokens(limit=needed * self.out_batch_size)
            return None if tokens is None else -(-tokens // self.out_batch_size)
        return None

    def refresh(self) -> None:
        """Refill every served slot with fresh activations, then reshuffle all unread rows."""
        from tqdm.auto import tqdm

        free = torch.cat([self._order[: self._ptr], torch.arange(self._filled, self.capacity)])
        kept = self._order[self._ptr :]
        n_new = 0
        first_fill = self._filled == 0  # the long one: a bar after 2 s; later refills are brief
        total = free.numel()
        if first_fill and not self.loop:  # a finite text shorter than the buffer: the bar ends where it will
            total = min(total, self.text_tokens(limit=total) or total)
        bar = tqdm(total=total, desc="filling the activation buffer", unit="tok", delay=2, leave=False,
                   disable=not first_fill)  # fmt: skip
        while n_new < free.numel():
            acts = self._pending if self._pending is not None else self.next_activations()
            if acts is None:
                break
            take = min(acts[0].shape[0], free.numel() - n_new)
            slots = free[n_new : n_new + take].to(self.device)
            for store, a in zip(self.storage, acts):
                store[slots] = a[:take].to(self.device, self.dtype)
            self._pending = [a[take:] for a in acts] if take < acts[0].shape[0] else None
            n_new += take
            bar.update(take)
        bar.close()
        self._filled = max(self._filled, int(free[:n_new].max()) + 1 if n_new else 0)
        valid = torch.cat([kept, free[:n_new]])
        self._order = valid[torch.randperm(valid.numel(), generator=self._shuffle_generator())]
        self._ptr = 0

    def _shuffle_generator(self) -> torch.Generator:
        """The buffer's own generator; its seed is drawn from torch's global one when none was given."""
        if self.generator is None:
            if self.seed is None:
                self.seed = int(torch.randint(0, 2**62, ()))
            self.generator = torch.Generator().manual_seed(self.seed)
        return self.generator

    # ------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to serve the same batches again from the start of the text: the
        shuffle's seed (drawn now if the buffer has not been read yet)."""
        self._shuffle_generator()
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the shuffle seed of an earlier run's buffer (`state_dict`); the buffer must be unread."""
        if self._filled or self.items_read:
            raise ValueError(
                "load_state_dict needs an unread buffer (this one has served activations already): build a new "
                "ActivationBuffer for the resumed run"
            )
        self.seed, self.generator = int(state["seed"]), None

    # ------------------------------------------------------------------------------------ records
    @property
    def config(self) -> dict[str, Any]:
        """What config.json records under "buffer" (the reference's keys, plus the sites)."""
        return {
            "d_submodule": self.d_submodule,
            "io": self.io,
            "n_ctxs": self.n_ctxs,
            "ctx_len": self.ctx_len,
            "refresh_batch_size": self.refresh_batch_size,
            "out_batch_size": self.out_batch_size,
            "device": str(self.device),
            "submodules": self.names,
            "model": model_id(self.model),
            "modules": {name: site.name for name, site in zip(self.names, self.sites)},
            "packed": self.pack,
            "loop": self.loop,
            "remove_bos": self.remove_bos,
            "text": text_record(self.source),
            "stack_sites": self.stack_sites,
            "n_sites": len(self.sites),
            "seed": self.seed,
        }

    def close(self) -> None:
        """Release the stored activations."""
        self.storage = []
        self._order = torch.empty(0, dtype=torch.long)
        self._ptr = 0


class PairedActivationBuffer(ActivationBuffer):
    """The same site of two models run on the same tokens, served as `[B, 2, d]` rows (`model`'s
    activations first, `other_model`'s second): a crosscoder's batches for model diffing, e.g. a
    base model and its fine-tuned version. The models must share a tokenizer (the same vocabulary);
    a position is kept only where both keep it. `other_submodule` defaults to the same module path.
    The other arguments are ActivationBuffer's (one submodule; io "out" or "in")."""

    def __init__(self, data: Iterable, model, other_model, submodule, other_submodule=None, **kwargs: Any):
        if isinstance(submodule, (list, tuple, dict)) or kwargs.get("stack_sites"):
            raise ValueError("PairedActivationBuffer reads one site of each model: give one submodule")
        if kwargs.get("io", "out") not in ("in", "out"):
            raise ValueError(f"PairedActivationBuffer reads io='in' or 'out', got {kwargs['io']!r}")
        super().__init__(data, model, submodule, **kwargs)
        self.other = ActivationReader(
            [],
            other_model,
            other_submodule if other_submodule is not None else self.sites[0].name,
            io=self.io,
            ctx_len=self.ctx_len,
            remove_bos=self.remove_bos,
            add_special_tokens=self.add_special_tokens,
            max_activation_norm_multiple=self.max_activation_norm_multiple,
        )
        if self.other.widths != self.widths:
            raise ValueError(f"the two sites have widths {self.widths} and {self.other.widths}: a crosscoder needs one")
        if self.tokenizer.get_vocab() != self.other.tokenizer.get_vocab():
            raise ValueError(
                "the two models' tokenizers differ: the same tokens would mean different text; pair models that "
                "share a tokenizer (a base model and its fine-tune)"
            )

    def _row_shape(self) -> tuple[int, ...]:
        return (2,)

    def read(self, tokens: dict[str, torch.Tensor], return_ids: bool = False) -> list[torch.Tensor]:
        device, other_device = self._device(), self.other._device()
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        (a,) = self._read_raw(ids, mask)
        (b,) = self.other._read_raw(ids.to(other_device), mask.to(other_device))
        b = b.to(a.device, a.dtype)
        keep = self.keep_mask(ids, mask, [a, b])
        kept = [torch.stack([a[keep], b[keep]], dim=1)]
        return kept + [ids[keep]] if return_ids else kept

    @property
    def config(self) -> dict[str, Any]:
        return super().config | {
            "paired_model": model_id(self.other.model),
            "modules": {"model": self.sites[0].name, "other_model": self.other.sites[0].name},
            "n_sites": 2,
        }


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


# The reference's second name for a buffer fed with token ids: this one takes both.
NNsightActivationBuffer = ActivationBuffer


class HeadActivationBuffer(ActivationBuffer):
    """Per-head attention outputs: the input of layer `layer`'s attention output projection, split
    into heads, as batches `[B, n_heads, head_dim]` (or `[B, n_heads, d_model]` with `apply_W_O`,
    each head mapped through its slice of the projection). With `trainSAE(...,
    activations_split_by_head=True)`, trainer i learns a dictionary of head i.
    """

    # the attention output projection's name, per family (Llama-like families share "o_proj")
    _OUTPUT_PROJECTIONS = {"gpt_neox": "dense"}

    def __init__(
        self,
        data: Iterable,
        model,
        layer: int,
        n_ctxs: int | float = 30000,
        ctx_len: int = 128,
        refresh_batch_size: int = 512,
        out_batch_size: int = 8192,
        device: str | torch.device = "cpu",
        apply_W_O: bool = False,
        remote: bool = False,
        **kwargs: Any,
    ):
        from .models import MODEL_FAMILIES, get_submodule

        if remote:
            raise NotImplementedError("remote (NDIF) execution is not supported; run the model locally")
        config = torch_model(model).config
        if MODEL_FAMILIES.get(config.model_type) not in (MODEL_FAMILIES["llama"], MODEL_FAMILIES["gpt_neox"]):
            raise ValueError(f"HeadActivationBuffer supports Llama-like and GPT-NeoX models, not {config.model_type!r}")
        projection = self._OUTPUT_PROJECTIONS.get(config.model_type, "o_proj")
        o_proj = getattr(get_submodule(model, layer, "attn"), projection)
        self.layer, self.apply_W_O = layer, apply_W_O
        self.n_heads = config.num_attention_heads
        super().__init__(
            data,
            model,
            o_proj,
            io="in",
            n_ctxs=n_ctxs,
            ctx_len=ctx_len,
            refresh_batch_size=refresh_batch_size,
            out_batch_size=out_batch_size,
            device=device,
            **kwargs,
        )
        self.head_dim = self.widths[0] // self.n_heads
        self.W_O = o_proj._module.weight.detach()  # [d_model, n_heads * head_dim]
        width = self.W_O.shape[0] if apply_W_O else self.head_dim
        self.storage = [torch.empty(self.capacity, self.n_heads, width, dtype=self.dtype, device=self.device)]
        self.d_submodule = width

    def read(self, tokens: dict[str, torch.Tensor], return_ids: bool = False) -> list[torch.Tensor]:
        acts = super().read(tokens, return_ids)
        heads = acts[0].reshape(acts[0].shape[0], self.n_heads, -1)  # [N, H, head_dim]
        if self.apply_W_O:
            W_O_HdD = self.W_O.T.reshape(self.n_heads, self.head_dim, -1).to(heads)
            heads = torch.einsum("nhk,hkd->nhd", heads, W_O_HdD)
        return [heads, *acts[1:]]

    @property
    def config(self) -> dict[str, Any]:
        return super().config | {"layer": self.layer, "n_heads": self.n_heads, "apply_W_O": self.apply_W_O}


__all__ = ["ActivationBuffer", "ActivationReader", "HeadActivationBuffer", "NNsightActivationBuffer", "Site"]
