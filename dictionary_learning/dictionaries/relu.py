"""ReLU dictionaries: the standard SAE of "Towards Monosemanticity" and the April-2024 update layout."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..ops import SparseCode, relu_dictionary
from .base import Dictionary, FeatureLayout, check_sizes, register_dictionary

logger = logging.getLogger(__name__)


def _tied_init_columns(activation_dim: int, dict_size: int, column_norm: float) -> torch.Tensor:
    """A random `[D, F]` matrix whose columns have norm `column_norm` (decoder; encoder = its transpose)."""
    w_DF = torch.randn(activation_dim, dict_size)
    return w_DF / w_DF.norm(dim=0, keepdim=True) * column_norm


def _encode_decode(ae, x_BD, b_in_D, b_out_D, max_density):
    """`encode_decode` of both ReLU layouts (`nn.Linear` encoder and decoder, optional biases)."""
    ae._check_width(x_BD)
    x2 = x_BD.reshape(-1, ae.activation_dim)
    f, x_hat = relu_dictionary(x2, ae.encoder.weight, ae.encoder.bias, ae.decoder.weight, b_in_D, b_out_D, max_density)
    return (f if isinstance(f, SparseCode) else f.view(*x_BD.shape[:-1], -1)), x_hat.view_as(x_BD)


@register_dictionary
class AutoEncoder(Dictionary):
    """Standard ReLU SAE: `f = ReLU(W_enc (x - b) + b_enc)`, `x_hat = W_dec f + b` (one shared bias b).

    Init as Anthropic's April-2024 update: decoder columns of norm 0.1, encoder = decoder transpose;
    the encoder bias keeps PyTorch's default Linear init, as in the reference.
    """

    layout = FeatureLayout(
        decoder=("decoder.weight", 1), encoder=("encoder.weight", 0), feature_biases=(("encoder.bias", 0),)
    )
    bias_names = ("bias", "encoder.bias")

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        check_sizes(activation_dim, dict_size)
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.bias = nn.Parameter(torch.zeros(activation_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        w_DF = _tied_init_columns(activation_dim, dict_size, 0.1)
        self.decoder.weight = nn.Parameter(w_DF.clone())
        self.encoder.weight = nn.Parameter(w_DF.T.clone())

    def pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        self._check_width(x_BD)
        return self.encoder(x_BD - self.bias)

    def encode_decode(self, x_BD: torch.Tensor, max_density: float = 0.0):
        """`(encode(x), decode(encode(x)))` for training, with a cheaper fused backward; with
        `max_density > 0` the features may come as a `SparseCode` (see `ops.relu_dictionary`)."""
        return _encode_decode(self, x_BD, self.bias, self.bias, max_density)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activations(x_BD))

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return self.decoder(f_BF) + self.bias

    def forward(self, x: torch.Tensor, output_features: bool = False, ghost_mask: torch.Tensor | None = None):
        """With `ghost_mask` (legacy ghost grads): also returns `x_ghost = W_dec (exp(f_pre) * mask)`."""
        if ghost_mask is None:
            return super().forward(x, output_features=output_features)
        f_pre = self.pre_activations(x)
        x_ghost = self.decoder(torch.exp(f_pre) * ghost_mask.to(f_pre))
        f = torch.relu(f_pre)
        x_hat = self.decode(f)
        return (x_hat, x_ghost, f) if output_features else (x_hat, x_ghost)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale so decoder columns have unit norm without changing the function.

        Each column is divided by its norm and the matching encoder row and bias multiplied by it,
        so features become decoder-norm weighted. A no-op when the columns are already unit norm.
        """
        norms_F = self.decoder.weight.norm(dim=0)
        if torch.allclose(norms_F, torch.ones_like(norms_F)):
            return
        logger.info("normalising decoder columns of %s to unit norm (function preserved)", type(self).__name__)
        self.decoder.weight.div_(norms_F)
        self.encoder.weight.mul_(norms_F[:, None])
        self.encoder.bias.mul_(norms_F)

    @classmethod
    def _expected_keys(cls):
        return ("bias", "encoder.weight", "encoder.bias", "decoder.weight")

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, **kwargs):
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        return cls(activation_dim, dict_size)

    @classmethod
    def from_state_dict(cls, state_dict, dtype=None, device=None, source="state dict", normalize_decoder=True):
        ae = super().from_state_dict(state_dict, dtype=None, device=None, source=source)
        if normalize_decoder:
            ae.normalize_decoder()
        return ae.to(device=device, dtype=dtype) if (dtype or device) else ae

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, normalize_decoder: bool = True):
        """Load `ae.pt`/`ae.safetensors`; by default fold decoder norms into the encoder, as the reference."""
        return super().from_pretrained(path, dtype=dtype, device=device, normalize_decoder=normalize_decoder)

    saelens_architecture = "standard"

    @classmethod
    def claims_saelens(cls, weights) -> bool:
        return super().claims_saelens(weights) and weights.subtracts_b_dec

    @classmethod
    def from_saelens(cls, weights) -> AutoEncoder:
        ae = cls(weights.d_in, weights.d_sae)
        ae.encoder.weight.copy_(weights.W_enc.T)
        ae.encoder.bias.copy_(weights.extra["b_enc"])
        ae.decoder.weight.copy_(weights.W_dec.T)
        ae.bias.copy_(weights.b_dec)
        return ae

    def to_saelens(self):
        state = {"W_enc": self.encoder.weight.T, "b_enc": self.encoder.bias, "b_dec": self.bias}
        return {"architecture": "standard"}, state | {"W_dec": self.decoder.weight.T}


