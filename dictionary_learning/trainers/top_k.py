"""TopK SAE training (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

The loss is plain reconstruction plus the AuxK term for dead latents; sparsity comes from the
architecture. After `threshold_start_step`, an EMA of the smallest kept activation gives a global
threshold for JumpReLU-style inference.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .. import distributed
from ..config import DEBUG  # noqa: F401 (the reference re-exports these names here)
from ..dictionaries import (
    AutoEncoderTopK,
    Dictionary,  # noqa: F401
)
from ..dictionaries.topk import TrainingCode, decode_selected_dense, row_topk  # noqa: F401 (row_topk: the reference's path)
from ..ops import auxk_loss, geometric_median
from .optim import ConstrainedSignum
from .trainer import (  # noqa: F401
    RecipeTrainer,
    SAETrainer,
    StepOutput,
    TrainerConfig,
    TranscoderConfig,
    adam,
    default_topk_lr,
    get_lr_schedule,
    register_trainer,
    remove_gradient_parallel_to_decoder_directions,
    set_decoder_norm_to_unit_norm,
    tokens_since_fired,
)

# Reference re-exports: `from dictionary_learning.trainers.top_k import AutoEncoderTopK, geometric_median`.
__all__ = ["AutoEncoderTopK", "TopKTrainer", "geometric_median"]


OPTIMIZERS = ("adam", "signum")

# A latent is dead after this many tokens without firing (Gao et al. 2024, appendix A.2).
DEAD_FEATURE_TOKENS = 10_000_000


@dataclass(frozen=True, kw_only=True)
class TopKConfig(TranscoderConfig):
    positional = (
        "steps activation_dim dict_size k layer lm_name dict_class lr auxk_alpha warmup_steps decay_start "
        "threshold_beta threshold_start_step k_anneal_steps seed device wandb_name submodule_name sparse "
        "transcoder output_dim skip_connection optimizer_name encoder_init_norm"
    )
    k: int
    """latents kept per row"""
    dict_class: type | str = AutoEncoderTopK
    lr: float | None = None
    """Adam learning rate (None: 2e-4 / sqrt(dict_size / 2^14), Gao et al.'s rule)"""
    auxk_alpha: float = 1 / 32
    """weight of the AuxK loss that revives dead latents"""
    threshold_beta: float = 0.999
    """EMA decay of the inference threshold"""
    threshold_start_step: int = 1000
    """step from which the inference threshold is tracked"""
    k_anneal_steps: int | None = None
    """steps over which k falls linearly from activation_dim to k (None: fixed k)"""
    wandb_name: str = "AutoEncoderTopK"
    optimizer_name: str = "adam"
    """'adam' (the reference's) or 'signum' (sign descent with momentum, as sparsify trains by default;
    its default lr is sparsify's 5e-3 / sqrt(dict_size / 2^14))"""
    encoder_init_norm: float | None = None
    """norm of each encoder row at initialisation (None: the reference's, the unit-norm decoder's
    transpose; 0.1: SAELens's TopK-family init, +0.06 MCC on the synthetic ground truth)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        norm = self.encoder_init_norm
        if norm is not None and not (math.isfinite(norm) and norm > 0):
            raise ValueError(f"encoder_init_norm must be a positive number or None, got {self.encoder_init_norm}")
        if self.optimizer_name not in OPTIMIZERS:
            raise ValueError(f"optimizer_name must be one of {OPTIMIZERS}, got {self.optimizer_name!r}")
        if self.k_anneal_steps is not None and not 0 < self.k_anneal_steps < self.steps:
            raise ValueError(f"k_anneal_steps={self.k_anneal_steps} must be > 0 and < steps={self.steps}")


@torch.no_grad()
def scale_encoder_rows(ae, norm: float) -> None:
    """Rescale each latent's encoder row (`ae.encoder_weight_bias()`, a view of the parameter) to `norm`."""
    W_FD = ae.encoder_weight_bias()[0]
    W_FD.mul_(norm / W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))
    if not torch.allclose(ae.encoder_weight_bias()[0].norm(dim=1), torch.full_like(W_FD[:, 0], norm), rtol=1e-3):
        raise RuntimeError(f"{type(ae).__name__}.encoder_weight_bias() is not a view of its encoder: cannot rescale it")


