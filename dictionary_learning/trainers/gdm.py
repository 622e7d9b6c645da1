"""Gated SAE training (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs")."""

from __future__ import annotations

import torch

from ..config import DEBUG  # noqa: F401 (the reference re-exports these names here)
from ..dictionaries import GatedAutoEncoder
from ..ops import row_sums
from .standard import reconstruction_terms
from .trainer import (  # noqa: F401
    ConstrainedAdam,
    PenalisedTrainer,
    SAETrainer,
    StepOutput,
    get_lr_schedule,
    get_sparsity_warmup_fn,
    register_trainer,
)


class GatedLossMixin:
    """The gated loss pieces shared by GatedSAETrainer and GatedAnnealTrainer."""

    def _gated_forward(self, x_BD: torch.Tensor):
        """Returns (f, gate, x_hat, mse, l2, aux) with aux = ||x - x_hat_gate||^2 (eq. 8 of the paper):
        the gate path reconstructs through a frozen copy of the decoder so it learns to be useful."""
        f_BF, gate_BF, x_hat_BD, x_hat_gate_BD = self.ae.training_forward(x_BD, self.max_density)
        mse, l2 = reconstruction_terms(x_BD, x_hat_BD)
        aux = (x_BD - x_hat_gate_BD).pow(2).sum(-1).mean()
        return f_BF, gate_BF, x_hat_BD, mse, l2, aux


@register_trainer
class GatedSAETrainer(GatedLossMixin, PenalisedTrainer):
    """`loss = ||x - x_hat||^2 + l1_penalty * s(t) * ||ReLU(pi_gate)||_1 + ||x - x_hat_gate||^2`.

    Adam with beta1 = 0 and unit-norm decoder columns, as in the reference. `resample_steps`
    (absent from the reference's Gated trainer) resamples dead features as for Standard.
    """

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type = GatedAutoEncoder,
        lr: float = 5e-5,
        l1_penalty: float = 1e-1,
        warmup_steps: int = 1000,
        sparsity_warmup_steps: int | None = 2000,
        decay_start: int | None = None,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str = "GatedSAETrainer",
        submodule_name: str | None = None,
        resample_steps: int | None = None,
        sparse: bool = True,
    ):
        self.sparse = sparse
        self._setup(seed, device, dict_class, activation_dim, dict_size)
        self.l1_penalty = l1_penalty
        self._init_penalised(
            steps, lr, warmup_steps, sparsity_warmup_steps, decay_start, resample_steps, betas=(0.0, 0.999)
        )

    def _compute(self, x, step):
        f, gate, x_hat, mse, l2, aux = self._gated_forward(x)
        sparsity = row_sums(gate).mean()  # the L1 norm: ReLU(pi_gate) is non-negative
        loss = mse + self.l1_penalty * self.sparsity_scale(step) * sparsity + aux
        return StepOutput(
            loss, x_hat, f, {"l2_loss": l2, "mse_loss": mse, "sparsity_loss": sparsity, "aux_loss": aux, "loss": loss}
        )

    def update(self, step: int, x: torch.Tensor, extra_loss=None) -> torch.Tensor:
        """`SAETrainer.update`; the reference names the batch `x` in this recipe."""
        return super().update(step, x, extra_loss)
