"""ReLU dictionaries: the standard SAE of "Towards Monosemanticity" and the April-2024 update layout."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..sparse import SparseCode, selected_preactivations, sparse_decode, sparse_entries
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
    x_hat = x_hat + ae.skip(x2)
    return (f if isinstance(f, SparseCode) else f.view(*x_BD.shape[:-1], -1)), x_hat.view(*x_BD.shape[:-1], -1)


def _copy_saelens_weights(ae, weights, b_dec_D: torch.Tensor):
    """SAELens's standard SAE into either ReLU layout (`b_dec_D`: where that layout keeps b_dec)."""
    ae.encoder.weight.copy_(weights.W_enc.T)
    ae.encoder.bias.copy_(weights.extra["b_enc"])
    ae.decoder.weight.copy_(weights.W_dec.T)
    b_dec_D.copy_(weights.b_dec)
    return ae


def _saelens_weights(ae, b_dec_D: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"W_enc": ae.encoder.weight.T, "b_enc": ae.encoder.bias, "W_dec": ae.decoder.weight.T, "b_dec": b_dec_D}


# ------------------------------------------------------------------- training forward (fused backward)
class _ReluDictionary(torch.autograd.Function):
    """`f = ReLU((x - b_in) @ W_enc.T + b_enc)`, `x_hat = f @ W_dec.T + b_out` with a hand-written backward.

    Autograd's version runs six `[B, F]`-sized matmuls per step; the gradient of `b_in` needs only
    `sum_b dpre[b] @ W_enc`, so this backward runs four, and masks the ReLU in place. `pre_BF`, the
    pre-activations computed without autograd, is consumed (overwritten by f).
    """

    @staticmethod
    def forward(ctx, x_BD, W_enc_FD, b_enc_F, W_dec_DF, b_in_D, b_out_D, pre_BF):
        x_centered = x_BD - b_in_D if b_in_D is not None else x_BD
        f_BF = pre_BF.relu_()
        x_hat = f_BF @ W_dec_DF.T
        if b_out_D is not None:
            x_hat = x_hat + b_out_D
        ctx.save_for_backward(x_centered, f_BF, W_enc_FD, W_dec_DF)
        ctx.has_b_in, ctx.has_b_out = b_in_D is not None, b_out_D is not None
        return f_BF, x_hat

    @staticmethod
    def backward(ctx, grad_f_BF, grad_x_hat_BD):
        x_centered, f_BF, W_enc_FD, W_dec_DF = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_x_hat_BD is None:
            grad_x_hat_BD = torch.zeros_like(x_centered)
        grad_pre = grad_x_hat_BD @ W_dec_DF
        if grad_f_BF is not None:
            grad_pre += grad_f_BF
        grad_pre.masked_fill_(f_BF <= 0, 0.0)
        grad_b_enc = grad_pre.sum(0)
        grad_W_enc = grad_pre.T @ x_centered if need[1] else None
        grad_W_dec = grad_x_hat_BD.T @ f_BF if need[3] else None
        grad_b_in = -(grad_b_enc @ W_enc_FD) if ctx.has_b_in and need[4] else None
        grad_b_out = grad_x_hat_BD.sum(0) if ctx.has_b_out and need[5] else None
        grad_x = grad_pre @ W_enc_FD if need[0] else None
        return grad_x, grad_W_enc, grad_b_enc if need[2] else None, grad_W_dec, grad_b_in, grad_b_out, None


def relu_dictionary(x_BD, W_enc_FD, b_enc_F, W_dec_DF, b_in_D=None, b_out_D=None, max_density: float = 0.0):
    """(f, x_hat) of a ReLU dictionary (2-D `x`) with the cheaper backward of `_ReluDictionary`.

    With `max_density > 0`, on CPU, when at most that fraction of f is non-zero, f is a `SparseCode`
    and the step runs on its entries only: one dense matmul (the encoder) instead of five, same
    values and gradients.
    """
    with torch.no_grad():
        pre_BF = torch.addmm(b_enc_F, x_BD - b_in_D if b_in_D is not None else x_BD, W_enc_FD.T)
    entries = sparse_entries(lambda rows: pre_BF[rows] > 0, x_BD, max_density)
    if entries is None:
        return _ReluDictionary.apply(x_BD, W_enc_FD, b_enc_F, W_dec_DF, b_in_D, b_out_D, pre_BF)
    rows_N, features_N, offsets_B = entries
    pre_N = selected_preactivations(x_BD, W_enc_FD, b_enc_F, pre_BF, rows_N, features_N, offsets_B, b_in_D)
    code = SparseCode(pre_N, features_N, rows_N, offsets_B, W_enc_FD.shape[0])  # all entries > 0: ReLU = id
    x_hat = sparse_decode(code, W_dec_DF.T)
    return code, x_hat + b_out_D if b_out_D is not None else x_hat


