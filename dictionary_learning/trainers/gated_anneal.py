"""Gated SAE with L_p annealing of the gate's sparsity penalty."""

from __future__ import annotations

from ..config import DEBUG  # noqa: F401 (the reference re-exports these names here)
from ..dictionaries import GatedAutoEncoder
from .gdm import GatedLossMixin
from .p_anneal import LpAnnealing
from .trainer import (  # noqa: F401
    ConstrainedAdam,
    PenalisedTrainer,
    SAETrainer,
    StepOutput,
    get_lr_schedule,
    get_sparsity_warmup_fn,
    register_trainer,
)


@register_trainer
class GatedAnnealTrainer(GatedLossMixin, LpAnnealing, PenalisedTrainer):
    """`loss = ||x - x_hat||^2 + coeff * s(t) * L_p(ReLU(pi_gate)) + ||x - x_hat_gate||^2`, p annealed.

    Resampling works here (the reference's copy of PAnneal's resampling cannot run on a Gated SAE).
    """

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type = GatedAutoEncoder,
        lr: float = 3e-4,
        warmup_steps: int = 1000,
        sparsity_warmup_steps: int | None = 2000,
        decay_start: int | None = None,
        sparsity_function: str = "Lp^p",
        initial_sparsity_penalty: float = 1e-1,
        anneal_start: int = 15000,
        anneal_end: int | None = None,
        p_start: float = 1,
        p_end: float = 0,
        n_sparsity_updates: int | str = 10,
        sparsity_queue_length: int = 10,
        resample_steps: int | None = None,
        device: str | None = None,
        seed: int | None = 42,
        wandb_name: str = "GatedAnnealTrainer",
        submodule_name: str | None = None,
        sparse: bool = True,
    ):
        self.sparse = sparse
        self._setup(seed, device, dict_class, activation_dim, dict_size)
        self._init_penalised(
            steps, lr, warmup_steps, sparsity_warmup_steps, decay_start, resample_steps, betas=(0.0, 0.999)
        )
        self._init_annealing(
            steps,
            sparsity_function,
            initial_sparsity_penalty,
            anneal_start,
            anneal_end,
            p_start,
            p_end,
            n_sparsity_updates,
            sparsity_queue_length,
        )

    def _compute(self, x, step):
        f, gate, x_hat, mse, l2, aux = self._gated_forward(x)
        scaled, logs, commit = self._annealed_penalty(gate, step)
        loss = mse + scaled + aux
        return StepOutput(
            loss,
            x_hat,
            f,
            {"l2_loss": l2, "mse_loss": mse, "aux_loss": aux, "sparsity_loss": scaled, **logs, "loss": loss},
            commit,
        )
