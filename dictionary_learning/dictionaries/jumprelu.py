"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"), in Gemma Scope's parameter layout."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops import JumpReLUFunction, StepFunction
from ..sparse import SparseCode, per_entry, selected_preactivations, sparse_decode, sparse_entries
from .base import Dictionary, FeatureLayout, check_sizes, register_dictionary
from .saelens import dictionary_from_saelens


# ------------------------------------------------------------------- training forward (fused backward)
class JumpReLUWithL0(torch.autograd.Function):
    """`(x * 1[x > theta], sum_F 1[x > theta])`: JumpReLUFunction and each row's L0 (`[B]`, the row
    sums of StepFunction) in one pass, with one shared rectangle-kernel pass in backward (same gradients)."""

    @staticmethod
    def forward(ctx, x_BF, threshold_F, bandwidth):
        active = x_BF > threshold_F
        ctx.save_for_backward(x_BF, threshold_F)
        ctx.bandwidth = bandwidth
        l0_B = active.sum(-1, dtype=x_BF.dtype)
        return torch.where(active, x_BF, 0.0), l0_B

    @staticmethod
    def backward(ctx, grad_f_BF, grad_l0):
        x_BF, threshold_F = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_x = torch.where(x_BF > threshold_F, grad_f_BF, 0.0) if grad_f_BF is not None else None
        near_BF = (x_BF - threshold_F).abs_() < bw / 2  # rectangle kernel of (x - theta) / bw
        grad_theta = torch.zeros_like(threshold_F)
        if grad_f_BF is not None:
            grad_theta -= (threshold_F / bw) * torch.where(near_BF, grad_f_BF, 0.0).sum(0)
        if grad_l0 is not None:  # d L0_b / d theta = -kernel / bw for each row b
            grad_theta -= (near_BF.to(x_BF.dtype) * grad_l0[:, None]).sum(0) / bw
        return grad_x, grad_theta, None


def jumprelu_dictionary(x_BD, W_enc_FD, b_enc_F, threshold_F, W_dec_FD, b_dec_D, bandwidth, max_density=0.0):
    """(f, L0 per row `[B]`, x_hat) of a JumpReLU dictionary in training (2-D `x`): `f = jumprelu(x W_enc.T + b_enc)`,
    `x_hat = f W_dec + b_dec`, with the straight-through threshold gradients of `JumpReLUWithL0`.

    With `max_density > 0`, on CPU, when the entries that are active or within a bandwidth of their
    threshold (a superset of those with a value or a threshold gradient) are at most that fraction,
    f is a `SparseCode` over those entries and the step touches only them (same values and gradients).
    """
    pre_BF = torch.addmm(b_enc_F, x_BD, W_enc_FD.T)

    def near_or_above(rows: slice) -> torch.Tensor:
        gap = pre_BF.detach()[rows] - threshold_F.detach()
        # a full bandwidth (not half) so that rounding never drops an entry the rectangle kernel sees
        return (gap > 0) | (gap.abs_() < bandwidth)

    entries = sparse_entries(near_or_above, x_BD, max_density)
    if entries is not None:
        rows_N, features_N, offsets_B = entries
        pre_N = selected_preactivations(x_BD, W_enc_FD, b_enc_F, pre_BF.detach(), rows_N, features_N, offsets_B)
        threshold_N = per_entry(threshold_F, features_N)
        values_N = JumpReLUFunction.apply(pre_N, threshold_N, bandwidth)
        code = SparseCode(values_N, features_N, rows_N, offsets_B, W_enc_FD.shape[0])
        l0 = code.row_sums(StepFunction.apply(pre_N, threshold_N, bandwidth))
        return code, l0, sparse_decode(code, W_dec_FD) + b_dec_D
    f_BF, l0 = JumpReLUWithL0.apply(pre_BF, threshold_F, bandwidth)
    return f_BF, l0, f_BF @ W_dec_FD + b_dec_D


