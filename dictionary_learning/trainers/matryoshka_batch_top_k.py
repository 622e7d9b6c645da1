"""Matryoshka BatchTopK training (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"): every prefix of feature groups must reconstruct on its own.
"""

from __future__ import annotations

import math

import torch

from ..dictionaries import (
    Dictionary,  # noqa: F401 (the reference re-exports these names here)
    MatryoshkaBatchTopKSAE,
)
from ..sparse import SparseCode, sparse_decode
from .batch_top_k import BatchTopKTrainer
from .trainer import (  # noqa: F401
    SAETrainer,
    get_lr_schedule,
    register_trainer,
    remove_gradient_parallel_to_decoder_directions,
    set_decoder_norm_to_unit_norm,
)

__all__ = ["MatryoshkaBatchTopKSAE", "MatryoshkaBatchTopKTrainer"]


def group_sizes_from_fractions(dict_size: int, group_fractions: list[float]) -> list[int]:
    """Sizes `int(frac * F)` for all groups but the last, which takes the remainder."""
    if not math.isclose(sum(group_fractions), 1.0):
        raise ValueError(f"group_fractions must sum to 1, got {sum(group_fractions)} from {group_fractions}")
    sizes = [int(frac * dict_size) for frac in group_fractions[:-1]]
    return sizes + [dict_size - sum(sizes)]


def apply_temperature(probabilities: list[float], temperature: float) -> list[float]:
    """`p_i^(1/T)` renormalised to sum to 1: sharper for T < 1, flatter for T > 1 (the reference's
    helper for sampling Matryoshka group sizes; unused by its trainer and by ours)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scaled = [p ** (1.0 / temperature) for p in probabilities]
    total = sum(scaled)
    return [p / total for p in scaled]


@register_trainer
class MatryoshkaBatchTopKTrainer(BatchTopKTrainer):
    """`loss = mean_i w_i * ||x - x_hat_(<=i)||^2 + auxk_alpha * AuxK`, where x_hat_(<=i) decodes
    groups 0..i only. With the default uniform weights 1/G each prefix counts 1/G^2, as in the reference.
    """

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        k: int,
        layer: int | None = None,
        lm_name: str | None = None,
        group_fractions: list[float] = (1.0,),
        group_weights: list[float] | None = None,
        dict_class: type = MatryoshkaBatchTopKSAE,
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
        self.group_fractions = list(group_fractions)
        self.group_sizes = group_sizes_from_fractions(dict_size, self.group_fractions)
        if group_weights is None:
            group_weights = [1.0 / len(self.group_sizes)] * len(self.group_sizes)
        if len(group_weights) != len(self.group_sizes):
            raise ValueError(f"group_weights has {len(group_weights)} entries for {len(self.group_sizes)} groups")
        self.group_weights = list(group_weights)
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

    def _group_masks(self) -> list[torch.Tensor]:
        """One `[F]` 0/1 mask per feature group (built once per device)."""
        device = self.ae.b_dec.device
        if getattr(self, "_masks", None) is None or self._masks[0].device != device:
            bounds = self.ae.group_indices
            features = torch.arange(self.ae.dict_size, device=device)
            self._masks = [((features >= a) & (features < b)).float() for a, b in zip(bounds, bounds[1:])]
        return self._masks

    def _extra_dict_kwargs(self):
        return {"group_sizes": self.group_sizes}

    def _resolved_config(self):
        return super()._resolved_config() | {"group_sizes": self.group_sizes, "group_weights": self.group_weights}

    def _reconstruction(self, x, f):
        x_hat = self.ae.b_dec.expand_as(x)
        prefix_losses = []
        W_dec_FD = self.ae.decoder_FD()
        bounds = self.ae.group_indices
        for g, weight in enumerate(self.group_weights):
            if isinstance(f, SparseCode):
                x_hat = x_hat + sparse_decode(f, W_dec_FD, self._group_masks()[g])
            else:
                x_hat = x_hat + f[:, bounds[g] : bounds[g + 1]] @ W_dec_FD[bounds[g] : bounds[g + 1]]
            prefix_losses.append(weight * (x - x_hat).pow(2).sum(-1).mean())
        losses = torch.stack(prefix_losses)
        l2 = losses.mean()
        logs = {"l2_loss": l2, "min_l2_loss": losses.min(), "max_l2_loss": losses.max()}
        return x_hat, l2, logs, x - x_hat
