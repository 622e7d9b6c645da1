"""Gated SAE with L_p annealing of the gate's sparsity penalty."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEBUG  # noqa: F401 (the reference re-exports these names here)
from ..dictionaries import GatedAutoEncoder
from .gdm import gated_terms
from .p_anneal import PAnnealConfig, PAnnealTrainer
from .trainer import (  # noqa: F401
    ConstrainedAdam,
    SAETrainer,
    StepOutput,
    get_lr_schedule,
    get_sparsity_warmup_fn,
    register_trainer,
)


@dataclass(frozen=True, kw_only=True)
class GatedAnnealConfig(PAnnealConfig):
    positional = (
        "steps activation_dim dict_size layer lm_name dict_class lr warmup_steps sparsity_warmup_steps decay_start "
        "sparsity_function initial_sparsity_penalty anneal_start anneal_end p_start p_end n_sparsity_updates "
        "sparsity_queue_length resample_steps device seed wandb_name submodule_name sparse"
    )
    dict_class: type | str = GatedAutoEncoder
    lr: float = 3e-4
    sparsity_function: str = "Lp^p"
    wandb_name: str = "GatedAnnealTrainer"


@register_trainer
class GatedAnnealTrainer(PAnnealTrainer):
    """The p-annealing recipe on a Gated SAE (Adam with beta1 = 0), its penalty on the gate.

    Resampling works here (the reference's copy of PAnneal's resampling cannot run on a Gated SAE).
    """

    Config = GatedAnnealConfig
    betas = (0.0, 0.999)

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`||x - x_hat||^2 + coeff * s(t) * L_p(ReLU(pi_gate)) + ||x - x_hat_gate||^2`, p annealed."""
        x, _ = self.input_and_target(x)
        f, gate, x_hat, mse, l2, aux = gated_terms(self.ae, x, self.max_density)
        scaled, logs, commit = self.annealed_penalty(gate, step)
        loss = mse + scaled + aux
        logs = {"l2_loss": l2, "mse_loss": mse, "aux_loss": aux, "sparsity_loss": scaled, **logs, "loss": loss}
        return StepOutput(loss, x_hat, f, logs, commit, target=x)
