"""ActivationBuffer: shuffled batches of a model's activations at one or several submodules (read
by `reader.ActivationReader`).

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

from .config import DEBUG  # noqa: F401 (the reference has it here)
from .data import text_record
from .nnsight_io import Site, model_id, torch_model
from .reader import (  # noqa: F401 (ActivationReader and the helpers were imported from here before)
    ActivationReader,
    check_positive_ints,
    ensure_pad_token,
    reader_sites,
    tokenize_batch,
    tracer_kwargs,
)
from .shuffle import OwnedShuffle

logger = logging.getLogger(__name__)


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
        self.shuffle = OwnedShuffle(seed)
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
        self._order = valid[torch.randperm(valid.numel(), generator=self.shuffle.generator())]
        self._ptr = 0

    @property
    def seed(self) -> int | None:
        """The shuffle's seed (None until the first fill draws one, when none was given)."""
        return self.shuffle.seed

    # ------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to serve the same batches again from the start of the text: the
        shuffle's seed (drawn now if the buffer has not been read yet)."""
        return self.shuffle.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the shuffle seed of an earlier run's buffer (`state_dict`); the buffer must be unread."""
        if self._filled or self.items_read:
            raise ValueError(
                "load_state_dict needs an unread buffer (this one has served activations already): build a new "
                "ActivationBuffer for the resumed run"
            )
        self.shuffle.load_state_dict(state)

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
