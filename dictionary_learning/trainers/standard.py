"""Standard L1 SAE training (Bricken et al. 2023) and Anthropic's April-2024 update of the recipe."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DEBUG  # noqa: F401 (the reference re-exports these names here)
from ..dictionaries import AutoEncoder
from ..ops import row_sums
from .trainer import (  # noqa: F401
    ConstrainedAdam,
    PenalisedConfig,
    PenalisedTrainer,
    SAETrainer,
    StepOutput,
    TranscoderConfig,
    get_lr_schedule,
    get_sparsity_warmup_fn,
    register_trainer,
)


def reconstruction_terms(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean squared error summed over D, mean un-squared L2 error): the loss's term (logged as
    `mse_loss`) and the reference's `l2_loss` log of the L1 recipes (a norm, not its square)."""
    err_BD = x_BD - x_hat_BD
    return err_BD.pow(2).sum(-1).mean(), err_BD.detach().norm(dim=-1).mean()


@dataclass(frozen=True, kw_only=True)
class L1Config(PenalisedConfig):
    """The fields of the L1 recipes (Standard, its April update, Gated)."""

    dict_class: type | str = AutoEncoder
    lr: float = 1e-3
    l1_penalty: float = 1e-1
    """weight of the L1 penalty on the latents"""
    wandb_name: str = "StandardTrainerAprilUpdate"


@dataclass(frozen=True, kw_only=True)
class ResampledL1Config(L1Config):
    resample_steps: int | None = None
    """resample latents that did not fire for half of each such period (None: never)"""
    wandb_name: str = "StandardTrainer"


@dataclass(frozen=True, kw_only=True)
class StandardTrainerAprilUpdateConfig(L1Config, TranscoderConfig):
    positional = (
        "steps activation_dim dict_size layer lm_name dict_class lr l1_penalty warmup_steps "
        "sparsity_warmup_steps decay_start seed device wandb_name submodule_name sparse "
        "transcoder output_dim skip_connection"
    )


@dataclass(frozen=True, kw_only=True)
class StandardConfig(ResampledL1Config, TranscoderConfig):
    positional = (
        "steps activation_dim dict_size layer lm_name dict_class lr l1_penalty warmup_steps "
        "sparsity_warmup_steps decay_start resample_steps seed device wandb_name submodule_name sparse "
        "transcoder output_dim skip_connection"
    )


@register_trainer
class StandardTrainer(PenalisedTrainer):
    """Standard L1 recipe: ConstrainedAdam (unit-norm decoder columns), sparsity warm-up, optional
    resampling of dead latents."""

    Config = StandardConfig

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`mean_b ||y - x_hat||^2 + l1_penalty * s(t) * mean_b ||f||_1`, s(t) the sparsity warm-up,
        y = x for an SAE, the output half for a transcoder (which encodes the input half)."""
        x, y = self.input_and_target(x)
        f, x_hat = self.ae.encode_decode(x, self.max_density)
        mse, l2 = reconstruction_terms(y, x_hat)
        l1 = row_sums(f).mean()  # = mean L1 norm: ReLU features are non-negative (and sum's backward is free)
        loss = mse + self.l1_penalty * self.sparsity_scale(step) * l1
        logs = {"l2_loss": l2, "mse_loss": mse, "sparsity_loss": l1, "loss": loss}
        return StepOutput(loss, x_hat, f, logs, target=y)


@register_trainer
class StandardTrainerAprilUpdate(PenalisedTrainer):
    """Anthropic's April-2024 update: plain Adam (decoder norm free), L1 weighted by decoder norms,
    gradient clipping at 1. The penalty uses `encode`'s features, so decoder norms count once even
    with `AutoEncoderNew`, whose `forward` already rescales (the reference's issue #39).
    """

    Config = StandardTrainerAprilUpdateConfig
    constrained = False
    max_grad_norm = 1.0

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`mean_b ||y - x_hat||^2 + l1_penalty * s(t) * mean_b sum_i |f_i| ||W_dec[:, i]||` (y as in
        `StandardTrainer.loss`)."""
        x, y = self.input_and_target(x)
        f, x_hat = self.ae.encode_decode(x, self.max_density)
        mse, l2 = reconstruction_terms(y, x_hat)
        l1 = row_sums(f, self.ae.decoder_FD().norm(dim=-1)).mean()
        loss = mse + self.l1_penalty * self.sparsity_scale(step) * l1
        logs = {"l2_loss": l2, "mse_loss": mse, "sparsity_loss": l1, "loss": loss}
        return StepOutput(loss, x_hat, f, logs, target=y)
