"""Standard SAE with L_p annealing: the sparsity exponent p moves from p_start towards p_end.

Each time p changes, the penalty coefficient is rescaled by mean(L_p) / mean(L_p_next) over the
last `sparsity_queue_length` batches, so the penalty's magnitude stays continuous.
"""

from __future__ import annotations

import torch

from ..config import DEBUG  # noqa: F401 (the reference re-exports these names here)
from ..dictionaries import AutoEncoder
from ..ops import lp_norm
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


class LpAnnealing:
    """State and rules of p-annealing, shared by PAnnealTrainer and GatedAnnealTrainer (placed
    before PenalisedTrainer in their bases, so its `_commit` runs after the dead-latent counters)."""

    state_attrs = PenalisedTrainer.state_attrs + ("p", "next_p", "p_step_count", "sparsity_coeff", "sparsity_queue")
    logging_parameters = ["p", "next_p", "sparsity_coeff"]

    def lp_norm(self, f: torch.Tensor, p: float) -> torch.Tensor:
        """The penalty `sparsity_function` of the code `f` at exponent `p` (the reference's method)."""
        return lp_norm(f, p, self.sparsity_function)

    def _init_annealing(
        self,
        steps,
        sparsity_function,
        initial_sparsity_penalty,
        anneal_start,
        anneal_end,
        p_start,
        p_end,
        n_sparsity_updates,
        sparsity_queue_length,
    ) -> None:
        lp_norm(torch.zeros(1, 1), 1.0, sparsity_function)  # validates the name before any work
        anneal_end = steps if anneal_end is None else anneal_end
        if n_sparsity_updates == "continuous":
            n_sparsity_updates = anneal_end - anneal_start + 1
        if not (isinstance(n_sparsity_updates, int) and n_sparsity_updates >= 1):
            raise ValueError(f"n_sparsity_updates must be a positive int or 'continuous', got {n_sparsity_updates!r}")
        self.sparsity_function = sparsity_function
        self.sparsity_queue_length = sparsity_queue_length
        self.anneal_end = anneal_end
        self.sparsity_update_steps = torch.linspace(anneal_start, anneal_end, n_sparsity_updates).int().tolist()
        self.p_values = torch.linspace(p_start, p_end, n_sparsity_updates).tolist()
        self.p_end = p_end
        self.p = float(p_start)
        self.next_p: float | None = None
        self.p_step_count = 0
        self.sparsity_coeff = float(initial_sparsity_penalty)
        self.sparsity_queue: list[torch.Tensor] = []

    def _annealed_penalty(self, acts_BF: torch.Tensor, step: int | None):
        """(scaled penalty, log entries, commit entries) for the current p."""
        lp = lp_norm(acts_BF, self.p, self.sparsity_function)
        scaled = lp * self.sparsity_coeff * self.sparsity_scale(step)
        commit = {}
        if self.next_p is not None:
            with torch.no_grad():
                commit["lp_pair"] = torch.stack(
                    [lp.detach(), lp_norm(acts_BF, self.next_p, self.sparsity_function)]
                ).float()
        logs = {
            "p": self.p,
            "next_p": self.next_p if self.next_p is not None else float("nan"),
            "lp_loss": lp,
            "scaled_lp_loss": scaled,
            "sparsity_coeff": self.sparsity_coeff,
        }
        return scaled, logs, commit

    def _commit(self, out, step: int) -> None:
        super()._commit(out, step)
        commit = out.commit
        if "lp_pair" in commit:
            self.sparsity_queue = [*self.sparsity_queue, commit["lp_pair"]][-self.sparsity_queue_length :]
        n = len(self.sparsity_update_steps)
        if (
            self.p_step_count < n
            and step >= self.sparsity_update_steps[self.p_step_count]
            and step in self.sparsity_update_steps
        ):
            if self.next_p is not None and self.sparsity_queue:
                means = torch.stack(self.sparsity_queue).mean(0)
                self.sparsity_coeff *= float(means[0] / means[1])
            self.p = self.p_values[self.p_step_count]
            self.next_p = self.p_values[self.p_step_count + 1] if self.p_step_count + 1 < n else self.p_end
            self.p_step_count += 1


@register_trainer
class PAnnealTrainer(LpAnnealing, PenalisedTrainer):
    """`loss = ||x - x_hat||^2 + coeff * s(t) * L_p(f)` with p annealed; ConstrainedAdam; resampling."""

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        dict_class: type = AutoEncoder,
        lr: float = 1e-3,
        warmup_steps: int = 1000,
        decay_start: int | None = None,
        sparsity_warmup_steps: int | None = 2000,
        sparsity_function: str = "Lp",
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
        wandb_name: str = "PAnnealTrainer",
        submodule_name: str | None = None,
        sparse: bool = True,
    ):
        self.sparse = sparse
        self._setup(seed, device, dict_class, activation_dim, dict_size)
        self._init_penalised(steps, lr, warmup_steps, sparsity_warmup_steps, decay_start, resample_steps)
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
        f, x_hat = self.ae.encode_decode(x, self.max_density)
        mse, l2 = reconstruction_terms(x, x_hat)
        scaled, logs, commit = self._annealed_penalty(f, step)
        loss = mse + scaled
        return StepOutput(loss, x_hat, f, {"l2_loss": l2, "mse_loss": mse, **logs, "loss": loss}, commit)
