"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders")."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import Dictionary, FeatureLayout, check_sizes, register_dictionary


@register_dictionary
class GatedAutoEncoder(Dictionary):
    """A gate path decides which features fire, a magnitude path (sharing W_enc, eq. 6) how much.

    `z = W_enc (x - b_dec)`; gate `pi_gate = z + b_gate`; magnitude `pi_mag = exp(r_mag) * z + b_mag`;
    `f = 1[pi_gate > 0] * ReLU(pi_mag)`; `x_hat = W_dec f + b_dec`.
    """

    layout = FeatureLayout(
        decoder=("decoder.weight", 1),
        encoder=("encoder.weight", 0),
        feature_biases=(("r_mag", 0), ("gate_bias", 0), ("mag_bias", 0)),
    )
    bias_names = ("decoder_bias", "gate_bias", "mag_bias")

    def __init__(
        self,
        activation_dim: int,
        dict_size: int,
        initialization: str | Callable[[GatedAutoEncoder], None] = "default",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_sizes(activation_dim, dict_size)
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.decoder_bias = nn.Parameter(torch.empty(activation_dim, device=device))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=False, device=device)
        self.r_mag = nn.Parameter(torch.empty(dict_size, device=device))
        self.gate_bias = nn.Parameter(torch.empty(dict_size, device=device))
        self.mag_bias = nn.Parameter(torch.empty(dict_size, device=device))
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False, device=device)
        if initialization == "default":
            self._reset_parameters()
        elif callable(initialization):
            initialization(self)
        else:
            raise ValueError(f"initialization must be 'default' or a callable, got {initialization!r}")

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        for bias in (self.decoder_bias, self.r_mag, self.gate_bias, self.mag_bias):
            nn.init.zeros_(bias)
        w_DF = torch.randn_like(self.decoder.weight)
        w_DF /= w_DF.norm(dim=0, keepdim=True)
        self.decoder.weight.copy_(w_DF)
        self.encoder.weight.copy_(w_DF.T)

    def _gate_and_magnitude(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_width(x_BD)
        z_BF = self.encoder(x_BD - self.decoder_bias)
        return z_BF + self.gate_bias, torch.exp(self.r_mag) * z_BF + self.mag_bias

    def encode(self, x: torch.Tensor, return_gate: bool = False, normalize_decoder: bool = False):
        """Features `f`; with `return_gate` also `ReLU(pi_gate)`, the input of the sparsity penalty."""
        pi_gate, pi_mag = self._gate_and_magnitude(x)
        f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        if normalize_decoder:
            f = f * self.decoder.weight.norm(dim=0)
        return (f, torch.relu(pi_gate)) if return_gate else f

    def decode(self, f: torch.Tensor, normalize_decoder: bool = False) -> torch.Tensor:
        if normalize_decoder:
            f = f / self.decoder.weight.norm(dim=0)
        return self.decoder(f) + self.decoder_bias

    def forward(self, x: torch.Tensor, output_features: bool = False, normalize_decoder: bool = False):
        f = self.encode(x)
        x_hat = self.decode(f)
        if not output_features:
            return x_hat
        if normalize_decoder:
            f = f * self.decoder.weight.norm(dim=0)
        return x_hat, f

    @classmethod
    def _expected_keys(cls):
        return ("decoder_bias", "r_mag", "gate_bias", "mag_bias", "encoder.weight", "decoder.weight")

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, **kwargs):
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        return cls(activation_dim, dict_size)

    saelens_architecture = "gated"

    @classmethod
    def from_saelens(cls, weights) -> GatedAutoEncoder:
        ae, extra, shift_F = cls(weights.d_in, weights.d_sae), weights.extra, weights.shift_F
        ae.encoder.weight.copy_(weights.W_enc.T)
        ae.decoder.weight.copy_(weights.W_dec.T)
        ae.decoder_bias.copy_(weights.b_dec)
        ae.r_mag.copy_(extra["r_mag"])
        ae.gate_bias.copy_(extra["b_gate"] + shift_F)
        ae.mag_bias.copy_(extra["b_mag"] + extra["r_mag"].exp() * shift_F)
        return ae

    def to_saelens(self):
        state = {"W_enc": self.encoder.weight.T, "W_dec": self.decoder.weight.T, "b_dec": self.decoder_bias}
        return {"architecture": "gated"}, state | {
            "b_gate": self.gate_bias,
            "b_mag": self.mag_bias,
            "r_mag": self.r_mag,
        }