@register_dictionary
class JumpReluAutoEncoder(Dictionary):
    """`pre = x W_enc + b_enc`, `f = ReLU(pre * 1[pre > threshold])`, `x_hat = f W_dec + b_dec`.

    The threshold is stored directly (not as a log), so `scale_biases` can scale it with the biases.
    `apply_b_dec_to_input` (not saved) subtracts `b_dec` before encoding, for SAELens-trained weights.
    As a transcoder (`output_dim`, `transcoder`, `skip_connection`, see `_init_transcoder`) the
    decoder writes `output_dim` wide; the encoder has no pre-encoder bias to tie (b_enc absorbs it).
    """

    layout = FeatureLayout(decoder=("W_dec", 0), encoder=("W_enc", 1), feature_biases=(("b_enc", 0), ("threshold", 0)))
    bias_names = ("b_enc", "b_dec", "threshold")
    can_transcode = True

    def __init__(
        self,
        activation_dim: int,
        dict_size: int,
        device: torch.device | str | None = "cpu",
        output_dim: int | None = None,
        transcoder: bool = False,
        skip_connection: bool = False,
    ):
        super().__init__()
        check_sizes(activation_dim, dict_size)
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self._init_transcoder(activation_dim, output_dim, transcoder, skip_connection, device)
        d_out = self.output_dim
        self.W_enc = nn.Parameter(torch.empty(activation_dim, dict_size, device=device))
        self.b_enc = nn.Parameter(torch.zeros(dict_size, device=device))
        self.W_dec = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(dict_size, d_out, device=device)))
        self.b_dec = nn.Parameter(torch.zeros(d_out, device=device))
        # 0.001 as in the reference: a small positive start so every feature can fire at first.
        self.threshold = nn.Parameter(torch.full((dict_size,), 0.001, device=device))
        self.apply_b_dec_to_input = False
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            if d_out == activation_dim:
                self.W_enc.copy_(self.W_dec.T)
            else:
                W_FD = nn.init.kaiming_uniform_(torch.empty(dict_size, activation_dim, device=device))
                self.W_enc.copy_((W_FD / W_FD.norm(dim=1, keepdim=True)).T)

    def encoder_input(self, x_BD: torch.Tensor) -> torch.Tensor:
        """What the encoder reads: `x`, or `x - b_dec` with SAELens's `apply_b_dec_to_input`."""
        if self.apply_b_dec_to_input:
            if self.transcoder:
                raise ValueError("apply_b_dec_to_input subtracts the output bias from the input: not for a transcoder")
            return x_BD - self.b_dec
        return x_BD

    def pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        self._check_width(x_BD)
        x_BD = self.encoder_input(x_BD)
        return x_BD @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor, output_pre_jump: bool = False):
        pre_BF = self.pre_activations(x)
        f_BF = torch.relu(pre_BF * (pre_BF > self.threshold))
        return (f_BF, pre_BF) if output_pre_jump else f_BF

    def decode(self, f: torch.Tensor) -> torch.Tensor:  # f: [..., F]
        return f @ self.W_dec + self.b_dec

    @classmethod
    def _expected_keys(cls):
        return ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, **kwargs):
        activation_dim, dict_size = state_dict["W_enc"].shape
        transcoding = cls._transcoder_kwargs(state_dict, state_dict["W_dec"].shape[1])
        return cls(activation_dim, dict_size, "cpu", **transcoding)

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        load_from_sae_lens: bool = False,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> JumpReluAutoEncoder:
        """Load a local `ae.pt`/`ae.safetensors`, or (with `load_from_sae_lens=True, release=...,
        sae_id=...`, e.g. release "gemma-scope-2b-pt-res", sae_id "layer_20/width_16k/average_l0_71")
        a SAELens release, downloaded by `sae_lens` (optional dependency) and converted exactly."""
        if load_from_sae_lens:
            return cls._from_sae_lens(dtype=dtype, device=device, **kwargs)
        if path is None:
            raise ValueError("from_pretrained needs a path (or load_from_sae_lens=True with release/sae_id)")
        return super().from_pretrained(path, dtype=dtype, device=device)

    @classmethod
    def _from_sae_lens(cls, release: str, sae_id: str, dtype=None, device=None, **kwargs: Any) -> JumpReluAutoEncoder:
        try:
            from sae_lens import SAE
        except ImportError as e:
            raise ImportError("load_from_sae_lens=True needs the optional sae-lens: pip install sae-lens") from e
        loaded = SAE.from_pretrained(release, sae_id, device="cpu", **kwargs)
        sae = loaded[0] if isinstance(loaded, tuple) else loaded  # older sae_lens returned (sae, cfg, sparsity)
        cfg = sae.cfg if isinstance(sae.cfg, dict) else sae.cfg.to_dict()
        ae = dictionary_from_saelens(cfg, sae.state_dict(), source=f"sae_lens release {release!r}, sae_id {sae_id!r}")
        if not isinstance(ae, cls):
            arch = cfg.get("architecture")
            raise ValueError(f"{release}/{sae_id} is a {arch!r} SAE, not JumpReLU; use load_dictionary")
        return ae.to(device=device, dtype=dtype)

    saelens_architecture = "jumprelu"

    @classmethod
    def claims_saelens(cls, weights) -> bool:
        return super().claims_saelens(weights) or weights.arch in ("jumprelu_transcoder", "jumprelu_skip_transcoder")

    @classmethod
    def from_saelens(cls, weights) -> JumpReluAutoEncoder:
        ae = cls(weights.d_in, weights.d_sae, "cpu", **weights.transcoder_kwargs())
        ae._copy_saelens_skip(weights)
        ae.W_enc.copy_(weights.W_enc)
        ae.W_dec.copy_(weights.W_dec)
        ae.b_dec.copy_(weights.b_dec)
        ae.threshold.copy_(weights.extra["threshold"])
        ae.b_enc.copy_(weights.extra["b_enc"] - (weights.b_dec @ weights.W_enc if weights.subtracts_b_dec else 0))
        return ae

    def to_saelens(self):
        fields = {"architecture": "jumprelu", "apply_b_dec_to_input": bool(self.apply_b_dec_to_input)}
        return fields, {
            "W_enc": self.W_enc,
            "b_enc": self.b_enc,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
            "threshold": self.threshold,
        }

    def training_forward(self, x_BD: torch.Tensor, bandwidth: float, max_density: float = 0.0):
        """`(x, f, L0 per row [B], x_hat)` for training on rows `x` (`x_BD` flattened to 2-D, in the weights'
        dtype), with the straight-through threshold gradients of Rajamanoharan et al. 2024 (rectangle
        kernel of width `bandwidth`) and a fused backward (`jumprelu_dictionary`)."""
        x = x_BD.reshape(-1, x_BD.shape[-1]).to(self.W_enc.dtype)
        self._check_width(x)
        f, l0, x_hat = jumprelu_dictionary(
            self.encoder_input(x),
            self.W_enc.T,
            self.b_enc,
            self.threshold,
            self.W_dec,
            self.b_dec,
            bandwidth,
            max_density,
        )
        return x, f, l0, x_hat + self.skip(x)
