"""Gated SAE training (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DEBUG  # noqa: F401 (the reference re-exports these names here)
from ..dictionaries import GatedAutoEncoder
from ..ops import row_sums
from .standard import ResampledL1Config, reconstruction_terms
from .trainer import (  # noqa: F401
    ConstrainedAdam,
    PenalisedTrainer,
    SAETrainer,
    StepOutput,
    get_lr_schedule,
    get_sparsity_warmup_fn,
    register_trainer,
)


@dataclass(frozen=True, kw_only=True)
class GatedSAEConfig(ResampledL1Config):
    # resample_steps is ours (the reference's Gated trainer cannot resample): last, before sparse.
    positional = (
        "steps activation_dim dict_size layer lm_name dict_class lr l1_penalty warmup_steps "
        "sparsity_warmup_steps decay_start seed device wandb_name submodule_name resample_steps sparse"
    )
    dict_class: type | str = GatedAutoEncoder
    lr: float = 5e-5
    wandb_name: str = "GatedSAETrainer"


def gated_terms(ae: GatedAutoEncoder, x_BD: torch.Tensor, max_density: float):
    """The pieces of the gated losses: (f, gate, x_hat, mse, l2, aux) with aux = ||x - x_hat_gate||^2
    (eq. 8 of the paper): the gate path reconstructs through a frozen copy of the decoder so that it
    learns to be useful. `gate` = ReLU(pi_gate), the input of the sparsity penalty."""
    f_BF, gate_BF, x_hat_BD, x_hat_gate_BD = ae.training_forward(x_BD, max_density)
    mse, l2 = reconstruction_terms(x_BD, x_hat_BD)
    aux = (x_BD - x_hat_gate_BD).pow(2).sum(-1).mean()
    return f_BF, gate_BF, x_hat_BD, mse, l2, aux


@register_trainer
class GatedSAETrainer(PenalisedTrainer):
    """Gated recipe: Adam with beta1 = 0 and unit-norm decoder columns, as in the reference.
    `resample_steps` (absent from the reference's Gated trainer) resamples dead features as for Standard.
    """

    Config = GatedSAEConfig
    betas = (0.0, 0.999)

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`||x - x_hat||^2 + l1_penalty * s(t) * ||ReLU(pi_gate)||_1 + ||x - x_hat_gate||^2` (means over rows)."""
        x, _ = self.input_and_target(x)
        f, gate, x_hat, mse, l2, aux = gated_terms(self.ae, x, self.max_density)
        sparsity = row_sums(gate).mean()  # the L1 norm: ReLU(pi_gate) is non-negative
        loss = mse + self.l1_penalty * self.sparsity_scale(step) * sparsity + aux
        logs = {"l2_loss": l2, "mse_loss": mse, "sparsity_loss": sparsity, "aux_loss": aux, "loss": loss}
        return StepOutput(loss, x_hat, f, logs, target=x)

    def update(self, step: int, x: torch.Tensor, extra_loss=None) -> torch.Tensor:
        """`SAETrainer.update`; the reference names the batch `x` in this recipe."""
        return super().update(step, x, extra_loss)
