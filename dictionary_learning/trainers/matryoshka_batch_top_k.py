"""Matryoshka BatchTopK training (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"): every prefix of feature groups must reconstruct on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..dictionaries import (
    Dictionary,  # noqa: F401 (the reference re-exports these names here)
    MatryoshkaBatchTopKSAE,
)
from ..sparse import SparseCode, sparse_decode
from .batch_top_k import BatchTopKConfig, BatchTopKTrainer
from .trainer import (  # noqa: F401
    SAETrainer,
    StepOutput,
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


@dataclass(frozen=True, kw_only=True)
class MatryoshkaBatchTopKConfig(BatchTopKConfig):
    positional = (
        "steps activation_dim dict_size k layer lm_name group_fractions group_weights dict_class lr auxk_alpha "
        "warmup_steps decay_start threshold_beta threshold_start_step k_anneal_steps seed device wandb_name "
        "submodule_name sparse transcoder output_dim skip_connection optimizer_name encoder_init_norm"
    )
    group_fractions: list[float] = (1.0,)
    """fraction of the latents in each nested group (sums to 1)"""
    group_weights: list[float] | None = None
    """weight of each prefix's reconstruction loss (None: 1 / number of groups each)"""
    dict_class: type | str = MatryoshkaBatchTopKSAE

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = group_sizes_from_fractions(self.dict_size, list(self.group_fractions))
        if self.group_weights is not None and len(self.group_weights) != len(sizes):
            raise ValueError(f"group_weights has {len(self.group_weights)} entries for {len(sizes)} groups")


@register_trainer
class MatryoshkaBatchTopKTrainer(BatchTopKTrainer):
    """BatchTopK whose nested prefixes of feature groups must each reconstruct on their own."""

    Config = MatryoshkaBatchTopKConfig

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`sum_g w_g ||x - x_hat_(<=g)||^2 / G + auxk_alpha * AuxK` (means over rows), x_hat_(<=g) decoded
        from groups 0..g only; with the default weights 1/G each prefix counts 1/G^2, as in the reference."""
        x_BD, _ = self.input_and_target(x)
        code = self.ae.training_code(x_BD, self.sparse)
        x_hat_BD = self.ae.b_dec.expand_as(x_BD)
        W_dec_FD, bounds, prefix_losses = self.ae.decoder_FD(), self.ae.group_indices, []
        for g, weight in enumerate(self.group_weights):
            if isinstance(code.f, SparseCode):
                x_hat_BD = x_hat_BD + sparse_decode(code.f, W_dec_FD, self._group_masks()[g])
            else:
                x_hat_BD = x_hat_BD + code.f[:, bounds[g] : bounds[g + 1]] @ W_dec_FD[bounds[g] : bounds[g + 1]]
            prefix_losses.append(weight * (x_BD - x_hat_BD).pow(2).sum(-1).mean())
        losses = torch.stack(prefix_losses)
        l2 = losses.mean()
        logs = {"l2_loss": l2, "mse_loss": l2, "min_l2_loss": losses.min(), "max_l2_loss": losses.max()}
        return self.with_auxk(x_BD, code, x_hat_BD, l2, logs)

    def dictionary_args(self, cfg: MatryoshkaBatchTopKConfig) -> tuple:
        if cfg.transcoder:
            raise ValueError(
                "MatryoshkaBatchTopKTrainer does not train transcoders: use TopKTrainer, BatchTopKTrainer, "
                "StandardTrainer or JumpReluTrainer"
            )
        self.group_fractions = list(cfg.group_fractions)
        self.group_sizes = group_sizes_from_fractions(cfg.dict_size, self.group_fractions)
        n = len(self.group_sizes)
        self.group_weights = [1.0 / n] * n if cfg.group_weights is None else list(cfg.group_weights)
        return *super().dictionary_args(cfg), self.group_sizes

    def _group_masks(self) -> list[torch.Tensor]:
        """One `[F]` 0/1 mask per feature group (built once per device)."""
        device = self.ae.b_dec.device
        if getattr(self, "_masks", None) is None or self._masks[0].device != device:
            bounds = self.ae.group_indices
            features = torch.arange(self.ae.dict_size, device=device)
            self._masks = [((features >= a) & (features < b)).float() for a, b in zip(bounds, bounds[1:])]
        return self._masks

    def _resolved_config(self):
        return super()._resolved_config() | {"group_sizes": self.group_sizes, "group_weights": self.group_weights}