@register_dictionary
class AutoEncoderNew(Dictionary):
    """April-update layout: `f = ReLU(W_enc x + b_enc)`, `x_hat = W_dec f + b_dec` (no pre-encoder bias).

    `forward(x, output_features=True)` returns features scaled by decoder column norms, as the
    reference does; trainers take their sparsity penalty from `encode` (unscaled), so the norm is
    counted once (the reference's issue #39).
    """

    layout = FeatureLayout(
        decoder=("decoder.weight", 1), encoder=("encoder.weight", 0), feature_biases=(("encoder.bias", 0),)
    )
    bias_names = ("encoder.bias", "decoder.bias")

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        check_sizes(activation_dim, dict_size)
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=True)
        w_DF = _tied_init_columns(activation_dim, dict_size, 0.1)
        self.decoder.weight = nn.Parameter(w_DF.clone())
        self.encoder.weight = nn.Parameter(w_DF.T.clone())
        nn.init.zeros_(self.encoder.bias)
        nn.init.zeros_(self.decoder.bias)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        self._check_width(x_BD)
        return torch.relu(self.encoder(x_BD))

    def encode_decode(self, x_BD: torch.Tensor, max_density: float = 0.0):
        """`(encode(x), decode(encode(x)))` for training, with a cheaper fused backward; with
        `max_density > 0` the features may come as a `SparseCode` (see `ops.relu_dictionary`)."""
        return _encode_decode(self, x_BD, None, self.decoder.bias, max_density)

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return self.decoder(f_BF)

    def forward(self, x: torch.Tensor, output_features: bool = False):
        f = self.encode(x)
        x_hat = self.decode(f)
        if not output_features:
            return x_hat
        return x_hat, f * self.decoder.weight.norm(dim=0)

    @classmethod
    def _expected_keys(cls):
        return ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, **kwargs):
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        return cls(activation_dim, dict_size)

    saelens_architecture = "standard"

    @classmethod
    def claims_saelens(cls, weights) -> bool:  # exactly SAELens's standard SAE without b_dec subtraction
        return super().claims_saelens(weights) and not weights.subtracts_b_dec

    @classmethod
    def from_saelens(cls, weights) -> AutoEncoderNew:
        ae = cls(weights.d_in, weights.d_sae)
        ae.encoder.weight.copy_(weights.W_enc.T)
        ae.encoder.bias.copy_(weights.extra["b_enc"])
        ae.decoder.weight.copy_(weights.W_dec.T)
        ae.decoder.bias.copy_(weights.b_dec)
        return ae

    def to_saelens(self):
        state = {"W_enc": self.encoder.weight.T, "b_enc": self.encoder.bias, "b_dec": self.decoder.bias}
        return {"architecture": "standard", "apply_b_dec_to_input": False}, state | {"W_dec": self.decoder.weight.T}
