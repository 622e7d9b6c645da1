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
from ..ops import JumpReLUFunction, RectangleFunction, StepFunction, fired_features, tanh_row_sums  # noqa: F401
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

SPARSITY_LOSSES = ("target_l0", "l0", "tanh", "quadratic")


@dataclass(frozen=True, kw_only=True)
class JumpReluConfig(PenalisedConfig, TranscoderConfig):
    positional = (
        "steps activation_dim dict_size layer lm_name dict_class seed lr bandwidth sparsity_penalty warmup_steps "
        "sparsity_warmup_steps decay_start target_l0 device wandb_name submodule_name sparsity_loss sparse "
        "transcoder output_dim skip_connection tanh_scale pre_act_loss"
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
    """'target_l0': (L0 / target_l0 - 1)^2 (the reference's); 'l0': L0 (the paper's); 'tanh': sum_i
    tanh(tanh_scale * f_i * ||W_dec_i||) (Anthropic, January 2025); 'quadratic': 2 / target_l0 *
    (L0_row - target_l0)^2 per row (Gemma Scope 2)"""
    tanh_scale: float = 4.0
    """the scale c inside the 'tanh' sparsity loss"""
    pre_act_loss: float = 0.0
    """weight of Anthropic's pre-activation loss: sum_i ReLU(threshold_i - pre_i) * ||W_dec_i|| over dead
    latents, which pulls them back towards firing (0: off; Anthropic used 3e-6)"""

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
        """`mean_b ||x - x_hat||^2 + s(t) * sparsity_penalty * S (+ pre_act_loss * P)`, s(t) the
        sparsity warm-up, S by `sparsity_loss`: `(L0 / target_l0 - 1)^2` (the reference's, the
        default), `L0` (the paper's), `mean_b sum_i tanh(c f_i ||W_dec_i||)` (Anthropic's) or
        `mean_b 2 / target_l0 (L0_b - target_l0)^2` (Gemma Scope 2's); L0 counted with the step
        function's straight-through estimator; P is Anthropic's pre-activation loss of dead latents.
        A transcoder encodes the input half and x is its output half."""
        x_in, y = self.input_and_target(x)
        x, f, l0_B, x_hat = self.ae.training_forward(x_in, self.bandwidth, self.max_density)
        y = y.reshape(-1, y.shape[-1]).to(x_hat.dtype)
        recon = (y - x_hat).pow(2).sum(-1).mean()
        l0 = l0_B.mean()
        penalty = self.sparsity_coefficient * self._sparsity(f, l0_B)
        scale = 1.0 if step is None else self.sparsity_warmup_fn(step)
        loss = recon + penalty * scale
        counter_F, _ = tokens_since_fired(self.num_tokens_since_fired, fired_features(f), x.shape[0])
        if self.pre_act_loss:
            loss = loss + self.pre_act_loss * self._pre_activation_loss(x, counter_F > DEAD_FEATURE_TOKENS)
        logs = {
            "l2_loss": recon,
            "mse_loss": recon,
            "sparsity_loss": penalty,
            "l0_estimate": l0,
            "loss": loss,
            "dead_features": (counter_F > DEAD_FEATURE_TOKENS).sum(),
        }
        return StepOutput(loss, x_hat, f, logs, {"counter_F": counter_F}, target=y)

    def _sparsity(self, f, l0_B: torch.Tensor) -> torch.Tensor:
        if self.sparsity_loss == "target_l0":
            return (l0_B.mean() / self.target_l0 - 1).pow(2)
        if self.sparsity_loss == "quadratic":
            return (2 / self.target_l0 * (l0_B - self.target_l0).pow(2)).mean()
        if self.sparsity_loss == "tanh":
            return tanh_row_sums(f, self.ae.decoder_FD().norm(dim=-1), self.tanh_scale).mean()
        return l0_B.mean()

    def _pre_activation_loss(self, x: torch.Tensor, dead_F: torch.Tensor) -> torch.Tensor:
        """Anthropic's pre-activation loss, on the dead latents only (their pre-activations computed
        for them alone); zero when none is dead."""
        dead = dead_F.nonzero().squeeze(1)
        if dead.numel() == 0:  # a host read, only with pre_act_loss on
            return x.new_zeros(())
        ae = self.ae
        pre_BK = ae.encoder_input(x) @ ae.W_enc[:, dead] + ae.b_enc[dead]
        gap_BK = (ae.threshold[dead] - pre_BK).relu()
        return (gap_BK * ae.W_dec[dead].norm(dim=-1)).sum(-1).mean()

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
