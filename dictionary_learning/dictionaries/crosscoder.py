"""Crosscoders (Anthropic 2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing"):
one sparse code read from, and written to, L sites at once.

Activations come as `[B, L, D]`: L layers of one model, or the same layer of L models run on the
same tokens (model diffing: a base and a fine-tuned model). Each site has its own encoder, summed
into one code `[B, F]`, and its own decoder: `encode(x_BLD) -> [B, F]`, `decode(f) -> [B, L, D]`.

The state-dict keys are those of the crosscoder fork of the reference
(`science-of-finetuning/dictionary_learning`): `encoder.weight [L, D, F]`, `encoder.bias [F]`,
`decoder.weight [L, F, D]`, `decoder.bias [L, D]`; the BatchTopK variant adds `k` and `threshold`.
Training works on rows flattened to `[B, L * D]`: the encoder is then one `[F, L * D]` matrix (a
view of its parameter) and the decoder's flattened copy is differentiable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Dictionary, FeatureLayout, check_sizes, register_dictionary
from .topk import TopKBase, apply_threshold, batch_topk


def relative_decoder_norms(ae: Dictionary, first: int = 0, second: int = 1) -> torch.Tensor:
    """Per latent, `||W_dec[second]|| / (||W_dec[first]|| + ||W_dec[second]||)` (`[F]`, in [0, 1]):
    near 0 the latent writes only to site `first` (e.g. the base model), near 1 only to `second`
    (the fine-tuned model), about 0.5 to both (a shared latent)."""
    if not isinstance(ae, _CrossCoderLayout):
        raise TypeError(
            f"relative_decoder_norms compares a crosscoder's decoder norms at two of its sites; {type(ae).__name__} "
            f"has one decoder (load a CrossCoder or BatchTopKCrossCoder)"
        )
    if not (0 <= first < ae.num_layers and 0 <= second < ae.num_layers) or first == second:
        raise ValueError(f"first={first} and second={second} must be two different sites of 0..{ae.num_layers - 1}")
    norms_LF = ae.decoder_norms()
    a, b = norms_LF[first], norms_LF[second]
    return b / (a + b).clamp_min(1e-12)


class _CrossCoderLayout(Dictionary):
    """Parameters, shapes and the dense encode/decode shared by both crosscoders."""

    # A latent's slice of each tensor: decoder rows [L, F, D] on dim 1, encoder columns [L, D, F] on dim 2.
    layout = FeatureLayout(
        decoder=("decoder.weight", 1), encoder=("encoder.weight", 2), feature_biases=(("encoder.bias", 0),)
    )
    bias_names = ("encoder.bias", "decoder.bias")

    def _init_layout(self, activation_dim: int, dict_size: int, num_layers: int, decoder_norm: float) -> None:
        check_sizes(activation_dim, dict_size)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        self.activation_dim, self.dict_size, self.num_layers = activation_dim, dict_size, num_layers
        W_LFD = torch.randn(num_layers, dict_size, activation_dim)
        W_LFD *= decoder_norm / W_LFD.norm(dim=-1, keepdim=True)  # every latent's per-site direction
        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.weight = nn.Parameter(W_LFD.transpose(1, 2).contiguous())  # the decoder's transpose
        self.encoder.bias = nn.Parameter(torch.zeros(dict_size))
        self.decoder.weight = nn.Parameter(W_LFD)
        self.decoder.bias = nn.Parameter(torch.zeros(num_layers, activation_dim))

    # ------------------------------------------------------------------------------------ shapes
    def _stacked(self, x: torch.Tensor) -> bool:
        """Whether `x` is `[..., L, D]` (else flat rows `[..., L * D]`); with one site, `[B, D]` is flat
        and `[B, 1, D]` stacked."""
        L, D = self.num_layers, self.activation_dim
        return x.ndim >= 2 and tuple(x.shape[-2:]) == (L, D) and (L > 1 or x.ndim >= 3)

    def _check_width(self, x: torch.Tensor) -> None:
        L, D = self.num_layers, self.activation_dim
        if self._stacked(x) or x.ndim >= 1 and x.shape[-1] == L * D:
            return
        raise ValueError(
            f"{type(self).__name__} reads [batch, num_layers={L}, activation_dim={D}] activations (or flat rows of "
            f"width {L * D}), got width {x.shape[-1] if x.ndim else 0} (shape {tuple(x.shape)}): stack the {L} sites "
            f"(a multi-site buffer, or PairedActivationBuffer for two models)"
        )

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., L, D]` or `[..., L * D]` as flat rows `[..., L * D]`."""
        self._check_width(x)
        return x.flatten(-2) if self._stacked(x) else x

    def encoder_FD(self) -> torch.Tensor:
        """The encoder as one `[F, L * D]` matrix over flattened rows (a view: writes go through)."""
        W_LDF = self.encoder.weight
        return W_LDF.permute(2, 0, 1).reshape(self.dict_size, -1)

    def decoder_FD(self) -> torch.Tensor:
        """The decoder as one `[F, L * D]` matrix over flattened rows (a differentiable copy)."""
        return self.decoder.weight.transpose(0, 1).reshape(self.dict_size, -1)

    def decoder_norms(self) -> torch.Tensor:
        """`[L, F]`: the norm of each latent's decoder direction at each site."""
        return self.decoder.weight.norm(dim=-1)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """`sum_l x_l @ W_enc[l] + b_enc`: `[..., F]`."""
        return self._rows(x) @ self.encoder_FD().T + self.encoder.bias

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """`[..., F]` -> `[..., L, D]`: each site's decoder, plus its bias."""
        return torch.einsum("...f,lfd->...ld", f, self.decoder.weight) + self.decoder.bias

    def forward(self, x: torch.Tensor, output_features: bool = False):
        f = self.encode(x)
        x_hat = self.decode(f)
        if not self._stacked(x):
            x_hat = x_hat.flatten(-2)  # flat rows in, flat rows out
        return (x_hat, f) if output_features else x_hat

    def architecture_config(self) -> dict[str, Any]:
        return super().architecture_config() | {"num_layers": self.num_layers}

    @classmethod
    def _shapes_fit(cls, state_dict) -> bool:
        return state_dict["encoder.weight"].ndim == 3  # [L, D, F]; an AutoEncoderNew has the same keys

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_layers={self.num_layers}"


