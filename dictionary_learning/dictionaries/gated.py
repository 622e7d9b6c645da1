"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders")."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..sparse import SparseCode, per_entry, selected_preactivations, sparse_decode, sparse_entries
from .base import Dictionary, FeatureLayout, check_sizes, register_dictionary


# ------------------------------------------------------------------- training forward (fused backward)
class _GatedDictionary(torch.autograd.Function):
    """Gated SAE forward for training (Rajamanoharan et al. 2024) with a hand-written backward.

    `z = (x - b_dec) @ W_enc.T`, `pi_gate = z + b_gate`, `pi_mag = exp(r_mag) * z + b_mag`,
    `f = 1[pi_gate > 0] * ReLU(pi_mag)`, `gate = ReLU(pi_gate)`, `x_hat = f @ W_dec.T + b_dec`,
    `x_hat_gate = gate @ W_dec.T + b_dec` through a frozen decoder. Backward needs four `[B, F]`
    matmuls where autograd runs five (the `b_dec` gradient through the encoder is a vector product).
    """

    @staticmethod
    def forward(ctx, x_BD, W_enc_FD, b_gate_F, r_mag_F, b_mag_F, W_dec_DF, b_dec_D, z_BF):
        x_centered = x_BD - b_dec_D
        scale_F = r_mag_F.exp()
        pi_gate = z_BF + b_gate_F
        active = pi_gate > 0
        f_BF = torch.where(active, torch.addcmul(b_mag_F, z_BF, scale_F).relu_(), 0.0)
        gate_BF = pi_gate.relu_()
        x_hat = torch.addmm(b_dec_D, f_BF, W_dec_DF.T)
        x_hat_gate = torch.addmm(b_dec_D, gate_BF, W_dec_DF.T)
        ctx.save_for_backward(x_centered, z_BF, f_BF, gate_BF, W_enc_FD, scale_F, W_dec_DF)
        return f_BF, gate_BF, x_hat, x_hat_gate

    @staticmethod
    def backward(ctx, grad_f, grad_gate, grad_x_hat, grad_x_hat_gate):
        x_centered, z_BF, f_BF, gate_BF, W_enc_FD, scale_F, W_dec_DF = ctx.saved_tensors
        zeros = torch.zeros_like(x_centered)
        grad_x_hat = zeros if grad_x_hat is None else grad_x_hat
        grad_x_hat_gate = zeros if grad_x_hat_gate is None else grad_x_hat_gate
        grad_mag = grad_x_hat @ W_dec_DF  # d/d pi_mag, masked below where f = 0
        if grad_f is not None:
            grad_mag += grad_f
        grad_mag.masked_fill_(f_BF <= 0, 0.0)
        grad_pi_gate = grad_x_hat_gate @ W_dec_DF
        if grad_gate is not None:
            grad_pi_gate += grad_gate
        grad_pi_gate.masked_fill_(gate_BF <= 0, 0.0)
        grad_r_mag = (grad_mag * z_BF).sum(0) * scale_F
        grad_b_mag = grad_mag.sum(0)
        grad_b_gate = grad_pi_gate.sum(0)
        grad_z = grad_pi_gate.add_(grad_mag.mul_(scale_F))
        grad_W_enc = grad_z.T @ x_centered
        grad_W_dec = grad_x_hat.T @ f_BF
        grad_b_dec = grad_x_hat.sum(0) - grad_z.sum(0) @ W_enc_FD
        grad_x = grad_z @ W_enc_FD if ctx.needs_input_grad[0] else None
        return grad_x, grad_W_enc, grad_b_gate, grad_r_mag, grad_b_mag, grad_W_dec, grad_b_dec, None


def gated_dictionary(x_BD, W_enc_FD, b_gate_F, r_mag_F, b_mag_F, W_dec_DF, b_dec_D, max_density: float = 0.0):
    """(f, ReLU(pi_gate), x_hat, x_hat through the frozen decoder) of a Gated SAE; see `_GatedDictionary`.

    With `max_density > 0`, on CPU, when the gate is open on at most that fraction of entries, f and
    ReLU(pi_gate) are `SparseCode`s over those entries and the step touches only them.
    """
    with torch.no_grad():
        z_BF = (x_BD - b_dec_D) @ W_enc_FD.T
    entries = sparse_entries(lambda rows: z_BF[rows] + b_gate_F.detach() > 0, x_BD, max_density)
    if entries is None:
        return _GatedDictionary.apply(x_BD, W_enc_FD, b_gate_F, r_mag_F, b_mag_F, W_dec_DF, b_dec_D, z_BF)
    rows_N, features_N, offsets_B = entries
    z_N = selected_preactivations(x_BD, W_enc_FD, None, z_BF, rows_N, features_N, offsets_B, b_dec_D)
    gate_N = torch.relu(z_N + per_entry(b_gate_F, features_N))
    # the gate is open on every entry
    f_N = torch.relu(per_entry(r_mag_F.exp(), features_N) * z_N + per_entry(b_mag_F, features_N))
    f = SparseCode(f_N, features_N, rows_N, offsets_B, W_enc_FD.shape[0])
    gate = f._replace(values=gate_N)
    x_hat = sparse_decode(f, W_dec_DF.T) + b_dec_D
    x_hat_gate = sparse_decode(gate, W_dec_DF.detach().T) + b_dec_D.detach()
    return f, gate, x_hat, x_hat_gate


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

    def training_forward(self, x_BD: torch.Tensor, max_density: float = 0.0):
        """`(f, gate, x_hat, x_hat_gate)` for training, with a fused backward (`gated_dictionary`);
        `x_hat_gate` reconstructs from the gate through a frozen copy of the decoder (eq. 8 of
        Rajamanoharan et al. 2024). With `max_density > 0` the codes may come as `SparseCode`s."""
        self._check_width(x_BD)
        x2 = x_BD.reshape(-1, x_BD.shape[-1])
        f, gate, x_hat, x_hat_gate = gated_dictionary(
            x2,
            self.encoder.weight,
            self.gate_bias,
            self.r_mag,
            self.mag_bias,
            self.decoder.weight,
            self.decoder_bias,
            max_density,
        )
        if not isinstance(f, SparseCode):
            f, gate = f.view(*x_BD.shape[:-1], -1), gate.view(*x_BD.shape[:-1], -1)
        return f, gate, x_hat.view_as(x_BD), x_hat_gate.view_as(x_BD)