@register_dictionary
class AutoEncoder(Dictionary):
    """Standard ReLU SAE: `f = ReLU(W_enc (x - b) + b_enc)`, `x_hat = W_dec f + b` (one shared bias b).

    Init as Anthropic's April-2024 update: decoder columns of norm 0.1, encoder = decoder transpose;
    the encoder bias keeps PyTorch's default Linear init, as in the reference.

    As a transcoder (`transcoder=True`, `output_dim`, `skip_connection`; see `_init_transcoder`)
    `bias` is the output bias and the input has its own `b_in`.
    """

    layout = FeatureLayout(
        decoder=("decoder.weight", 1), encoder=("encoder.weight", 0), feature_biases=(("encoder.bias", 0),)
    )
    bias_names = ("bias", "encoder.bias")
    can_transcode = True
    tied_input_bias = "bias"

    def __init__(
        self,
        activation_dim: int,
        dict_size: int,
        output_dim: int | None = None,
        transcoder: bool = False,
        skip_connection: bool = False,
    ):
        super().__init__()
        check_sizes(activation_dim, dict_size)
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self._init_transcoder(activation_dim, output_dim, transcoder, skip_connection)
        self.bias = nn.Parameter(torch.zeros(self.output_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, self.output_dim, bias=False)
        w_DF = _tied_init_columns(self.output_dim, dict_size, 0.1)
        self.decoder.weight = nn.Parameter(w_DF.clone())
        if self.output_dim == activation_dim:
            self.encoder.weight = nn.Parameter(w_DF.T.clone())
        else:
            self.encoder.weight = nn.Parameter(_tied_init_columns(activation_dim, dict_size, 0.1).T.clone())

    def pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        self._check_width(x_BD)
        return self.encoder(x_BD - self.input_shift)

    def encode_decode(self, x_BD: torch.Tensor, max_density: float = 0.0):
        """`(encode(x), decode(encode(x)))` for training (plus a skip transcoder's linear path), with a
        cheaper fused backward; with `max_density > 0` the features may come as a `SparseCode` (see
        `relu_dictionary`)."""
        return _encode_decode(self, x_BD, self.input_shift, self.bias, max_density)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., D] -> [..., F]
        return torch.relu(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:  # f: [..., F] -> [..., D]
        return self.decoder(f) + self.bias

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
        return cls(
            activation_dim, dict_size, **cls._transcoder_kwargs(state_dict, state_dict["decoder.weight"].shape[0])
        )

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
        transcoder = weights.arch in ("transcoder", "skip_transcoder")
        return transcoder or super().claims_saelens(weights) and weights.subtracts_b_dec

    @classmethod
    def from_saelens(cls, weights) -> AutoEncoder:
        # a transcoder's b_in stays 0: SAELens's transcoders subtract nothing from their input
        ae = cls(weights.d_in, weights.d_sae, **weights.transcoder_kwargs())
        ae._copy_saelens_skip(weights)
        return _copy_saelens_weights(ae, weights, ae.bias)

    def to_saelens(self):
        return {"architecture": "standard"}, _saelens_weights(self, self.bias)


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

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., D] -> [..., F]
        self._check_width(x)
        return torch.relu(self.encoder(x))

    def encode_decode(self, x_BD: torch.Tensor, max_density: float = 0.0):
        """`(encode(x), decode(encode(x)))` for training, with a cheaper fused backward; with
        `max_density > 0` the features may come as a `SparseCode` (see `relu_dictionary`)."""
        return _encode_decode(self, x_BD, None, self.decoder.bias, max_density)

    def decode(self, f: torch.Tensor) -> torch.Tensor:  # f: [..., F] -> [..., D]
        return self.decoder(f)

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
        return _copy_saelens_weights(ae, weights, ae.decoder.bias)

    def to_saelens(self):
        return {"architecture": "standard", "apply_b_dec_to_input": False}, _saelens_weights(self, self.decoder.bias)