@register_dictionary
class CrossCoder(_CrossCoderLayout):
    """ReLU crosscoder trained with an L1 penalty weighted by the sum of each latent's per-site
    decoder norms (Anthropic's crosscoder loss; `CrossCoderTrainer`)."""

    def __init__(self, activation_dim: int, dict_size: int, num_layers: int, decoder_norm: float = 0.1):
        super().__init__()
        self._init_layout(activation_dim, dict_size, num_layers, decoder_norm)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activations(x))

    @classmethod
    def _expected_keys(cls):
        return ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, **kwargs):
        num_layers, activation_dim, dict_size = state_dict["encoder.weight"].shape
        return cls(activation_dim, dict_size, num_layers)


@register_dictionary
class BatchTopKCrossCoder(_CrossCoderLayout, TopKBase):
    """Crosscoder whose training keeps the `k * B` largest decoder-norm-weighted activations of the
    batch (`ReLU(pre_f) * sum_l ||W_dec[l, f]||`), with AuxK (`BatchTopKCrossCoderTrainer`); at
    inference a latent fires when its weighted activation exceeds the learned global threshold.
    Decoder directions start at norm 1 per site, as a BatchTopK SAE's (at 0.1, 36 of 48 planted
    latents were found in 1,000 steps instead of 48)."""

    batch_selection = True
    bias_names = ("encoder.bias", "decoder.bias", "threshold")

    def __init__(self, activation_dim: int, dict_size: int, num_layers: int, k: int, decoder_norm: float = 1.0):
        super().__init__()
        check_sizes(activation_dim, dict_size, k)
        self._init_layout(activation_dim, dict_size, num_layers, decoder_norm)
        self._init_buffers(k)

    tied_input_bias = None  # the encoder reads the activations as they are (no pre-encoder bias)

    @property
    def b_dec(self) -> torch.Tensor:
        """The decoder bias as one `[L * D]` vector (a view), for the flat-row training code."""
        return self.decoder.bias.view(-1)

    def selection_weights(self) -> torch.Tensor:
        return self.decoder_norms().sum(0).detach()

    def encoder_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder_FD(), self.encoder.bias

    def relu_pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activations(x))

    def encode(self, x: torch.Tensor, return_active: bool = False, use_threshold: bool = True):
        """`[..., L, D]` (or flat rows) -> `[..., F]`; with `return_active`: `(f, active_F, relu_pre)`."""
        a_BF = self.relu_pre_activations(x)
        weighted_BF = a_BF * self.selection_weights()
        if use_threshold:
            kept_BF = apply_threshold(weighted_BF, self.threshold) > 0
        else:
            kept_BF = batch_topk(weighted_BF, self.active_k) > 0
        f_BF = a_BF * kept_BF
        if return_active:
            return f_BF, f_BF.reshape(-1, self.dict_size).sum(0) > 0, a_BF
        return f_BF

    @classmethod
    def _expected_keys(cls):
        return ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias", "k", "threshold")

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, **kwargs):
        num_layers, activation_dim, dict_size = state_dict["encoder.weight"].shape
        return cls(activation_dim, dict_size, num_layers, int(state_dict["k"]))
