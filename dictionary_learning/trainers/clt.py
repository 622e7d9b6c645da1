"""Cross-layer transcoder training (Anthropic 2025, "Circuit Tracing"): one dictionary for every MLP.

Batches are `[B, L, 2, D]` (each layer's MLP input and output) or `(inputs, outputs)` pairs of
`[B, L, D]`. The reconstruction loss sums, over layers, each MLP output's squared error divided by
that output's variance (measured on the first batch and kept): MLP outputs of late layers are
larger, and without the division they alone would be fitted. Both recipes use Adam without a
decoder-norm constraint (a latent's decoder norms per layer say where it writes), clipping at 1,
and start `b_dec` at each layer's mean output.

`TopKCLTTrainer`: each source layer keeps its k largest latents per token; AuxK per source layer.
`BatchTopKCLTTrainer`: each source layer keeps its k * B largest latents of the batch (the same loss);
inference uses a threshold per layer, the EMA of the smallest kept activation.
`JumpReluCLTTrainer`: JumpReLU with Anthropic's tanh sparsity penalty weighted by each latent's
whole decoder norm, plus the pre-activation loss (January 2025 update).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from ..dictionaries.clt import (
    BatchTopKCrossLayerTranscoder,
    JumpReluCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
)
from .schedules import get_sparsity_warmup_fn
from .top_k import DEAD_FEATURE_TOKENS
from .trainer import (
    BatchLayoutError,
    RecipeTrainer,
    StepOutput,
    TrainerConfig,
    adam,
    default_topk_lr,
    get_lr_schedule,
    register_trainer,
    tokens_since_fired,
)

__all__ = ["BatchTopKCLTTrainer", "JumpReluCLTTrainer", "TopKCLTTrainer"]

MIN_THRESHOLD = 1e-4


@dataclass(frozen=True, kw_only=True)
class CLTConfig(TrainerConfig):
    num_layers: int
    """layers whose MLPs the CLT replaces (every layer of the model, in order)"""
    lr: float | None = None
    """Adam learning rate (None: 2e-4 / sqrt(dict_size / 2^14), Gao et al.'s rule)"""
    dead_feature_tokens: int = DEAD_FEATURE_TOKENS
    """tokens without firing after which a latent counts as dead"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {self.num_layers!r}")


class _CLTRecipe(RecipeTrainer):
    """Batches, the normalised loss, the optimizer and the dead-latent counters of both recipes."""

    state_attrs = ("num_tokens_since_fired", "tokens_seen", "output_variance")
    logging_parameters = ["dead_features"]

    def dictionary_args(self, cfg) -> tuple:
        return cfg.activation_dim, cfg.dict_size, cfg.num_layers

    def input_and_target(self, x):
        L, D = self.ae.num_layers, self.ae.activation_dim
        if isinstance(x, (tuple, list)):
            ok = len(x) == 2 and all(isinstance(t, torch.Tensor) and t.ndim == 3 for t in x)
            if not ok or any(tuple(t.shape[1:]) != (L, D) for t in x) or x[0].shape[0] != x[1].shape[0]:
                raise BatchLayoutError(self, x, self._layout_fix(x))
            return x[0], x[1]
        if not (isinstance(x, torch.Tensor) and x.ndim == 4 and tuple(x.shape[1:]) == (L, 2, D)):
            raise BatchLayoutError(self, x, self._layout_fix(x))
        return x[:, :, 0], x[:, :, 1]

    def batch_layout(self) -> str:
        L, D = self.ae.num_layers, self.ae.activation_dim
        return f"[B, {L}, 2, {D}] (each layer's MLP input, output) or (inputs [B, {L}, {D}], outputs [B, {L}, {D}])"

    def _layout_fix(self, x) -> str:
        L = self.ae.num_layers
        if isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[2] == 2 and x.shape[1] != L:
            return (
                f"the data holds {x.shape[1]} layers but num_layers={L}: a CLT reads every layer's MLP, in order "
                f"(give all {x.shape[1]} and set num_layers={x.shape[1]})"
            )
        if isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1] == L:
            return "these hold one activation per layer: read each MLP's input and output (io='in_and_out')"
        if isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1] == 2:
            return "these are one MLP's (input, output) rows: read every layer's MLP stacked (stack_sites=True)"
        return f"read the MLPs of all {L} layers with io='in_and_out' and stack_sites=True (a buffer or a cache)"

    def _decoder_constraint(self):
        return []  # the decoder norms are free

    def setup(self, cfg) -> None:
        self.lr = default_topk_lr(cfg.dict_size) if cfg.lr is None else cfg.lr
        self.optimizer = adam(self.ae.parameters(), [], 1.0, lr=self.lr, betas=(0.9, 0.999))
        self._set_schedule(get_lr_schedule(cfg.steps, cfg.warmup_steps, cfg.decay_start))
        L, F = cfg.num_layers, cfg.dict_size
        self.num_tokens_since_fired = torch.zeros(L, F, dtype=torch.long, device=self.device)
        self.tokens_seen = 0
        self.output_variance = None  # [L], from the first batch (`_prepare`); resumed with the state

    def _resolved_config(self):
        return {"lr": self.lr}

    def _prepare(self, step, x):
        if self.output_variance is not None:
            return
        _, y = self.input_and_target(x)
        rows = distributed.gather_rows(y.reshape(y.shape[0], -1)).view(-1, *y.shape[1:]).float()  # [N, L, D]
        self.output_variance = self.variance_of(rows)
        if step == 0 and self.steps_done == 0:
            self.ae.b_dec.data.copy_(rows.mean(0).to(self.ae.b_dec.dtype))

    @staticmethod
    def variance_of(y: torch.Tensor) -> torch.Tensor:
        """`[L]`: each layer's output variance (summed over dimensions) over the rows of `[N, L, D]`."""
        y = y.float()
        return (y - y.mean(0)).pow(2).sum(-1).mean(0).clamp_min(1e-12)

    def reconstruction(self, y, y_hat) -> tuple[torch.Tensor, dict]:
        """`sum_l mean_b ||y_l - y_hat_l||^2 / Var(y_l)` and its logs (per-layer FVE among them)."""
        err_L = (y.float() - y_hat.float()).pow(2).sum(-1).mean(0)
        variance_L = self.variance_of(y.detach()) if self.output_variance is None else self.output_variance
        fve_L = 1 - err_L / variance_L
        loss = (err_L / variance_L).sum()
        return loss, {"l2_loss": err_L.sum(), "mse_loss": err_L.sum(), "normalised_mse": loss, "fve": fve_L.mean()}

    def counters(self, fired_LF: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(tokens since each latent fired `[L, F]`, the batch's tokens, the dead latents `[L, F]`)."""
        counter, n_tokens = tokens_since_fired(self.num_tokens_since_fired, fired_LF, n_rows)
        return counter, n_tokens, counter >= self.dead_feature_tokens

    @property
    def dead_features(self) -> int:
        return int((self.num_tokens_since_fired >= self.dead_feature_tokens).sum())

    def _commit(self, out, step):
        self.num_tokens_since_fired = out.commit["counter"]
        self.tokens_seen += out.commit["tokens"]


@dataclass(frozen=True, kw_only=True)
class TopKCLTConfig(CLTConfig):
    positional = (
        "steps activation_dim dict_size num_layers k layer lm_name dict_class lr auxk_alpha warmup_steps decay_start "
        "dead_feature_tokens seed device wandb_name submodule_name sparse"
    )
    k: int
    """latents kept per source layer and token"""
    dict_class: type | str = TopKCrossLayerTranscoder
    auxk_alpha: float = 1 / 32
    """weight of the AuxK loss (per source layer, its dead latents fit the residual they could write)"""
    wandb_name: str = "TopKCLTTrainer"


@register_trainer
class TopKCLTTrainer(_CLTRecipe):
    """TopK CLT: each source layer's k largest ReLU pre-activations per token; with `sparse=True` the
    decoder reads and updates only those latents' rows (`decode_sparse`)."""

    Config = TopKCLTConfig

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`sum_l mean_b ||y_l - y_hat_l||^2 / Var(y_l) + auxk_alpha * AuxK`."""
        x_in, y = self.input_and_target(x)
        ae = self.ae
        f, indices, values, pre = self.code(x_in)  # per token (TopK) or per batch (BatchTopK)
        y_hat = self.decode_code(indices, values, f) if self.sparse else ae.decode(f)
        recon, logs = self.reconstruction(y, y_hat)
        f = f.detach()
        counter, n_tokens, dead = self.counters((f > 0).any(0), x_in.shape[0])
        auxk = torch.zeros((), device=y.device)
        if self.auxk_alpha > 0 and self.tokens_seen + n_tokens >= self.dead_feature_tokens:
            auxk = self.auxk(pre, dead, (y - y_hat).detach())
        loss = recon + self.auxk_alpha * auxk
        logs |= {"auxk_loss": auxk, "loss": loss, "dead_features": dead.sum()}
        return StepOutput(loss, y_hat, f, logs, {"counter": counter, "tokens": n_tokens}, target=y)

    def dictionary_args(self, cfg) -> tuple:
        return cfg.activation_dim, cfg.dict_size, cfg.num_layers, cfg.k

    def code(self, x_in) -> tuple:
        """(code `[B, L, F]`, its indices and values `[B, L, k]`, pre-activations `[B, L, F]`)."""
        values, indices, pre = self.ae.topk(x_in)
        return torch.zeros_like(pre).scatter(-1, indices, values), indices, values, pre

    def decode_code(self, indices, values, f) -> torch.Tensor:
        """The sparse path's decoder: the k kept latents' rows of each row (`decode_sparse`)."""
        return self.ae.decode_sparse(indices, values)

    def auxk(self, pre, dead_LF, residual) -> torch.Tensor:
        """Each source layer's top `D / 2` dead latents (by pre-activation) decode the residual of the
        layers they write to; the squared error divided by the residual's variance."""
        k_aux = min(self.ae.activation_dim // 2, self.ae.dict_size)
        ranked = torch.where(dead_LF, pre.detach(), -torch.inf)
        top, indices = ranked.topk(k_aux, dim=-1, sorted=False)
        values = torch.relu(pre.gather(-1, indices)) * torch.isfinite(top)
        aux = self.ae.decode_sparse(indices, values) - self.ae.b_dec
        scale = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return (residual - aux).pow(2).sum(-1).mean() / scale


@dataclass(frozen=True, kw_only=True)
class BatchTopKCLTConfig(TopKCLTConfig):
    positional = (
        "steps activation_dim dict_size num_layers k layer lm_name dict_class lr auxk_alpha warmup_steps decay_start "
        "threshold_beta threshold_start_step dead_feature_tokens seed device wandb_name submodule_name sparse"
    )
    k: int
    """latents kept per source layer and token on average: k * B per layer and batch"""
    dict_class: type | str = BatchTopKCrossLayerTranscoder
    threshold_beta: float = 0.999
    """EMA decay of each layer's inference threshold"""
    threshold_start_step: int = 1000
    """step from which the inference thresholds are tracked"""
    wandb_name: str = "BatchTopKCLTTrainer"


@register_trainer
class BatchTopKCLTTrainer(TopKCLTTrainer):
    """BatchTopK CLT: `TopKCLTTrainer.loss` on the batch-level code of each source layer
    (`BatchTopKCrossLayerTranscoder.topk`); after `threshold_start_step` each layer's threshold
    follows the EMA of the smallest activation that layer kept."""

    Config = BatchTopKCLTConfig

    def code(self, x_in) -> tuple:
        """The batch-level code itself (no padded indices: `decode_active` reads the code)."""
        pre = self.ae.pre_activations(x_in)
        return self.ae.batch_topk(pre), None, None, pre

    def decode_code(self, indices, values, f) -> torch.Tensor:
        """Rows keep different numbers of latents: each row's own, without padding (`decode_active`)."""
        return self.ae.decode_active(f)

    def _commit(self, out, step):
        super()._commit(out, step)
        if step > self.threshold_start_step:
            self._update_thresholds(out.f.detach())

    @torch.no_grad()
    def _update_thresholds(self, f: torch.Tensor) -> None:
        """EMA of each layer's smallest kept activation `[L]` (over every replica's rows); a layer that
        kept nothing leaves its threshold as it was."""
        smallest = distributed.min_(torch.where(f > 0, f, torch.inf).flatten(0, -3).amin((0, 2)).float())
        seen = torch.isfinite(smallest)
        threshold = self.ae.threshold
        ema = self.threshold_beta * threshold + (1 - self.threshold_beta) * smallest
        threshold.copy_(torch.where(seen, torch.where(threshold < 0, smallest, ema), threshold))


@dataclass(frozen=True, kw_only=True)
class JumpReluCLTConfig(CLTConfig):
    positional = (
        "steps activation_dim dict_size num_layers layer lm_name dict_class lr sparsity_penalty tanh_scale "
        "pre_act_loss bandwidth warmup_steps sparsity_warmup_steps decay_start dead_feature_tokens seed device "
        "wandb_name submodule_name sparse"
    )
    dict_class: type | str = JumpReluCrossLayerTranscoder
    sparsity_penalty: float = 0.1
    """weight of `mean_b sum_(l,f) tanh(tanh_scale * a_lf * ||W_dec[l][f]||)`, reached after the sparsity warm-up"""
    tanh_scale: float = 4.0
    """the scale c inside the tanh penalty"""
    pre_act_loss: float = 3e-6
    """weight of `mean_b sum_(l,f) ReLU(threshold_lf - pre_lf) * ||W_dec[l][f]||`, which keeps latents alive"""
    bandwidth: float = 0.1
    """width of the rectangle kernel of the threshold's straight-through gradient"""
    sparsity_warmup_steps: int | None = None
    """steps over which the sparsity penalty rises linearly from 0 (None: the whole run, as Anthropic's)"""
    wandb_name: str = "JumpReluCLTTrainer"


@register_trainer
class JumpReluCLTTrainer(_CLTRecipe):
    """JumpReLU CLT with Anthropic's tanh sparsity penalty and pre-activation loss (dense decoder)."""

    Config = JumpReluCLTConfig

    def loss(self, x, step=None, logging=False) -> StepOutput:
        """`sum_l mean_b ||y_l - y_hat_l||^2 / Var(y_l) + s(t) * sparsity_penalty * T + pre_act_loss * P`,
        T the tanh penalty, P the pre-activation loss, s(t) the sparsity warm-up."""
        x_in, y = self.input_and_target(x)
        ae = self.ae
        pre = ae.pre_activations(x_in)
        f = ae.jump(pre, self.bandwidth)
        y_hat = ae.decode(f)
        recon, logs = self.reconstruction(y, y_hat)
        norms_LF = ae.decoder_norms()
        tanh = torch.tanh(self.tanh_scale * f * norms_LF).sum((-2, -1)).mean()
        pre_act = ((ae.threshold - pre).relu() * norms_LF).sum((-2, -1)).mean()
        scale = 1.0 if step is None else self.sparsity_warmup_fn(step)
        loss = recon + scale * self.sparsity_penalty * tanh + self.pre_act_loss * pre_act
        fired = f.detach() > 0  # [B, L, F]
        counter, n_tokens, dead = self.counters(fired.any(0), x_in.shape[0])
        l0 = fired.sum((-2, -1)).float().mean()
        logs |= {"sparsity_loss": tanh, "pre_act_loss": pre_act, "l0": l0, "loss": loss, "dead_features": dead.sum()}
        return StepOutput(loss, y_hat, f, logs, {"counter": counter, "tokens": n_tokens}, target=y)

    def setup(self, cfg) -> None:
        super().setup(cfg)
        self.sparsity_warmup_fn = get_sparsity_warmup_fn(
            cfg.steps, cfg.sparsity_warmup_steps if cfg.sparsity_warmup_steps is not None else cfg.steps - 1
        )

    @torch.no_grad()
    def _after_step(self, step, x):
        # thresholds stay positive: circuit-tracer's JumpReLU (pre * 1[pre > threshold]) has no ReLU
        self.ae.threshold.clamp_(min=MIN_THRESHOLD)
