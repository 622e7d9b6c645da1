"""BatchTopK SAE training (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Keeps the k * B largest activations of the whole batch, so the number of active latents may vary
per token while averaging k. Inference uses the global threshold learned during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from ..dictionaries import (
    BatchTopKSAE,
    Dictionary,  # noqa: F401 (the reference re-exports these names here)
)
from .top_k import TopKConfig, TopKTrainer
from .trainer import (  # noqa: F401
    SAETrainer,
    get_lr_schedule,
    register_trainer,
    remove_gradient_parallel_to_decoder_directions,
    set_decoder_norm_to_unit_norm,
)

__all__ = ["BatchTopKSAE", "BatchTopKTrainer"]


@dataclass(frozen=True, kw_only=True)
class BatchTopKConfig(TopKConfig):
    dict_class: type | str = BatchTopKSAE
    wandb_name: str = "BatchTopKSAE"


@register_trainer
class BatchTopKTrainer(TopKTrainer):
    """The TopK recipe and its loss (`TopKTrainer.loss`) with batch-level top-k: the k * B largest
    activations of the batch are kept; the threshold EMA tracks the batch's smallest kept value."""

    Config = BatchTopKConfig

    @torch.no_grad()
    def _update_threshold(self, f):
        positive = f > 0
        m = distributed.min_(torch.where(positive, f, torch.inf).min().float())
        self._ema_threshold(torch.where(torch.isfinite(m), m, 0.0), torch.isfinite(m))

    def update_threshold(self, f: torch.Tensor) -> None:
        """EMA update of the inference threshold from the batch's code `f` (the reference's name)."""
        self._update_threshold(f.detach())
