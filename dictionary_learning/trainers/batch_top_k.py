"""BatchTopK SAE training (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Keeps the k * B largest activations of the whole batch, so the number of active latents may vary
per token while averaging k. Inference uses the global threshold learned during training.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..dictionaries import (
    BatchTopKSAE,
    Dictionary,  # noqa: F401 (the reference re-exports these names here)
)
from .top_k import TopKTrainer
from .trainer import (  # noqa: F401
    SAETrainer,
    get_lr_schedule,
    register_trainer,
    remove_gradient_parallel_to_decoder_directions,
    set_decoder_norm_to_unit_norm,
)

__all__ = ["BatchTopKSAE", "BatchTopKTrainer"]


@register_trainer
class BatchTopKTrainer(TopKTrainer):
    """The TopK recipe with batch-level top-k; the threshold EMA tracks the batch's smallest kept value."""

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        k: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type = BatchTopKSAE,
        lr: float | None = None,
        auxk_alpha: float = 1 / 32,
        warmup_steps: int = 1000,
        decay_start: int | None = None,
        threshold_beta: float = 0.999,
        threshold_start_step: int = 1000,
        k_anneal_steps: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str = "BatchTopKSAE",
        submodule_name: str | None = None,
        sparse: bool = True,
    ):
        super().__init__(
            steps,
            activation_dim,
            dict_size,
            k,
            layer,
            lm_name,
            dict_class,
            lr,
            auxk_alpha,
            warmup_steps,
            decay_start,
            threshold_beta,
            threshold_start_step,
            k_anneal_steps,
            seed,
            device,
            wandb_name,
            submodule_name,
            sparse,
        )

    def _encode_for_training(self, x):
        f, fired_F, a = self.ae.encode(x, return_active=True, use_threshold=False)
        return f, a, fired_F, f

    def _threshold_input(self, code):
        return code.values.detach()

    @torch.no_grad()
    def _update_threshold(self, f):
        positive = f > 0
        m = distributed.min_(torch.where(positive, f, torch.inf).min().float())
        self._ema_threshold(torch.where(torch.isfinite(m), m, 0.0), torch.isfinite(m))

    def update_threshold(self, f: torch.Tensor) -> None:
        """EMA update of the inference threshold from the batch's code `f` (the reference's name)."""
        self._update_threshold(f.detach())
