"""Standard SAE with L_p annealing: the sparsity exponent p moves from p_start towards p_end.

Each time p changes, the penalty coefficient is rescaled by mean(L_p) / mean(L_p_next) over the
last `sparsity_queue_length` batches, so the penalty's magnitude stays continuous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DEBUG  # noqa: F401 (the reference re-exports these names here)
from ..dictionaries import AutoEncoder
from ..ops import lp_norm
from .standard import reconstruction_terms
from .trainer import (  # noqa: F401
    ConstrainedAdam,
    PenalisedConfig,
    PenalisedTrainer,
    SAETrainer,
    StepOutput,
    get_lr_schedule,
    get_sparsity_warmup_fn,
    register_trainer,
)


@dataclass(frozen=True, kw_only=True)
class PAnnealConfig(PenalisedConfig):
    positional = (
        "steps activation_dim dict_size layer lm_name dict_class lr warmup_steps decay_start sparsity_warmup_steps "
        "sparsity_function initial_sparsity_penalty anneal_start anneal_end p_start p_end n_sparsity_updates "
        "sparsity_queue_length resample_steps device seed wandb_name submodule_name sparse"
    )
    dict_class: type | str = AutoEncoder
    lr: float = 1e-3
    sparsity_function: str = "Lp"
    """penalty of the code: 'Lp' (sum |f|^p)^(1/p) or 'Lp^p' (sum |f|^p)"""
    initial_sparsity_penalty: float = 1e-1
    """weight of the penalty before any rescaling"""
    anneal_start: int = 15000
    """step of the first change of p"""
    anneal_end: int | None = None
    """step of the last change of p (None: the last step)"""
    p_start: float = 1
    """exponent p before annealing"""
    p_end: float = 0
    """exponent p that annealing moves towards"""
    n_sparsity_updates: int | str = 10
    """number of changes of p, or 'continuous' (every step)"""
    sparsity_queue_length: int = 10
    """batches over which the penalty's rescaling averages L_p"""
    resample_steps: int | None = None
    """resample latents that did not fire for half of each such period (None: never)"""
    seed: int | None = 42
    wandb_name: str = "PAnnealTrainer"

    def __post_init__(self) -> None:
        super().__post_init__()
        lp_norm(torch.zeros(1, 1), 1.0, self.sparsity_function)  # raises for an unknown name
        n = self.n_sparsity_updates
        if n != "continuous" and not (isinstance(n, int) and n >= 1):
            raise ValueError(f"n_sparsity_updates must be a positive int or 'continuous', got {n!r}")


@register_trainer
class PAnnealTrainer(PenalisedTrainer):
    """L1 recipe with p annealed: ConstrainedAdam, resampling. The penalty is rescaled at each change
    of p so that its magnitude stays continuous."""

    Config = PAnnealConfig
    state_attrs = PenalisedTrainer.state_attrs + ("p", "next_p", "p_step_count", "sparsity_coeff", "sparsity_queue")
    logging_parameters = ["p", "next_p", "sparsity_coeff"]

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`||x - x_hat||^2 + coeff * s(t) * L_p(f)` (means over rows), p and coeff annealed."""
        x, _ = self.input_and_target(x)
        f, x_hat = self.ae.encode_decode(x, self.max_density)
        mse, l2 = reconstruction_terms(x, x_hat)
        scaled, logs, commit = self.annealed_penalty(f, step)
        loss = mse + scaled
        return StepOutput(loss, x_hat, f, {"l2_loss": l2, "mse_loss": mse, **logs, "loss": loss}, commit, target=x)

    def setup(self, cfg: PAnnealConfig) -> None:
        super().setup(cfg)
        self.anneal_end = cfg.steps if cfg.anneal_end is None else cfg.anneal_end
        n = cfg.n_sparsity_updates
        n = self.anneal_end - cfg.anneal_start + 1 if n == "continuous" else n
        self.sparsity_update_steps = torch.linspace(cfg.anneal_start, self.anneal_end, n).int().tolist()
        self.p_values = torch.linspace(cfg.p_start, cfg.p_end, n).tolist()
        self.p = float(cfg.p_start)
        self.next_p: float | None = None
        self.p_step_count = 0
        self.sparsity_coeff = float(cfg.initial_sparsity_penalty)
        self.sparsity_queue: list[torch.Tensor] = []

    def lp_norm(self, f: torch.Tensor, p: float) -> torch.Tensor:
        """The penalty `sparsity_function` of the code `f` at exponent `p` (the reference's method)."""
        return lp_norm(f, p, self.sparsity_function)

    def annealed_penalty(self, acts_BF: torch.Tensor, step: int | None):
        """(scaled penalty, log entries, commit entries) of the code `acts_BF` at the current p."""
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
        if "lp_pair" in out.commit:
            self.sparsity_queue = [*self.sparsity_queue, out.commit["lp_pair"]][-self.sparsity_queue_length :]
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
