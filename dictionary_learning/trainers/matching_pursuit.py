"""Matching-pursuit SAE training (MP-SAE, Costa et al. 2025).

The code comes from k greedy pursuit steps over the decoder's atoms (`MatchingPursuitSAE`); the loss
is reconstruction alone. The decoder is kept at unit norm (the pursuit's correlations assume it),
`b_dec` starts at the geometric median, and Adam's learning rate defaults to TopK's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from ..dictionaries import MatchingPursuitSAE
from ..ops import geometric_median
from .top_k import DEAD_FEATURE_TOKENS, KLatentCounters
from .trainer import (
    RecipeTrainer,
    StepOutput,
    TrainerConfig,
    adam,
    default_topk_lr,
    get_lr_schedule,
    register_trainer,
    tokens_since_fired,
)

__all__ = ["MatchingPursuitSAE", "MatchingPursuitTrainer"]


@dataclass(frozen=True, kw_only=True)
class MatchingPursuitConfig(TrainerConfig):
    positional = (
        "steps activation_dim dict_size k layer lm_name dict_class lr warmup_steps decay_start seed device "
        "wandb_name submodule_name sparse"
    )
    k: int
    """pursuit steps per row (an atom may be picked twice: at most k latents active)"""
    dict_class: type | str = MatchingPursuitSAE
    lr: float | None = None
    """Adam learning rate (None: 2e-4 / sqrt(dict_size / 2^14), TopK's rule)"""
    wandb_name: str = "MatchingPursuitSAE"


@register_trainer
class MatchingPursuitTrainer(KLatentCounters, RecipeTrainer):
    """MP-SAE recipe: Adam on the reconstruction error of a k-step pursuit code, decoder rows kept
    at unit norm (projected gradients, clipping at 1). No auxiliary loss: an atom that has not fired
    is picked again as soon as it best matches some residual. `sparse` does not apply (the pursuit
    reads every atom at each step)."""

    Config = MatchingPursuitConfig
    state_attrs = ("num_tokens_since_fired",)
    logging_parameters = ["effective_l0", "dead_features"]

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`mean_b ||x - x_hat||^2` with `x_hat = MP_k(x - b_dec) @ W_dec + b_dec`."""
        x_BD, _ = self.input_and_target(x)
        f_BF = self.ae.encode(x_BD)
        x_hat_BD = self.ae.decode(f_BF)
        l2 = (x_BD - x_hat_BD).pow(2).sum(-1).mean()
        active_BF = f_BF != 0
        counter_F, _ = tokens_since_fired(self.num_tokens_since_fired, active_BF.any(0), x_BD.shape[0])
        logs = {
            "l2_loss": l2,
            "mse_loss": l2,
            "loss": l2,
            "l0": active_BF.sum(-1).float().mean(),
            "dead_features": (counter_F >= DEAD_FEATURE_TOKENS).sum(),
        }
        return StepOutput(l2, x_hat_BD, f_BF, logs, {"counter_F": counter_F}, target=x_BD)

    def dictionary_args(self, cfg: MatchingPursuitConfig) -> tuple:
        return cfg.activation_dim, cfg.dict_size, cfg.k

    def setup(self, cfg: MatchingPursuitConfig) -> None:
        self.lr = default_topk_lr(self.ae.dict_size) if cfg.lr is None else cfg.lr
        self.optimizer = adam(self.ae.parameters(), self._decoder_constraint(), 1.0, lr=self.lr, betas=(0.9, 0.999))
        self._set_schedule(get_lr_schedule(cfg.steps, cfg.warmup_steps, cfg.decay_start))
        self.num_tokens_since_fired = torch.zeros(self.ae.dict_size, dtype=torch.long, device=self.device)

    def _resolved_config(self):
        return {"lr": self.lr}

    def _prepare(self, step, x):
        if step == 0 and self.steps_done == 0:  # b_dec starts at the geometric median of the batch
            rows = distributed.gather_rows(self.input_and_target(x)[0])
            self.ae.b_dec.data.copy_(geometric_median(rows).to(self.ae.b_dec.dtype))

    def _commit(self, out, step):
        self.num_tokens_since_fired = out.commit["counter_F"]
