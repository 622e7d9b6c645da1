"""Cross-layer transcoders (Anthropic 2025, "Circuit Tracing"; Ameisen et al.): the replacement for
every MLP of a model at once.

A CLT reads the MLP input of each of L layers and writes the MLP outputs: latent f of source layer s
reads `x_s` (layer s's MLP input) and writes to the MLP outputs of layers s, s+1, ..., L-1. So

    a_s = act(x_s @ W_enc[s] + b_enc[s])                 [..., F] per source layer
    y_l = b_dec[l] + sum over s <= l of a_s @ W_dec[s][:, l - s]

Batches are `[B, L, 2, D]` (each layer's MLP input and output: a buffer or cache reading every MLP
with io="in_and_out", stacked) or pairs `(inputs [B, L, D], outputs [B, L, D])`;
`encode(inputs) -> [B, L, F]`, `decode(codes) -> [B, L, D]`.

The decoder of source layer s is one parameter `W_dec.{s}` of shape `[F, L - s, D]`: a latent's
rows for all the layers it writes to are contiguous, so the sparse path (`decode_sparse`) reads
and updates only the active latents' rows. These are circuit-tracer's shapes (`W_dec_{s}`), and
`dict_size` is F, the latents of one layer (L * F in all).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F_
from torch import nn

from ..ops import JumpReLUFunction
from .base import Dictionary, check_sizes, register_dictionary
from .topk import batch_topk


class _SumWrites(torch.autograd.Function):
    """`out[:, l] = b_dec[l] + sum over s <= l of writes[s][:, l - s]` for the per-source writes
    `[N, L - s, D]`; the backward hands each source a view of the output's gradient (an in-place
    sum on slices would copy the whole gradient once per source)."""

    @staticmethod
    def forward(ctx, b_dec_LD, *writes):
        N, (L, D) = writes[0].shape[0], b_dec_LD.shape
        out = b_dec_LD.expand(N, L, D).clone()
        for s, written in enumerate(writes):
            out[:, s:] += written
        return out

    @staticmethod
    def backward(ctx, grad_NLD):
        L = grad_NLD.shape[1]
        return (grad_NLD.sum(0), *(grad_NLD[:, s:] for s in range(L)))


class CrossLayerTranscoderBase(Dictionary):
    """Parameters, shapes, the dense decoder and the sparse one, shared by the CLT activations."""

    layout = None  # per-(layer, latent) decoders of different lengths: no one [F, D] decoder view
    transcoder = True
    bias_names: ClassVar[tuple[str, ...]] = ("b_enc", "b_dec")

    def _init_clt(self, activation_dim: int, dict_size: int, num_layers: int) -> None:
        check_sizes(activation_dim, dict_size)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        L, D, F = num_layers, activation_dim, dict_size
        self.activation_dim, self.dict_size, self.num_layers = D, F, L
        # Each latent starts reading and writing one random unit direction at its own layer; its rows for
        # later layers start small (norm about 0.1 each), so the model is nearly a per-layer transcoder at first.
        directions = torch.randn(L, F, D)
        directions /= directions.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(directions.transpose(1, 2).contiguous())  # [L, D, F]
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        decoders = []
        for s in range(L):
            W = torch.randn(F, L - s, D) * (0.1 / D**0.5)
            W[:, 0] = directions[s]
            decoders.append(nn.Parameter(W))
        self.W_dec = nn.ParameterList(decoders)
        self.b_dec = nn.Parameter(torch.zeros(L, D))

    # ------------------------------------------------------------------------------------ shapes
    def check_layers(self, x: torch.Tensor, width: int | None = None, what: str = "MLP inputs") -> None:
        """`x` must be `[..., L, width]` (width: activation_dim); the error names the fix."""
        L, D = self.num_layers, width or self.activation_dim
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or tuple(x.shape[-2:]) != (L, D):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} reads {what} of shape [..., num_layers={L}, {D}], got {shape}: read every "
                f"layer's MLP (a buffer or cache over all {L} MLPs with io='in_and_out', stack_sites=True)"
            )

    def _check_layer(self, x: torch.Tensor, layer: int) -> None:
        if not 0 <= layer < self.num_layers or x.ndim < 1 or x.shape[-1] != self.activation_dim:
            raise ValueError(
                f"layer {layer} of {self.num_layers}: expected MLP inputs [..., {self.activation_dim}], "
                f"got {tuple(x.shape)}"
            )

    @property
    def output_dim(self) -> int:
        return self.activation_dim

    @output_dim.setter
    def output_dim(self, value: int) -> None:
        if value != self.activation_dim:
            raise ValueError("a cross-layer transcoder writes MLP outputs as wide as its inputs")

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., L, D]` MLP inputs -> `[..., L, F]`: `x_s @ W_enc[s] + b_enc[s]` for each layer s."""
        self.check_layers(x)
        lead = x.shape[:-2]
        x_LND = x.reshape(-1, self.num_layers, self.activation_dim).transpose(0, 1)
        pre_LNF = torch.baddbmm(self.b_enc.unsqueeze(1), x_LND, self.W_enc)
        return pre_LNF.transpose(0, 1).reshape(*lead, self.num_layers, self.dict_size)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """`[..., L, F]` codes -> `[..., L, D]` MLP outputs (dense: every latent's rows)."""
        self.check_layers(f, self.dict_size, "codes")
        L, D = self.num_layers, self.activation_dim
        lead = f.shape[:-2]
        f_NLF = f.reshape(-1, L, self.dict_size)
        writes = [(f_NLF[:, s] @ self.W_dec[s].reshape(self.dict_size, -1)).view(-1, L - s, D) for s in range(L)]
        return _SumWrites.apply(self.b_dec, *writes).reshape(*lead, L, D)

    def decode_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The decoder from each row's active latents only: `indices`/`values` `[N, L, K]` (latent
        ids and their activations per source layer; a value of 0 adds nothing) -> `[N, L, D]`. Reads
        and (in backward) writes only those latents' decoder rows."""
        N, L, D = indices.shape[0], self.num_layers, self.activation_dim
        if indices.ndim != 3 or indices.shape[1] != L or values.shape != indices.shape:
            raise ValueError(f"decode_sparse takes indices and values [N, {L}, K], got {tuple(indices.shape)} and "
                             f"{tuple(values.shape)}")  # fmt: skip
        writes = [
            F_.embedding_bag(
                indices[:, s], self.W_dec[s].view(self.dict_size, -1), per_sample_weights=values[:, s], mode="sum"
            ).view(N, L - s, D)
            for s in range(L)
        ]
        return _SumWrites.apply(self.b_dec, *writes)

    def decode_active(self, f: torch.Tensor) -> torch.Tensor:
        """`[N, L, F]` codes -> `[N, L, D]` from each row's non-zero latents only, however many a row
        has (a BatchTopK code), with no padding: reads and (in backward) writes only their decoder rows."""
        self.check_layers(f, self.dict_size, "codes")
        if f.ndim != 3:
            raise ValueError(
                f"decode_active takes codes [N, {self.num_layers}, {self.dict_size}], got {tuple(f.shape)}"
            )
        N, L, D = f.shape[0], self.num_layers, self.activation_dim
        writes = []
        for s in range(L):
            rows, latents = f[:, s].detach().nonzero(as_tuple=True)  # row-major: each row's latents together
            starts = torch.zeros(N, dtype=torch.long, device=f.device)
            starts[1:] = torch.bincount(rows, minlength=N).cumsum(0)[:-1]
            written = F_.embedding_bag(latents, self.W_dec[s].view(self.dict_size, -1), starts,
                                       per_sample_weights=f[:, s][rows, latents], mode="sum")  # fmt: skip
            writes.append(written.view(N, L - s, D))
        return _SumWrites.apply(self.b_dec, *writes)

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """One source layer's code `[..., F]` from that layer's MLP input `[..., D]` (what a forward
        pass with the CLT in place of every MLP computes when it reaches the layer)."""
        self._check_layer(x, layer)
        pre = torch.addmm(self.b_enc[layer], x.reshape(-1, self.activation_dim), self.W_enc[layer])
        return self._activate(pre, layer).reshape(*x.shape[:-1], self.dict_size)

    def decode_layer(self, codes: list[torch.Tensor], layer: int) -> torch.Tensor:
        """Layer `layer`'s MLP output `[..., D]` from the codes of source layers 0..layer (a list)."""
        out = self.b_dec[layer]
        for s, f in enumerate(codes[: layer + 1]):
            out = out + f @ self.W_dec[s][:, layer - s]
        return out

    def _activate(self, pre: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """The activation of pre-activations `[..., L, F]`, or `[..., F]` of one `layer`."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., L, D]` MLP inputs -> `[..., L, F]` codes."""
        return self._activate(self.pre_activations(x))

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """Every layer's MLP output `[..., L, D]` from every layer's MLP input."""
        f = self.encode(x)
        y = self.decode(f)
        return (y, f) if output_features else y

    def decoder_norms(self) -> torch.Tensor:
        """`[L, F]`: the norm of each latent's whole decoder (its rows for every layer it writes to)."""
        return torch.stack([W.flatten(1).norm(dim=-1) for W in self.W_dec])

    def decoder_norms_by_target(self) -> torch.Tensor:
        """`[L_source, F, L_target]`: the norm of each latent's row for each layer (0 before its own)."""
        L = self.num_layers
        return torch.stack([F_.pad(W.norm(dim=-1), (s, 0)) for s, W in enumerate(self.W_dec)])[..., :L]

    def skip(self, x: torch.Tensor) -> float:
        return 0.0

    # ------------------------------------------------------------------------------------- files
    def architecture_config(self) -> dict[str, Any]:
        return {
            "dict_class": type(self).__name__,
            "activation_dim": self.activation_dim,
            "dict_size": self.dict_size,
            "num_layers": self.num_layers,
            "transcoder": True,
        }

    @classmethod
    def _expected_keys(cls) -> tuple[str, ...]:
        return ("W_enc", "b_enc", "b_dec", "W_dec.0")

    @classmethod
    def _keys_of(cls, keys: set[str]) -> tuple[str, ...]:
        layers = sum(1 for key in keys if key.startswith("W_dec.") and key[6:].isdigit())
        return (*cls._expected_keys()[:3], *(f"W_dec.{s}" for s in range(max(layers, 1))))

    @classmethod
    def _shapes_fit(cls, state_dict) -> bool:
        return state_dict["W_enc"].ndim == 3

    @classmethod
    def _sizes(cls, state_dict) -> tuple[int, int, int]:
        """(activation_dim, dict_size, num_layers) of a state dict, with its decoders checked."""
        L, D, F = state_dict["W_enc"].shape
        for s in range(L):
            W = state_dict.get(f"W_dec.{s}")
            if W is None or tuple(W.shape) != (F, L - s, D):
                got = "missing" if W is None else tuple(W.shape)
                raise ValueError(f"W_dec.{s} should be [{F}, {L - s}, {D}] for W_enc [{L}, {D}, {F}], got {got}")
        return D, F, L

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_layers={self.num_layers}"


@register_dictionary
class TopKCrossLayerTranscoder(CrossLayerTranscoderBase):
    """CLT whose latents of each source layer are the k largest ReLU pre-activations of that layer
    (k per layer, per token). circuit-tracer loads JumpReLU CLTs: `circuit_export.export_circuit_tracer`
    writes one whose thresholds keep about k latents per layer on held-out activations."""

    def __init__(self, activation_dim: int, dict_size: int, num_layers: int, k: int):
        super().__init__()
        check_sizes(activation_dim, dict_size, k)
        self._init_clt(activation_dim, dict_size, num_layers)
        self.register_buffer("k", torch.tensor(k, dtype=torch.long))
        self._k = int(k)  # read every step without a device sync (the buffer is what files keep)

    @property
    def active_k(self) -> int:
        """k as a Python int (the `k` buffer without a device read)."""
        return self._k

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._k = int(self.k)

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, indices `[..., L, k]` of each layer's k largest ReLU pre-activations, pre `[..., L, F]`)."""
        pre = self.pre_activations(x)
        values, indices = torch.relu(pre).topk(self._k, dim=-1, sorted=False)
        return values, indices, pre

    def _activate(self, pre, layer=None):
        values, indices = torch.relu(pre).topk(self._k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def architecture_config(self) -> dict[str, Any]:
        return super().architecture_config() | {"k": self._k}

    @classmethod
    def _expected_keys(cls) -> tuple[str, ...]:
        return ("W_enc", "b_enc", "b_dec", "k", "W_dec.0")

    @classmethod
    def _keys_of(cls, keys: set[str]) -> tuple[str, ...]:
        return (*super()._keys_of(keys), "k")

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, **kwargs):
        D, F, L = cls._sizes(state_dict)
        return cls(D, F, L, int(state_dict["k"]))


@register_dictionary
class JumpReluCrossLayerTranscoder(CrossLayerTranscoderBase):
    """CLT with a JumpReLU per latent: `a = pre * 1[pre > threshold]` (thresholds `[L, F]`,
    positive); circuit-tracer's native CLT. Trained with Anthropic's tanh sparsity penalty weighted
    by each latent's whole decoder norm (`JumpReluCLTTrainer`)."""

    bias_names = ("b_enc", "b_dec", "threshold")

    def __init__(self, activation_dim: int, dict_size: int, num_layers: int, threshold: float = 0.03):
        super().__init__()
        self._init_clt(activation_dim, dict_size, num_layers)
        self.threshold = nn.Parameter(torch.full((num_layers, dict_size), float(threshold)))

    def jump(self, pre: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
        """JumpReLU of `[..., L, F]` pre-activations; with a bandwidth, the straight-through threshold gradient."""
        if bandwidth is None:
            return pre * (pre > self.threshold)
        return JumpReLUFunction.apply(pre, self.threshold, bandwidth)

    def _activate(self, pre, layer=None):
        return self.jump(pre) if layer is None else pre * (pre > self.threshold[layer])

    @classmethod
    def _expected_keys(cls) -> tuple[str, ...]:
        return ("W_enc", "b_enc", "b_dec", "threshold", "W_dec.0")

    @classmethod
    def _keys_of(cls, keys: set[str]) -> tuple[str, ...]:
        return (*super()._keys_of(keys), "threshold")

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, **kwargs):
        D, F, L = cls._sizes(state_dict)
        return cls(D, F, L)


@register_dictionary
class BatchTopKCrossLayerTranscoder(TopKCrossLayerTranscoder):
    """CLT trained with batch-level top-k per source layer: over a batch of N tokens, each layer keeps
    its k * N largest ReLU pre-activations, so a token may use more or fewer than k of a layer's
    latents (k on average). Inference keeps the latents above each layer's `threshold` `[L]`: the
    EMA of the smallest kept activation that `BatchTopKCLTTrainer` tracks. While a layer's threshold
    is unset (negative: before tracking starts), `encode` applies the batch rule to the batch given."""

    bias_names = ("b_enc", "b_dec", "threshold")

    def __init__(self, activation_dim: int, dict_size: int, num_layers: int, k: int):
        super().__init__(activation_dim, dict_size, num_layers, k)
        self.register_buffer("threshold", torch.full((num_layers,), -1.0))

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        """The training code of `[..., L, F]` pre-activations: per layer, the k * N largest ReLU
        values of the N rows (gradients flow to the kept pre-activations)."""
        L, F = self.num_layers, self.dict_size
        a_LM = torch.relu(pre).reshape(-1, L, F).transpose(0, 1).reshape(L, -1)  # [L, N * F]
        kept = min(a_LM.shape[1] // F * self._k, a_LM.shape[1])
        values, indices = a_LM.topk(kept, dim=-1, sorted=False)
        f_LM = torch.zeros_like(a_LM).scatter(-1, indices, values)
        return f_LM.view(L, -1, F).transpose(0, 1).reshape(pre.shape)

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, indices `[N, L, K]`, pre `[N, L, F]`) of the batch's code, K the most latents any
        row keeps in one layer (padded with zeros, which add nothing to `decode_sparse`; training
        decodes with `decode_active`, which needs no padding)."""
        pre = self.pre_activations(x)
        f = self.batch_topk(pre)
        width = max(int((f > 0).sum(-1).max()), 1)
        values, indices = f.topk(width, dim=-1, sorted=False)
        return values, indices, pre

    def _activate(self, pre, layer=None):
        threshold = self.threshold if layer is None else self.threshold[layer]
        if bool((threshold < 0).any()):
            if layer is None:
                return self.batch_topk(pre)
            return batch_topk(pre.reshape(-1, self.dict_size), self._k).view_as(pre)
        a = torch.relu(pre)
        return a * (a > (threshold if layer is not None else threshold.unsqueeze(-1)))

    @classmethod
    def _expected_keys(cls) -> tuple[str, ...]:
        return ("W_enc", "b_enc", "b_dec", "k", "threshold", "W_dec.0")

    @classmethod
    def _keys_of(cls, keys: set[str]) -> tuple[str, ...]:
        return (*super()._keys_of(keys), "threshold")
