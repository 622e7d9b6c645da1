"""The reference's `pytorch_buffer`: an ActivationBuffer for a plain Hugging Face model, read with
PyTorch forward hooks instead of nnsight (`transformers.AutoModelForCausalLM` in, no tracing).

It is our `buffer.ActivationBuffer` (same shuffling, BOS and high-norm masking, sharding, dtype and
seed options) with the model access swapped for `splice.run_model`, which stops the forward pass
right after the last hooked module. Unlike the reference's, `io="in"` reads the module's input
(the reference silently read its output) and `io="in_to_out"` reads both.

    model = AutoModelForCausalLM.from_pretrained(...)
    buffer = ActivationBuffer(texts, model, model.model.layers[3].mlp, tokenizer=tokenizer, ...)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .buffer import ActivationBuffer as _NNsightActivationBuffer
from .nnsight_io import Site
from .splice import module_name, run_model


class EarlyStopException(Exception):
    """The reference's signal to abort a forward pass once the hooked module has run. Ours stops
    the same way inside `splice.run_model`; the name is kept for code that catches it."""


def collect_activations(
    model: nn.Module, submodule: nn.Module, inputs_BL: dict[str, torch.Tensor], use_no_grad: bool = True
) -> torch.Tensor:
    """The output of `submodule` (its hidden states: element 0 of a tuple) for the token batch
    `inputs_BL` (`input_ids`, optionally `attention_mask`), running `model` only up to it."""
    key = (module_name(model, submodule), "out")
    with torch.no_grad() if use_no_grad else torch.enable_grad():
        _, saved = run_model(model, inputs_BL["input_ids"], inputs_BL.get("attention_mask"), read=[key], logits=False)
    return saved[key]


class ActivationBuffer(_NNsightActivationBuffer):
    """Shuffled activation batches of a plain Hugging Face model (the reference's signature, plus our
    buffer's `dtype` and `seed` and a `tokenizer`: by default the reference's
    `AutoTokenizer.from_pretrained(model.name_or_path)`). `submodule` is a torch submodule or its
    dotted name, or a list/dict of them."""

    def __init__(
        self,
        data: Iterable,
        model: nn.Module,
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
        tokenizer=None,
        pack: bool = True,
        loop: bool = False,
    ):
        self._given_tokenizer = tokenizer
        super().__init__(
            data,
            model,
            submodule,
            d_submodule,
            io,
            n_ctxs,
            ctx_len,
            refresh_batch_size,
            out_batch_size,
            device,
            remove_bos,
            add_special_tokens,
            max_activation_norm_multiple,
            dtype,
            seed,
            pack,
            loop,
        )

    def _tokenizer_of(self, model):
        if self._given_tokenizer is not None:
            return self._given_tokenizer
        from transformers import AutoTokenizer

        name = getattr(model, "name_or_path", "")
        if not name:
            raise ValueError("this model has no name_or_path to load its tokenizer from: pass tokenizer=...")
        return AutoTokenizer.from_pretrained(name)

    def _resolve_sites(self, submodules: list, io: str) -> list[Site]:
        return [Site(module_name(self.model, s), None, io) for s in submodules]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _torch_module(self) -> nn.Module:
        return self.model

    def _read_raw(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
        reads = [(site.name, kind) for site in self.sites for kind in _kinds(site.io)]
        with torch.no_grad():
            _, saved = run_model(self.model, input_ids, attention_mask, read=reads, logits=False)
        return [
            (saved[(s.name, "in")], saved[(s.name, "out")]) if s.io == "in_to_out" else saved[(s.name, s.io)]
            for s in self.sites
        ]


def _kinds(io: str) -> tuple[str, ...]:
    return ("in", "out") if io == "in_to_out" else (io,)


__all__ = ["ActivationBuffer", "EarlyStopException", "collect_activations"]
