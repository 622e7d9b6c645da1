"""End-to-end dictionary training (Braun et al. 2024, "Identifying Functionally Important Features
with End-to-End Sparse Dictionary Learning", arXiv 2405.12241).

The dictionary is spliced into the frozen model while it trains. Its loss is the trainer's own
(sparsity mechanism included) with the local reconstruction term reweighted, plus

    kl_weight         * mean over real tokens of KL(clean || spliced) of the next-token distributions
    downstream[site]  * mean over real tokens of ||a_clean(site) - a_spliced(site)||^2   (each later site)

so `local_weight=0, kl_weight=1` is the paper's "e2e" SAE and adding downstream sites its
"e2e + downstream". Every term is a per-token sum over dimensions averaged over tokens, like the
trainers' own reconstruction loss. Use through `trainSAE(TokenBatches(...), configs, steps, e2e=E2EObjective(...))`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .data import pack_documents, text_record
from .dictionaries.base import device_of
from .distributed import strided
from .reader import check_positive_ints, ensure_pad_token, tokenize_batch
from .splice import last_executed, module_name, root_module, run_model


class TokenBatches:
    """Token batches `{"input_ids", "attention_mask"}` (right-padded) of `batch_size` contexts each,
    from an iterable of strings (packed into contexts of `ctx_len` tokens, or with `pack=False`
    one per text) or of token-id sequences: the data of e2e training."""

    def __init__(
        self,
        data: Iterable,
        tokenizer,
        batch_size: int = 32,
        ctx_len: int = 128,
        add_special_tokens: bool = True,
        pack: bool = True,
    ):
        check_positive_ints(batch_size=batch_size, ctx_len=ctx_len)
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # accept an nnsight model too
        ensure_pad_token(self.tokenizer)
        self.text = text_record(data)
        self.data = pack_documents(data, self.tokenizer, ctx_len, add_special_tokens) if pack else iter(data)
        self.batch_size, self.ctx_len, self.pack = int(batch_size), int(ctx_len), pack
        self.add_special_tokens = add_special_tokens

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def shard(self, rank: int, world_size: int) -> None:
        """Read only texts rank, rank + world_size, ... (data-parallel training: disjoint shares)."""
        self.data = strided(self.data, rank, world_size)

    def __next__(self) -> dict[str, torch.Tensor]:
        items = []
        for item in self.data:
            items.append(item)
            if len(items) == self.batch_size:
                break
        if not items:
            raise StopIteration
        return tokenize_batch(self.tokenizer, items, self.ctx_len, self.add_special_tokens)

    @property
    def config(self) -> dict[str, Any]:
        record = {"kind": "tokens", "batch_size": self.batch_size, "ctx_len": self.ctx_len, "packed": self.pack}
        return record | ({"text": self.text} if self.text else {})


@dataclass
class E2EBatch:
    """One token batch and its clean-run targets (computed without gradients)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    keep: torch.Tensor  # [B, L] bool: the real tokens, where every loss is measured
    x: torch.Tensor  # [N, D] float32: the site's activations at the kept positions (what the dictionary sees)
    x_full: torch.Tensor  # [B, L, D] the site's activations, model dtype
    downstream: dict[str, torch.Tensor]  # site -> [N, d] clean activations at the kept positions
    clean_logp: torch.Tensor | None  # [N, V] clean next-token log-probabilities, when KL is used


