"""TopK-family dictionaries: TopK (Gao et al. 2024), BatchTopK (Bussmann et al. 2024), Matryoshka
and AbsTopK (arXiv 2510.00404: ranked by magnitude, signed codes).

All three keep `k` (int32) and `threshold` (float32, -1 = "not yet estimated") as buffers so that a
saved file carries them. After training, the threshold allows JumpReLU-style inference with one
global scalar, which makes BatchTopK's features independent of the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..files import CheckpointError
from ..sparse import (
    SparseCode,
    batch_topk_entries,
    per_entry,
    per_row_entries,
    row_topk_entries,
    selected_preactivations,
    sparse_decode,
)
from .base import Dictionary, FeatureLayout, check_sizes, register_dictionary
from .saelens import require_field


def row_topk(a_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the k largest entries of each row: returns (f_BF, values_BK, indices_BK)."""
    values_BK, indices_BK = a_BF.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(a_BF).scatter_(-1, indices_BK, values_BK), values_BK, indices_BK


def batch_topk(a_BF: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k * B largest entries of the whole `[B, F]` batch (B = product of leading dims)."""
    flat = a_BF.flatten()
    n_rows = flat.numel() // a_BF.shape[-1]
    values, indices = flat.topk(min(k * n_rows, flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter_(0, indices, values).view_as(a_BF)


def apply_threshold(a_BF: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """JumpReLU inference with one global scalar threshold: keep entries above it."""
    return a_BF * (a_BF > threshold)


class TopKBase(Dictionary):
    """Shared buffers, bias scaling and the cached Python `k` (read without a device sync)."""

    threshold_is_sentinel = True
    tied_input_bias = "b_dec"  # the reference's pre-encoder bias

    def _init_buffers(self, k: int) -> None:
        self.register_buffer("k", torch.tensor(k, dtype=torch.int32))  # the saved k (the reference's buffer)
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self._k = int(k)

    @property
    def active_k(self) -> int:
        """The k the dictionary encodes with now, as a Python int (the `k` buffer without a device
        read; k-annealing changes it during training)."""
        return self._k

    def set_k(self, k: int) -> None:
        """Change k (used by k-annealing); keeps the saved buffer and the cached int in step."""
        check_sizes(self.activation_dim, self.dict_size, k)
        self.k.fill_(k)
        self._k = int(k)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._k = int(self.k)

    def architecture_config(self) -> dict[str, Any]:
        return super().architecture_config() | {"k": self._k}

    def relu_pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------------- sparse training path
    batch_selection: bool = False  # training keeps the k * B largest of the batch instead of k per row
    # Codes keep the pre-activation's sign and latents are ranked by magnitude (AbsTopK), instead of ReLU.
    signed: bool = False

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """The code's value of a selected latent: ReLU of its pre-activation, or itself when signed."""
        return pre if self.signed else torch.relu(pre)

    def encoder_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_enc as `[F, D]`, b_enc `[F]`): pre-activations are `(x - b_dec) @ W.T + b`."""
        raise NotImplementedError

    def selection_weights(self) -> torch.Tensor | None:
        """Per-latent weights `[F]` of the pre-activations when choosing which latents to keep (a
        crosscoder's decoder norms); None: the pre-activations themselves."""
        return None

    def encode_sparse(self, x_BD: torch.Tensor) -> tuple[SparseCode, torch.Tensor]:
        """Training-time code as a `SparseCode` (k per row, or k * B per batch for BatchTopK-style
        dictionaries), and the `[B, F]` pre-activations (before ReLU, without autograd).

        Equal to `encode(x, use_threshold=False)` in value and gradient, but its backward touches
        only the selected encoder rows: the encoder costs one dense matmul (its forward) instead of two.
        """
        self._check_width(x_BD)
        W_FD, b_F = self.encoder_weight_bias()
        shift = self.input_shift
        with torch.no_grad():
            pre_BF = torch.addmm(b_F, x_BD if shift is None else x_BD - shift, W_FD.T)
            weights_F = self.selection_weights()
            if self.signed:
                ranked_BF = pre_BF.abs()
            else:
                ranked_BF = pre_BF if weights_F is None else torch.relu(pre_BF) * weights_F
        select = batch_topk_entries if self.batch_selection else row_topk_entries
        rows_N, features_N, offsets_B = select(ranked_BF, self._k)
        pre_N = selected_preactivations(x_BD, W_FD, b_F, pre_BF, rows_N, features_N, offsets_B, shift)
        return SparseCode(self.activation(pre_N), features_N, rows_N, offsets_B, self.dict_size), pre_BF

    def decode_selected(self, x_BD, pre_BF, indices_BK, valid_BK) -> torch.Tensor:
        """Decoder output (no bias) of the activations of latents `indices_BK` (where `valid_BK`),
        differentiable in the encoder and decoder rows it reads; `pre_BF` from `encode_sparse`."""
        W_FD, b_F = self.encoder_weight_bias()
        rows_N, features_N, offsets_B = per_row_entries(indices_BK)
        pre_N = selected_preactivations(x_BD, W_FD, b_F, pre_BF, rows_N, features_N, offsets_B, self.input_shift)
        values_N = self.activation(pre_N) * valid_BK.flatten()
        return sparse_decode(SparseCode(values_N, features_N, rows_N, offsets_B, self.dict_size), self.decoder_FD())

    def decode_sparse(self, code: SparseCode) -> torch.Tensor:
        """`decode(code.to_dense())` reading only the decoder rows the code uses."""
        return sparse_decode(code, self.decoder_FD()) + self.b_dec

    # ------------------------------------------------------------------------- the training code
    def training_code(self, x_BD: torch.Tensor, sparse: bool) -> TrainingCode:
        """The code of a training batch `[B, D]` without the inference threshold: on the sparse
        path a `SparseCode` (`encode_sparse`), else a dense `[B, F]` (the reference's computation)."""
        if sparse:
            f, pre = self.encode_sparse(x_BD)
            return TrainingCode(self, x_BD, f, pre, f.fired(), self.threshold_input(f))
        if self.batch_selection:
            f, fired_F, pre = self.encode(x_BD, return_active=True, use_threshold=False)
            weights_F = self.selection_weights()
            return TrainingCode(self, x_BD, f, pre, fired_F, f if weights_F is None else f * weights_F)
        f, values_BK, indices_BK, pre = self.encode(x_BD, return_topk=True, use_threshold=False)
        fired_F = torch.zeros(self.dict_size, dtype=torch.bool, device=x_BD.device)
        fired_F[indices_BK.flatten()] = True
        return TrainingCode(self, x_BD, f, pre, fired_F, values_BK.abs() if self.signed else values_BK)

    def threshold_input(self, code: SparseCode) -> torch.Tensor:
        """What the inference threshold's estimate reads from a sparse training code: the kept
        values (`[B, k]` per row for per-row top-k; weighted like the selection, if it is)."""
        values = code.values.detach().abs() if self.signed else code.values.detach()
        if not self.batch_selection:
            return values.view(code.n_rows, -1)  # exactly k per row
        weights_F = self.selection_weights()
        return values if weights_F is None else values * per_entry(weights_F, code.features)

    @classmethod
    def from_pretrained(cls, path, k: int | None = None, device=None, dtype=None, **kwargs: Any):
        """Load weights; `k`, when given, must equal the saved k (ValueError otherwise)."""
        ae = super().from_pretrained(path, dtype=dtype, device=device, **kwargs)
        if k is not None and k != ae._k:
            raise ValueError(f"k={k} was requested but the file {path} was saved with k={ae._k}")
        return ae

    def _thresholded_saelens(self, weights: dict[str, torch.Tensor]):
        """BatchTopK-style inference (a global threshold on ReLU(pre)) is SAELens's JumpReLU with that
        threshold everywhere."""
        threshold = float(self.threshold)
        if threshold < 0:
            raise ValueError(
                f"{type(self).__name__} has no inference threshold yet (threshold={threshold}); "
                "train past threshold_start_step before exporting"
            )
        state = weights | {"b_dec": self.b_dec, "threshold": torch.full((self.dict_size,), threshold)}
        return {"architecture": "jumprelu"}, state


@dataclass
class TrainingCode:
    """A batch's code in a TopK-family training step: `f` (a `SparseCode` or a dense `[B, F]`), the
    ReLU pre-activations `pre`, which latents fired and `kept`, the input of the threshold's EMA."""

    ae: TopKBase
    x_BD: torch.Tensor
    f: torch.Tensor | SparseCode
    pre: torch.Tensor
    fired_F: torch.Tensor
    kept: torch.Tensor

    def aux_ranking(self) -> torch.Tensor:
        """What AuxK ranks the dead latents by: the pre-activations (their magnitude when signed)."""
        return self.pre.abs() if self.ae.signed else self.pre

    def decode(self) -> torch.Tensor:
        """`f @ W_dec + b_dec`; on the sparse path from the kept latents' decoder rows only."""
        if isinstance(self.f, SparseCode):
            return self.ae.decode_sparse(self.f)
        return self.ae.decode(self.f).reshape(self.x_BD.shape[0], -1)  # a crosscoder's [B, L, D] as rows

    def decode_dead(self, indices_BK: torch.Tensor, valid_BK: torch.Tensor) -> torch.Tensor:
        """AuxK's reconstruction from the pre-activations at `indices_BK` (zeroed where not valid)."""
        if isinstance(self.f, SparseCode):
            return self.ae.decode_selected(self.x_BD, self.pre, indices_BK, valid_BK)
        return decode_selected_dense(self.ae, self.pre, indices_BK, valid_BK)


def decode_selected_dense(ae: TopKBase, pre_BF, indices_BK, valid_BK) -> torch.Tensor:
    """`pre` kept at `indices_BK` (zeroed where not `valid_BK`) times the decoder, without bias (`pre`:
    the ReLU pre-activations, or the signed ones of an AbsTopK dictionary)."""
    values_BK = pre_BF.gather(-1, indices_BK) * valid_BK
    return torch.zeros_like(pre_BF).scatter(-1, indices_BK, values_BK) @ ae.decoder_FD()


class _LinearTopK(TopKBase):
    """nn.Linear layout shared by AutoEncoderTopK and BatchTopKSAE (keys b_dec, k, threshold, decoder, encoder)."""

    layout = FeatureLayout(
        decoder=("decoder.weight", 1), encoder=("encoder.weight", 0), feature_biases=(("encoder.bias", 0),)
    )
    bias_names = ("b_dec", "encoder.bias", "threshold")
    can_transcode = True

    def __init__(
        self,
        activation_dim: int,
        dict_size: int,
        k: int,
        output_dim: int | None = None,
        transcoder: bool = False,
        skip_connection: bool = False,
    ):
        super().__init__()
        check_sizes(activation_dim, dict_size, k)
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self._init_transcoder(activation_dim, output_dim, transcoder, skip_connection)
        self._init_buffers(k)
        self.decoder = nn.Linear(dict_size, self.output_dim, bias=False)
        self.encoder = nn.Linear(activation_dim, dict_size)
        with torch.no_grad():
            self.decoder.weight /= self.decoder.weight.norm(dim=0, keepdim=True)
            if self.output_dim == activation_dim:
                self.encoder.weight.copy_(self.decoder.weight.T)
            self.encoder.bias.zero_()
        self.b_dec = nn.Parameter(torch.zeros(self.output_dim))

    def relu_pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        self._check_width(x_BD)
        return torch.relu(self.encoder(x_BD - self.input_shift))

    def encoder_weight_bias(self):
        return self.encoder.weight, self.encoder.bias

    def decode(self, x: torch.Tensor) -> torch.Tensor:  # the reference names the code x here: [..., F]
        return self.decoder(x) + self.b_dec

    @classmethod
    def _expected_keys(cls):
        return ("b_dec", "k", "threshold", "decoder.weight", "encoder.weight", "encoder.bias")

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, **kwargs):
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        transcoding = cls._transcoder_kwargs(state_dict, state_dict["decoder.weight"].shape[0])
        return cls(activation_dim, dict_size, int(state_dict["k"]), **transcoding)

    @classmethod
    def from_saelens(cls, weights) -> _LinearTopK:
        """SAELens's topk (AutoEncoderTopK) or batchtopk (BatchTopKSAE) SAE; its b_dec-free input and
        `rescale_acts_by_decoder_norm` are folded into the encoder (outputs equal to float rounding)."""
        cfg, F = weights.cfg, weights.d_sae
        k = int(require_field(cfg, "k", weights.source))
        if k != cfg["k"] or not 0 < k <= F:
            raise CheckpointError(f"{weights.source}: k={cfg['k']!r} must be an integer in [1, d_sae={F}]")
        W_enc, b_enc, W_dec = weights.W_enc, weights.extra["b_enc"] + weights.shift_F, weights.W_dec
        if cfg.get("rescale_acts_by_decoder_norm", False):  # fold ||W_dec row|| into the encoder
            norms_F = W_dec.norm(dim=-1).clamp_min(1e-8)
            W_enc, b_enc, W_dec = W_enc * norms_F, b_enc * norms_F, W_dec / norms_F[:, None]
        ae = cls(weights.d_in, F, k)
        ae.encoder.weight.copy_(W_enc.T)
        ae.encoder.bias.copy_(b_enc)
        ae.decoder.weight.copy_(W_dec.T)
        ae.b_dec.copy_(weights.b_dec)
        if "topk_threshold" in weights.extra:
            ae.threshold.copy_(weights.extra["topk_threshold"])
        return ae

    def _linear_saelens_weights(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.encoder.weight.T, "b_enc": self.encoder.bias, "W_dec": self.decoder.weight.T}


