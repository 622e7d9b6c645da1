"""Standard L1 SAE training (Bricken et al. 2023) and Anthropic's April-2024 update of the recipe."""

from __future__ import annotations

import torch

from ..config import DEBUG  # noqa: F401 (the reference re-exports these names here)
from ..dictionaries import AutoEncoder
from ..ops import row_sums
from .trainer import (  # noqa: F401
    ConstrainedAdam,
    PenalisedTrainer,
    SAETrainer,
    StepOutput,
    get_lr_schedule,
    get_sparsity_warmup_fn,
    register_trainer,
)


def reconstruction_terms(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean squared error summed over D, mean un-squared L2 error): the loss and the logged l2_loss."""
    err_BD = x_BD - x_hat_BD
    return err_BD.pow(2).sum(-1).mean(), err_BD.detach().norm(dim=-1).mean()


@register_trainer
class StandardTrainer(PenalisedTrainer):
    """`loss = mean_b ||x - x_hat||^2 + l1_penalty * s(t) * mean_b ||f||_1` with unit-norm decoder columns."""

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type = AutoEncoder,
        lr: float = 1e-3,
        l1_penalty: float = 1e-1,
        warmup_steps: int = 1000,
        sparsity_warmup_steps: int | None = 2000,
        decay_start: int | None = None,
        resample_steps: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str = "StandardTrainer",
        submodule_name: str | None = None,
        sparse: bool = True,
    ):
        self.sparse = sparse
        self._setup(seed, device, dict_class, activation_dim, dict_size)
        self.l1_penalty = l1_penalty
        self._init_penalised(steps, lr, warmup_steps, sparsity_warmup_steps, decay_start, resample_steps)

    def _compute(self, x, step):
        f, x_hat = self.ae.encode_decode(x, self.max_density)
        mse, l2 = reconstruction_terms(x, x_hat)
        l1 = row_sums(f).mean()  # = mean L1 norm: ReLU features are non-negative (and sum's backward is free)
        loss = mse + self.l1_penalty * self.sparsity_scale(step) * l1
        return StepOutput(loss, x_hat, f, {"l2_loss": l2, "mse_loss": mse, "sparsity_loss": l1, "loss": loss})


@register_trainer
class StandardTrainerAprilUpdate(PenalisedTrainer):
    """Anthropic's April-2024 update: plain Adam (decoder norm free), L1 weighted by decoder norms,
    gradient clipping at 1. The penalty uses `encode`'s features, so decoder norms count once even
    with `AutoEncoderNew`, whose `forward` already rescales (the reference's issue #39).
    """

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type = AutoEncoder,
        lr: float = 1e-3,
        l1_penalty: float = 1e-1,
        warmup_steps: int = 1000,
        sparsity_warmup_steps: int | None = 2000,
        decay_start: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str = "StandardTrainerAprilUpdate",
        submodule_name: str | None = None,
        sparse: bool = True,
    ):
        self.sparse = sparse
        self._setup(seed, device, dict_class, activation_dim, dict_size)
        self.l1_penalty = l1_penalty
        self._init_penalised(
            steps, lr, warmup_steps, sparsity_warmup_steps, decay_start, None, constrained=False, max_grad_norm=1.0
        )

    def _compute(self, x, step):
        f, x_hat = self.ae.encode_decode(x, self.max_density)
        mse, l2 = reconstruction_terms(x, x_hat)
        l1 = row_sums(f, self.ae.decoder_FD().norm(dim=-1)).mean()
        loss = mse + self.l1_penalty * self.sparsity_scale(step) * l1
        return StepOutput(loss, x_hat, f, {"l2_loss": l2, "mse_loss": mse, "sparsity_loss": l1, "loss": loss})