class KLatentCounters:
    """The logging parameters of a recipe whose dictionary keeps k latents (`ae.active_k`) and that
    counts each latent's tokens since it fired (`num_tokens_since_fired`)."""

    @property
    def effective_l0(self) -> int:
        return self.ae.active_k

    @property
    def dead_features(self) -> int:
        """Latents that have not fired for DEAD_FEATURE_TOKENS tokens (reads the device: logging only)."""
        return int((self.num_tokens_since_fired >= DEAD_FEATURE_TOKENS).sum())


@register_trainer
class TopKTrainer(KLatentCounters, RecipeTrainer):
    """TopK recipe: Adam, decoder kept unit-norm with projected gradients, clipping at 1,
    geometric-median `b_dec` init, AuxK (coefficient `auxk_alpha`, 1/32 as in appendix B.1),
    optional k-annealing from `activation_dim` down to `k` over `k_anneal_steps`.

    With `sparse=True` (the default) the step decodes from the selected latents only and its
    backward touches only their encoder rows and decoder rows (`encode_sparse`): the same values and
    gradients as the dense computation (`sparse=False`, the reference's), with one dense `[B, F]`
    matmul per step (the encoder's forward) instead of five (forward and backward of both).
    """

    Config = TopKConfig
    state_attrs = ("num_tokens_since_fired", "tokens_seen")
    logging_parameters = ["effective_l0", "dead_features"]

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`mean_b ||y - x_hat||^2 + auxk_alpha * AuxK` (AuxK: Gao et al. 2024, appendix A.2), where
        y = x for an SAE; a transcoder encodes the input half and y is the output half, and a skip
        transcoder adds `x_in @ W_skip` to x_hat."""
        x_in, y = self.input_and_target(x)
        x_BD, y_BD = x_in.reshape(-1, x_in.shape[-1]), y.reshape(-1, y.shape[-1])
        code = self.ae.training_code(x_BD, self.sparse)
        x_hat_BD = code.decode() + self.ae.skip(x_BD)
        l2 = (y_BD - x_hat_BD).pow(2).sum(-1).mean()
        return self.with_auxk(y, code, x_hat_BD, l2, {"l2_loss": l2, "mse_loss": l2})

    def dictionary_args(self, cfg: TopKConfig) -> tuple:
        return cfg.activation_dim, cfg.dict_size, cfg.k

    def setup(self, cfg: TopKConfig) -> None:
        signum = cfg.optimizer_name == "signum"
        default_lr = 5e-3 / math.sqrt(self.ae.dict_size / 2**14) if signum else default_topk_lr(self.ae.dict_size)
        self.lr = default_lr if cfg.lr is None else cfg.lr
        self.top_k_aux = self.ae.activation_dim // 2  # Gao et al. appendix B.1 use k_aux = d_model / 2
        self.k_anneal_start = max(self.ae.activation_dim, cfg.k) if cfg.k_anneal_steps else cfg.k
        self.k_anneal_start = min(self.k_anneal_start, self.ae.dict_size)
        if cfg.encoder_init_norm is not None:
            scale_encoder_rows(self.ae, cfg.encoder_init_norm)
        if signum:
            self.optimizer = ConstrainedSignum(self.ae.parameters(), self._decoder_constraint(), lr=self.lr)
        else:
            self.optimizer = adam(self.ae.parameters(), self._decoder_constraint(), 1.0, lr=self.lr, betas=(0.9, 0.999))
        self._set_schedule(get_lr_schedule(cfg.steps, cfg.warmup_steps, cfg.decay_start))
        self.num_tokens_since_fired = torch.zeros(self.ae.dict_size, dtype=torch.long, device=self.device)
        self.tokens_seen = 0
        if cfg.k_anneal_steps:
            self.ae.set_k(self.annealed_k(0))

    def _resolved_config(self):
        return {"lr": self.lr, "top_k_aux": self.top_k_aux}

    # ------------------------------------------------------------------------------------- hooks
    def annealed_k(self, step: int) -> int:
        """k used at `step`: linear from `k_anneal_start` (activation_dim) to k over k_anneal_steps."""
        if not self.k_anneal_steps:
            return self.k
        r = min(step, self.k_anneal_steps) / self.k_anneal_steps
        return int(self.k_anneal_start * (1 - r) + self.k * r)

    def _prepare(self, step, x):
        if step == 0 and self.steps_done == 0:
            _, y = self.input_and_target(x)  # b_dec starts at the geometric median of what is reconstructed
            rows = distributed.gather_rows(y.reshape(-1, y.shape[-1]))  # every replica's rows
            self.ae.b_dec.data.copy_(geometric_median(rows).to(self.ae.b_dec.dtype))
        if self.k_anneal_steps:
            self.ae.set_k(self.annealed_k(step))

    def with_auxk(self, x, code: TrainingCode, x_hat_BD, recon, logs) -> StepOutput:
        """The step's output: `recon + auxk_alpha * AuxK` of the residual `x - x_hat` (x: what is
        reconstructed, a transcoder's output), the dead-latent counters and the threshold's input."""
        counter_F, n_rows = tokens_since_fired(self.num_tokens_since_fired, code.fired_F, code.x_BD.shape[0])
        dead_F = counter_F >= DEAD_FEATURE_TOKENS
        # Until DEAD_FEATURE_TOKENS tokens have been seen no latent can be dead: skip AuxK (no sync needed).
        if self.auxk_alpha > 0 and self.tokens_seen + n_rows >= DEAD_FEATURE_TOKENS:
            residual = (x.reshape(-1, x.shape[-1]) - x_hat_BD).detach()
            auxk, raw = auxk_loss(residual, code.aux_ranking(), dead_F, self.top_k_aux, code.decode_dead)
        else:
            auxk = raw = torch.zeros((), device=x.device)
        loss = recon + self.auxk_alpha * auxk
        logs |= {
            "auxk_loss": auxk,
            "loss": loss,
            "effective_l0": self.ae.active_k,
            "dead_features": dead_F.sum(),
            "pre_norm_auxk_loss": raw,
        }
        commit = {"counter_F": counter_F, "kept": code.kept, "tokens": n_rows}
        return StepOutput(loss, x_hat_BD.view_as(x), code.f, logs, commit, target=x)

    def _commit(self, out, step):
        self.num_tokens_since_fired = out.commit["counter_F"]
        self.tokens_seen += out.commit["tokens"]
        if step > self.threshold_start_step:
            self._update_threshold(out.commit["kept"].detach())

    @torch.no_grad()
    def _update_threshold(self, kept):
        """EMA of the per-row smallest kept activation; rows with no positive activation are skipped
        (the reference lets them turn the threshold into +inf)."""
        positive = kept > 0
        row_min = torch.where(positive, kept, torch.inf).min(-1).values.float()
        valid = positive.any(-1)
        total, count = distributed.sum_(torch.stack([torch.where(valid, row_min, 0.0).sum(), valid.sum().float()]))
        m = total / count.clamp_min(1)
        self._ema_threshold(m, count > 0)

    def _ema_threshold(self, m, has_value):
        thr = self.ae.threshold
        new = torch.where(thr < 0, m, self.threshold_beta * thr + (1 - self.threshold_beta) * m)
        thr.copy_(torch.where(has_value, new, thr))

    def update(self, step: int, x: torch.Tensor, extra_loss=None) -> torch.Tensor:
        """`SAETrainer.update`; the reference names the batch `x` in this recipe."""
        return super().update(step, x, extra_loss)

    # ------------------------------------------------------------ the reference's method names
    geometric_median = staticmethod(geometric_median)

    def update_threshold(self, top_acts_BK: torch.Tensor) -> None:
        """EMA update of the inference threshold from the kept activations (see `_update_threshold`)."""
        self._update_threshold(top_acts_BK.detach())

    def update_annealed_k(self, step: int, activation_dim: int, k_anneal_steps: int | None = None) -> None:
        """Set the dictionary's k for `step` (k-annealing; `activation_dim` and `k_anneal_steps` are
        this trainer's own, taken from its config)."""
        self.ae.set_k(self.annealed_k(step))

    def get_auxiliary_loss(self, residual_BD: torch.Tensor, post_relu_acts_BF: torch.Tensor) -> torch.Tensor:
        """AuxK loss (Gao et al. 2024, appendix A.2) of the currently dead latents on this batch."""
        dead_F = self.num_tokens_since_fired >= DEAD_FEATURE_TOKENS
        decode_dead = functools.partial(decode_selected_dense, self.ae, post_relu_acts_BF)
        return auxk_loss(residual_BD.detach(), post_relu_acts_BF, dead_F, self.top_k_aux, decode_dead)[0]