@register_dictionary
class AutoEncoderTopK(_LinearTopK):
    """OpenAI TopK SAE: `f = TopK(ReLU(W_enc (x - b_dec) + b_enc))` per row; exact top-k by default."""

    def encode(self, x: torch.Tensor, return_topk: bool = False, use_threshold: bool = False):
        """With `return_topk`: `(f, top_values_BK, top_indices_BK, relu_pre_BF)`."""
        a_BF = self.relu_pre_activations(x)
        if use_threshold:
            f_BF = apply_threshold(a_BF, self.threshold)
            if not return_topk:
                return f_BF
            values_BK, indices_BK = a_BF.topk(self._k, dim=-1, sorted=False)
        else:
            f_BF, values_BK, indices_BK = row_topk(a_BF, self._k)
            if not return_topk:
                return f_BF
        return f_BF, values_BK, indices_BK, a_BF

    saelens_architecture = "topk"

    def to_saelens(self):
        fields = {"architecture": "topk", "k": self._k, "rescale_acts_by_decoder_norm": False}
        return fields, self._linear_saelens_weights() | {"b_dec": self.b_dec}


@register_dictionary
class AbsTopKSAE(_LinearTopK):
    """AbsTopK SAE (arXiv 2510.00404): the k pre-activations of largest magnitude per row, kept with
    their sign (no ReLU), so one latent can write its direction or its opposite. `use_threshold=True`
    keeps the entries whose magnitude passes the inference threshold instead."""

    signed = True

    def relu_pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        """The signed pre-activations `W_enc (x - b_dec) + b_enc` (no ReLU in this architecture)."""
        self._check_width(x_BD)
        return self.encoder(x_BD - self.input_shift)

    def encode(self, x: torch.Tensor, return_topk: bool = False, use_threshold: bool = False):
        """With `return_topk`: `(f, top_values_BK, top_indices_BK, pre_BF)`, values signed."""
        a_BF = self.relu_pre_activations(x)
        indices_BK = a_BF.abs().topk(self._k, dim=-1, sorted=False).indices
        values_BK = a_BF.gather(-1, indices_BK)
        if use_threshold:
            f_BF = a_BF * (a_BF.abs() > self.threshold)
        else:
            f_BF = torch.zeros_like(a_BF).scatter_(-1, indices_BK, values_BK)
        return (f_BF, values_BK, indices_BK, a_BF) if return_topk else f_BF

    saelens_architecture = "abstopk"

    def to_saelens(self):
        fields = {"architecture": "abstopk", "k": self._k, "rescale_acts_by_decoder_norm": False}
        return fields, self._linear_saelens_weights() | {"b_dec": self.b_dec}


