"""Crosscoder training (Anthropic 2024, "Sparse Crosscoders"; the names of the crosscoder fork of
the reference): batches `[B, L, D]`, one sparse code for the L sites.

`CrossCoderTrainer`: L1 penalty weighted by the sum of each latent's per-site decoder norms.
`BatchTopKCrossCoderTrainer`: the BatchTopK recipe (AuxK, threshold, sparse path) on
decoder-norm-weighted activations. Neither keeps decoder norms at 1: the norms are what tells which
site a latent writes to (`relative_decoder_norms`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dictionaries.crosscoder import BatchTopKCrossCoder, CrossCoder
from ..dictionaries.relu import relu_dictionary
from ..ops import row_sums
from .batch_top_k import BatchTopKConfig, BatchTopKTrainer
from .standard import reconstruction_terms
from .trainer import (
    BatchLayoutError,
    PenalisedConfig,
    PenalisedTrainer,
    StepOutput,
    register_trainer,
)

__all__ = ["BatchTopKCrossCoderTrainer", "CrossCoderTrainer"]


class _StackedSites:
    """What both crosscoder recipes share: `[B, L, D]` batches read as flat rows `[B, L * D]` (which
    may also be given as they are)."""

    def input_and_target(self, x):
        L, D = self.num_layers, self.activation_dim
        if isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[-1] == L * D:
            return x, x  # already flat rows
        if not (isinstance(x, torch.Tensor) and x.ndim == 3 and tuple(x.shape[1:]) == (L, D)):
            raise BatchLayoutError(self, x, self._layout_fix(x))
        rows = x.flatten(1)
        return rows, rows

    def batch_layout(self) -> str:
        L, D = self.num_layers, self.activation_dim
        return f"[B, {L}, {D}] stacked sites (or flat [B, {L * D}] rows)"

    def _layout_fix(self, x) -> str:
        L = self.num_layers
        if isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[-1] == self.activation_dim:
            return f"the data stacks {x.shape[1]} sites but num_layers={L}: set num_layers={x.shape[1]}"
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            return "these hold each site's (input, output) rows (io='in_and_out'): a crosscoder reads io='out' or 'in'"
        return (
            f"read {L} sites with one buffer or cache (stack_sites=True; --crosscoder --layer ...) or one site of two "
            f"models with PairedActivationBuffer (--paired-model)"
        )

    def _decoder_constraint(self):
        return []  # the per-site decoder norms are free: they weight the sparsity and tell the sites apart


@dataclass(frozen=True, kw_only=True)
class CrossCoderConfig(PenalisedConfig):
    positional = (
        "steps activation_dim dict_size num_layers layer lm_name dict_class lr l1_penalty warmup_steps "
        "sparsity_warmup_steps decay_start seed device wandb_name submodule_name sparse"
    )
    num_layers: int
    """sites stacked in each [B, L, D] batch (layers of one model, or one layer of several models)"""
    dict_class: type | str = CrossCoder
    lr: float = 1e-4
    l1_penalty: float = 1e-1
    """weight of the L1 penalty, each latent weighted by the sum of its per-site decoder norms"""
    wandb_name: str = "CrossCoderTrainer"


@register_trainer
class CrossCoderTrainer(_StackedSites, PenalisedTrainer):
    """L1 crosscoder recipe: Adam without a decoder-norm constraint, sparsity warm-up."""

    Config = CrossCoderConfig
    constrained = False

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`mean_b sum_l ||x_l - x_hat_l||^2 + l1_penalty * s(t) * mean_b sum_f f_f * sum_l ||W_dec[l, f]||`
        (Anthropic's crosscoder loss; s(t) the sparsity warm-up)."""
        x, _ = self.input_and_target(x)
        ae = self.ae
        W_dec_DF = ae.decoder_FD().T
        f, x_hat = relu_dictionary(x, ae.encoder_FD(), ae.encoder.bias, W_dec_DF, None, ae.decoder.bias.view(-1),
                                   self.max_density)  # fmt: skip
        mse, l2 = reconstruction_terms(x, x_hat)
        l1 = row_sums(f, ae.decoder_norms().sum(0)).mean()
        loss = mse + self.l1_penalty * self.sparsity_scale(step) * l1
        logs = {"l2_loss": l2, "mse_loss": mse, "sparsity_loss": l1, "loss": loss}
        return StepOutput(loss, x_hat, f, logs, target=x)

    def dictionary_args(self, cfg: CrossCoderConfig) -> tuple:
        return cfg.activation_dim, cfg.dict_size, cfg.num_layers


@dataclass(frozen=True, kw_only=True)
class BatchTopKCrossCoderConfig(BatchTopKConfig):
    positional = (
        "steps activation_dim dict_size num_layers k layer lm_name dict_class lr auxk_alpha warmup_steps decay_start "
        "threshold_beta threshold_start_step k_anneal_steps seed device wandb_name submodule_name sparse "
        "transcoder output_dim skip_connection optimizer_name encoder_init_norm"
    )
    num_layers: int
    """sites stacked in each [B, L, D] batch (layers of one model, or one layer of several models)"""
    dict_class: type | str = BatchTopKCrossCoder
    wandb_name: str = "BatchTopKCrossCoderTrainer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transcoder:
            raise ValueError("a crosscoder reads and writes the same sites: transcoder=True does not apply")


@register_trainer
class BatchTopKCrossCoderTrainer(_StackedSites, BatchTopKTrainer):
    """The BatchTopK recipe (`TopKTrainer.loss`: reconstruction + AuxK) on flat `[B, L * D]` rows, the
    batch's k * B largest `ReLU(pre) * sum_l ||W_dec[l, f]||` kept; the threshold tracks those weighted values."""

    Config = BatchTopKCrossCoderConfig

    def dictionary_args(self, cfg: BatchTopKCrossCoderConfig) -> tuple:
        return cfg.activation_dim, cfg.dict_size, cfg.num_layers, cfg.k