class E2EObjective:
    """The end-to-end loss of a dictionary spliced into `model` at `submodule` (see the module doc).

    Args:
        model: an nnsight model (or a plain Hugging Face causal LM); its weights are frozen during training.
        submodule: the site: a dotted name, a torch submodule or an envoy; `io` picks its output or input.
        kl_weight: weight of KL(clean || spliced) on the final logits.
        local_weight: weight of the trainer's own reconstruction term at the site (1 = local training).
        downstream: later sites whose clean activations the spliced model should keep: a list (each
            weighted `downstream_weight`) or `{site: weight}`. Their outputs are compared.
    """

    def __init__(
        self,
        model,
        submodule,
        kl_weight: float = 1.0,
        local_weight: float = 0.0,
        downstream: Iterable | Mapping | None = None,
        downstream_weight: float = 1.0,
        io: str = "out",
    ):
        if io not in ("in", "out"):
            raise ValueError(f"e2e training splices a site's output or input: io must be 'out' or 'in', got {io!r}")
        self.model, self.io = model, io
        self.site = module_name(model, submodule)
        if not isinstance(downstream, Mapping):
            downstream = {s: downstream_weight for s in downstream or ()}
        self.downstream = {module_name(model, s): float(w) for s, w in downstream.items()}
        self.kl_weight, self.local_weight = float(kl_weight), float(local_weight)
        weights = {"kl_weight": self.kl_weight, "local_weight": self.local_weight}
        weights |= {f"downstream weight of {s}": w for s, w in self.downstream.items()}
        negative = [name for name, w in weights.items() if not w >= 0]
        if negative:
            raise ValueError(f"e2e weights must be >= 0 (finite): {', '.join(negative)}")
        if not any(weights.values()):
            raise ValueError("every e2e weight is 0: give kl_weight, local_weight or a downstream weight > 0")
        root = root_module(model)
        for name in self.downstream:
            if last_executed(root, [(self.site, io), (name, "out")]) != (name, "out") or name == self.site:
                raise ValueError(f"downstream site {name!r} does not come after the spliced site {self.site!r}")
        self._reads = [(self.site, io)] + [(name, "out") for name in self.downstream]
        probe = torch.zeros(1, 1, dtype=torch.long, device=device_of(root_module(model)))
        with torch.no_grad():
            _, saved = run_model(model, probe, read=[(self.site, io)], logits=False)
        self.activation_dim = saved[(self.site, io)].shape[-1]  # the width a dictionary at the site needs

    @property
    def config(self) -> dict[str, Any]:
        """Recorded in each trainer's config.json under "e2e" (and checked on resume)."""
        return {
            "site": self.site,
            "io": self.io,
            "kl_weight": self.kl_weight,
            "local_weight": self.local_weight,
            "downstream": dict(self.downstream),
        }

    @property
    def needs_model(self) -> bool:
        """False when the loss is local only: training then needs no spliced forward pass."""
        return self.kl_weight > 0 or any(w > 0 for w in self.downstream.values())

    @contextlib.contextmanager
    def frozen_model(self) -> Iterator[None]:
        """Model weights without gradients (restored on exit): the backward pass reaches the dictionary only."""
        params = [p for p in root_module(self.model).parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    @torch.no_grad()
    def prepare(self, tokens: dict[str, torch.Tensor]) -> E2EBatch:
        """The clean run of a token batch: the site's activations and every target the loss needs.
        Without a KL term the model stops after the last site it needs."""
        if not isinstance(tokens, Mapping) or "input_ids" not in tokens:
            raise TypeError(
                f"e2e training takes token batches {{'input_ids', 'attention_mask'}} (e.g. TokenBatches), "
                f"got {type(tokens).__name__}"
            )
        device = device_of(root_module(self.model))
        ids = tokens["input_ids"].to(device)
        mask = tokens.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        use_kl = self.kl_weight > 0
        logits, saved = run_model(self.model, ids, mask, read=self._reads, logits=use_kl)
        keep = mask.bool()
        x_full = saved[(self.site, self.io)]
        downstream = {name: saved[(name, "out")][keep] for name in self.downstream}
        clean_logp = torch.log_softmax(logits[keep].float(), dim=-1) if use_kl else None
        return E2EBatch(ids, mask, keep, x_full[keep].float(), x_full, downstream, clean_logp)

    def loss_fn(self, batch: E2EBatch, trainer, norm_factor: float | None = None) -> Callable:
        """For `trainer.update(..., extra_loss=...)`: maps the trainer's forward output to the e2e loss
        and its logged parts. `norm_factor` undoes trainSAE's activation normalisation before splicing."""
        recon_key = "mse_loss"  # every recipe logs its reconstruction term under this name

        def total(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss = out.loss
            logs: dict[str, torch.Tensor] = {}
            if self.local_weight != 1.0:
                loss = loss + (self.local_weight - 1.0) * out.losses[recon_key]
            if self.needs_model:
                x_hat = out.x_hat.reshape(-1, batch.x_full.shape[-1])
                if norm_factor is not None:
                    x_hat = x_hat * norm_factor
                spliced_x = batch.x_full.clone()
                spliced_x[batch.keep] = x_hat.to(spliced_x.device, spliced_x.dtype)
                reads = [(name, "out") for name in self.downstream]
                logits, saved = run_model(
                    self.model,
                    batch.input_ids,
                    batch.attention_mask,
                    replace={self.site: lambda _value: spliced_x},
                    read=reads,
                    io=self.io,
                    logits=self.kl_weight > 0,
                )
                if self.kl_weight > 0:
                    log_q = torch.log_softmax(logits[batch.keep].float(), dim=-1)
                    kl = torch.nn.functional.kl_div(log_q, batch.clean_logp, log_target=True, reduction="sum")
                    kl = kl / batch.keep.sum()
                    loss = loss + self.kl_weight * kl
                    logs["kl_loss"] = kl.detach()
                for name, weight in self.downstream.items():
                    diff = saved[(name, "out")][batch.keep].float() - batch.downstream[name].float()
                    mse = diff.pow(2).sum(-1).mean()
                    loss = loss + weight * mse
                    logs[f"downstream_mse/{name}"] = mse.detach()
            logs["e2e_loss"] = loss.detach()
            return loss, logs

        return total


__all__ = ["E2EBatch", "E2EObjective", "TokenBatches"]