@register_dictionary
class BatchTopKSAE(_LinearTopK):
    """BatchTopK SAE: k * B activations kept across the batch while training; global threshold at inference."""

    batch_selection = True

    def encode(self, x: torch.Tensor, return_active: bool = False, use_threshold: bool = True):
        """With `return_active`: `(f, active_F, relu_pre)` where `active_F` marks features that fired."""
        a_BF = self.relu_pre_activations(x)
        f_BF = apply_threshold(a_BF, self.threshold) if use_threshold else batch_topk(a_BF, self._k)
        if return_active:
            return f_BF, f_BF.reshape(-1, self.dict_size).sum(0) > 0, a_BF
        return f_BF

    saelens_architecture = "batchtopk"

    def to_saelens(self):
        return self._thresholded_saelens(self._linear_saelens_weights())


@register_dictionary
class MatryoshkaBatchTopKSAE(TopKBase):
    """BatchTopK SAE whose features form nested groups; each prefix of groups is trained to reconstruct.

    Bussmann et al. 2025 ("Learning Multi-Level Features with Matryoshka SAEs"). `active_groups`
    (not saved) restricts inference to the first groups.
    """

    batch_selection = True

    layout = FeatureLayout(decoder=("W_dec", 0), encoder=("W_enc", 1), feature_biases=(("b_enc", 0),))
    bias_names = ("b_enc", "b_dec", "threshold")

    def __init__(self, activation_dim: int, dict_size: int, k: int, group_sizes: list[int]):
        super().__init__()
        check_sizes(activation_dim, dict_size, k)
        group_sizes = [int(g) for g in group_sizes]
        if sum(group_sizes) != dict_size or any(g < 1 for g in group_sizes):
            raise ValueError(f"group_sizes must be positive and sum to dict_size={dict_size}, got {group_sizes}")
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.W_enc = nn.Parameter(torch.empty(activation_dim, dict_size))
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(dict_size, activation_dim)))
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        self._init_buffers(k)
        self.register_buffer("group_sizes", torch.tensor(group_sizes, dtype=torch.int64))
        self.active_groups = len(group_sizes)
        self.group_indices = [0] + torch.tensor(group_sizes).cumsum(0).tolist()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            self.W_enc.copy_(self.W_dec.T)

    def architecture_config(self) -> dict[str, Any]:
        return super().architecture_config() | {"group_sizes": self.group_sizes.tolist()}

    def relu_pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        self._check_width(x_BD)
        return torch.relu((x_BD - self.b_dec) @ self.W_enc + self.b_enc)

    def encoder_weight_bias(self):
        return self.W_enc.T, self.b_enc

    def encode(self, x: torch.Tensor, return_active: bool = False, use_threshold: bool = True):
        a_BF = self.relu_pre_activations(x)
        f_BF = apply_threshold(a_BF, self.threshold) if use_threshold else batch_topk(a_BF, self._k)
        end = self.group_indices[self.active_groups]
        if end < self.dict_size:
            f_BF = f_BF.clone()
            f_BF[..., end:] = 0
        if return_active:
            return f_BF, f_BF.reshape(-1, self.dict_size).sum(0) > 0, a_BF
        return f_BF

    def decode(self, x: torch.Tensor) -> torch.Tensor:  # the reference names the code x here: [..., F]
        return x @ self.W_dec + self.b_dec

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.group_indices = [0] + self.group_sizes.cumsum(0).tolist()
        self.active_groups = len(self.group_sizes)

    @classmethod
    def _expected_keys(cls):
        return ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes")

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, **kwargs):
        activation_dim, dict_size = state_dict["W_enc"].shape
        return cls(activation_dim, dict_size, int(state_dict["k"]), state_dict["group_sizes"].tolist())

    def to_saelens(self):
        return self._thresholded_saelens({"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec})
