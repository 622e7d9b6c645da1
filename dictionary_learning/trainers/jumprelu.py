"""JumpReLU SAE training (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction
Fidelity with JumpReLU Sparse Autoencoders").

The L0 penalty's gradient reaches the thresholds through straight-through estimators applied to
the pre-activations (eq. 12), not to the already-jumped features as the reference does (its
issue #55): pre-activations just below a threshold then pull it down, as the paper intends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dictionaries import (
    Dictionary,  # noqa: F401 (the reference re-exports these names here)
    JumpReluAutoEncoder,
)
from ..ops import JumpReLUFunction, RectangleFunction, StepFunction, fired_features  # noqa: F401 (reference)
from .top_k import DEAD_FEATURE_TOKENS
from .trainer import (  # noqa: F401
    PenalisedConfig,
    RecipeTrainer,
    SAETrainer,
    StepOutput,
    TranscoderConfig,
    adam,
    get_lr_schedule,
    get_sparsity_warmup_fn,
    register_trainer,
    remove_gradient_parallel_to_decoder_directions,
    set_decoder_norm_to_unit_norm,
    tokens_since_fired,
)

SPARSITY_LOSSES = ("target_l0", "l0")


@dataclass(frozen=True, kw_only=True)
class JumpReluConfig(PenalisedConfig, TranscoderConfig):
    positional = (
        "steps activation_dim dict_size layer lm_name dict_class seed lr bandwidth sparsity_penalty warmup_steps "
        "sparsity_warmup_steps decay_start target_l0 device wandb_name submodule_name sparsity_loss sparse "
        "transcoder output_dim skip_connection"
    )
    dict_class: type | str = JumpReluAutoEncoder
    lr: float = 7e-5
    bandwidth: float = 0.001
    """width of the rectangle kernel of the straight-through estimators"""
    sparsity_penalty: float = 1.0
    """weight of the sparsity penalty"""
    target_l0: float = 20.0
    """L0 that the 'target_l0' penalty pulls towards"""
    wandb_name: str = "JumpRelu"
    sparsity_loss: str = "target_l0"
    """'target_l0': (L0 / target_l0 - 1)^2 (the reference's); 'l0': L0 (the paper's)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity_loss not in SPARSITY_LOSSES:
            raise ValueError(f"sparsity_loss must be one of {SPARSITY_LOSSES}, got {self.sparsity_loss!r}")
        if self.target_l0 <= 0:
            raise ValueError(f"target_l0 must be > 0, got {self.target_l0}")


@register_trainer
class JumpReluTrainer(RecipeTrainer):
    """JumpReLU recipe: Adam(beta1=0), unit-norm decoder rows with projected gradients, clipping at 1,
    sparsity warm-up."""

    Config = JumpReluConfig
    state_attrs = ("num_tokens_since_fired",)
    logging_parameters = ["dead_features"]

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`mean_b ||x - x_hat||^2 + s(t) * penalty`, penalty = `sparsity_penalty * (L0 / target_l0 - 1)^2`
        (the reference's target-L0 form, the default) or `sparsity_penalty * L0` (the paper's, with
        `sparsity_loss="l0"`); L0 = mean_b ||f||_0 with the step function's straight-through estimator.
        A transcoder encodes the input half and x is its output half."""
        x_in, y = self.input_and_target(x)
        x, f, l0, x_hat = self.ae.training_forward(x_in, self.bandwidth, self.max_density)
        y = y.reshape(-1, y.shape[-1]).to(x_hat.dtype)
        recon = (y - x_hat).pow(2).sum(-1).mean()
        if self.sparsity_loss == "target_l0":
            penalty = self.sparsity_coefficient * (l0 / self.target_l0 - 1).pow(2)
        else:
            penalty = self.sparsity_coefficient * l0
        scale = 1.0 if step is None else self.sparsity_warmup_fn(step)
        loss = recon + penalty * scale
        counter_F, _ = tokens_since_fired(self.num_tokens_since_fired, fired_features(f), x.shape[0])
        logs = {
            "l2_loss": recon,
            "mse_loss": recon,
            "sparsity_loss": penalty,
            "l0_estimate": l0,
            "loss": loss,
            "dead_features": (counter_F > DEAD_FEATURE_TOKENS).sum(),
        }
        return StepOutput(loss, x_hat, f, logs, {"counter_F": counter_F}, target=y)

    def setup(self, cfg: JumpReluConfig) -> None:
        self.sparsity_coefficient = cfg.sparsity_penalty
        self.optimizer = adam(
            self.ae.parameters(), self._decoder_constraint(), 1.0, lr=cfg.lr, betas=(0.0, 0.999), eps=1e-8
        )
        self._set_schedule(
            get_lr_schedule(cfg.steps, cfg.warmup_steps, cfg.decay_start, None, cfg.sparsity_warmup_steps)
        )
        self.sparsity_warmup_fn = get_sparsity_warmup_fn(cfg.steps, cfg.sparsity_warmup_steps)
        self.num_tokens_since_fired = torch.zeros(cfg.dict_size, dtype=torch.long, device=self.device)

    @property
    def dead_features(self) -> int:
        """Latents that have not fired for DEAD_FEATURE_TOKENS tokens (reads the device: logging only)."""
        return int((self.num_tokens_since_fired > DEAD_FEATURE_TOKENS).sum())

    def _commit(self, out, step):
        self.num_tokens_since_fired = out.commit["counter_F"]

    def update(self, step: int, x: torch.Tensor, extra_loss=None) -> torch.Tensor:
        """`SAETrainer.update`; the reference names the batch `x` in this recipe."""
        return super().update(step, x, extra_loss)
