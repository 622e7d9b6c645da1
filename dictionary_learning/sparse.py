"""The sparse engine: train on the entries of a `[B, F]` code that matter, not the whole code.

`SparseCode` holds the kept entries; the autograd Functions compute a decode and the selected
pre-activations with backwards that touch only the used rows (`sampled_products`, `feature_sums`,
optionally in Triton kernels: `USE_TRITON`). `active_entries`/`sparse_entries` decide when a step is
sparse enough to take this path. Values and gradients equal the dense computation.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------ sparse TopK codes
class SparseCode(NamedTuple):
    """The kept entries of a `[B, F]` code, grouped by row: entry n is `(rows[n], features[n], values[n])`.

    `offsets[b]` is where row b's entries start (the layout of `torch.nn.functional.embedding_bag`).
    TopK codes have exactly k entries per row; BatchTopK codes have k * B in all, spread unevenly.
    """

    values: torch.Tensor  # [N], differentiable
    features: torch.Tensor  # [N] int64
    rows: torch.Tensor  # [N] int64, non-decreasing
    offsets: torch.Tensor  # [B] int64
    dict_size: int

    @property
    def n_rows(self) -> int:
        return self.offsets.shape[0]

    def to_dense(self) -> torch.Tensor:
        """The `[B, F]` code (differentiable in `values`)."""
        flat = self.rows * self.dict_size + self.features
        out = self.values.new_zeros(self.n_rows * self.dict_size)
        return out.index_put((flat,), self.values).view(self.n_rows, self.dict_size)

    def row_sums(self, values_N: torch.Tensor | None = None) -> torch.Tensor:
        """`[B]` sums of each row's entries (of `values_N`, default the code's values); differentiable."""
        values_N = self.values if values_N is None else values_N
        return values_N.new_zeros(self.n_rows).index_add(0, self.rows, values_N)

    def fired(self) -> torch.Tensor:
        """`[F]` bool: features with a nonzero value in some row (signed codes fire both ways)."""
        nonzero_N = (self.values.detach() != 0).float()
        return nonzero_N.new_zeros(self.dict_size).index_add_(0, self.features, nonzero_N) > 0


# The Triton kernels of `triton_kernels.py` for the two backward primitives below, on CUDA tensors
# (on any tensor under TRITON_INTERPRET=1). Off by default: they are checked against the PyTorch path
# (tests/test_fast_paths.py) but not yet timed on a GPU. DICTIONARY_LEARNING_TRITON=1 switches them on.
USE_TRITON = os.environ.get("DICTIONARY_LEARNING_TRITON", "") == "1"


def _triton_kernels(x: torch.Tensor):
    """The Triton kernel module when `USE_TRITON` is on and `x` is on a device they run on, else None."""
    if not USE_TRITON or not (x.is_cuda or os.environ.get("TRITON_INTERPRET", "") == "1"):
        return None
    try:
        from . import triton_kernels
    except ImportError as e:
        raise ImportError(
            f"DICTIONARY_LEARNING_TRITON=1 (sparse.USE_TRITON) needs the triton package ({e}); "
            "pip install triton, or unset it to use the PyTorch path"
        ) from e
    return triton_kernels


def per_entry(values_F: torch.Tensor, features_N: torch.Tensor) -> torch.Tensor:
    """`values_F[features_N]` with a deterministic backward: indexing's backward accumulates with
    parallel atomic adds on CPU (run-to-run different sums from about 32k entries on), `index_select`'s
    with `index_add_`, in order."""
    return torch.index_select(values_F, 0, features_N)


def feature_sums(weights_N: torch.Tensor, src_BD: torch.Tensor, rows_N, features_N, n_features: int) -> torch.Tensor:
    """`[F, D]` sums `out[f] = sum over entries n of feature f of weights[n] * src[rows[n]]`, i.e. `code.T @ src`.

    The entries are grouped by feature with one stable sort, then summed by `embedding_bag`, which
    reads each source row once per entry: no `[N, D]` intermediate and no dense `[F, B]` matmul.
    """
    sorted_N, order_N = torch.sort(features_N, stable=True)
    # bounds[f] .. bounds[f + 1] are feature f's entries in sorted order; searchsorted, not bincount:
    # bincount sizes its output from the data, a host sync on GPUs
    bounds = torch.searchsorted(sorted_N, torch.arange(n_features + 1, device=features_N.device))
    rows_N, weights_N = rows_N[order_N], weights_N[order_N]
    kernels = _triton_kernels(src_BD)
    if kernels is not None:
        return kernels.group_sums(weights_N, src_BD, rows_N, bounds)
    return F.embedding_bag(rows_N, src_BD.contiguous(), bounds[:-1], mode="sum", per_sample_weights=weights_N)


def sampled_products(a_BD: torch.Tensor, W_FD: torch.Tensor, rows_N, features_N, offsets_B) -> torch.Tensor:
    """`(a @ W.T)[rows, features]` for the listed entries only (a sampled dense-dense matmul):
    `torch.sparse.sampled_addmm` on CPU, the Triton kernel when it is switched on, else the
    backward of `embedding_bag` (which forms the same per-entry dot products)."""
    kernels = _triton_kernels(a_BD)
    if kernels is not None:
        return kernels.sampled_products(a_BD, W_FD, rows_N, features_N)
    if a_BD.device.type == "cpu":
        return sampled_products_csr(a_BD, W_FD, features_N, offsets_B)
    return sampled_products_portable(a_BD, W_FD, features_N, offsets_B)


def sampled_products_csr(a_BD: torch.Tensor, W_FD: torch.Tensor, features_N, offsets_B) -> torch.Tensor:
    """`sampled_products` through a CSR pattern and `torch.sparse.sampled_addmm` (CPU)."""
    n = features_N.shape[0]
    crow = torch.cat([offsets_B, offsets_B.new_tensor([n])])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, features_N, a_BD.new_zeros(n), (a_BD.shape[0], W_FD.shape[0]))
        return torch.sparse.sampled_addmm(pattern, a_BD, W_FD.T, beta=0.0).values()


def sampled_products_portable(a_BD: torch.Tensor, W_FD: torch.Tensor, features_N, offsets_B) -> torch.Tensor:
    """`sampled_products` as the gradient of `embedding_bag`'s per-sample weights (any device)."""
    with torch.enable_grad():
        weights = a_BD.new_zeros(features_N.shape[0], requires_grad=True)
        out = F.embedding_bag(features_N, W_FD.contiguous(), offsets_B, mode="sum", per_sample_weights=weights)
        return torch.autograd.grad(out, weights, a_BD)[0]


class _SparseDecode(torch.autograd.Function):
    """`code @ W_FD` from the kept entries; backward touches only the used rows of `W_FD`."""

    @staticmethod
    def forward(ctx, values_N, W_FD, rows_N, features_N, offsets_B):
        W = W_FD.contiguous()  # embedding_bag has a fast kernel only for a contiguous table
        ctx.save_for_backward(values_N, W, rows_N, features_N, offsets_B)
        return F.embedding_bag(features_N, W, offsets_B, mode="sum", per_sample_weights=values_N)

    @staticmethod
    def backward(ctx, grad_BD):
        values_N, W, rows_N, features_N, offsets_B = ctx.saved_tensors
        grad_BD = grad_BD.to(W.dtype).contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = sampled_products(grad_BD, W, rows_N, features_N, offsets_B)
        if ctx.needs_input_grad[1]:
            grad_W = feature_sums(values_N, grad_BD, rows_N, features_N, W.shape[0])
        return grad_values, grad_W, None, None, None


def sparse_decode(code: SparseCode, W_FD: torch.Tensor, feature_mask_F: torch.Tensor | None = None) -> torch.Tensor:
    """`code @ W_FD` touching only the kept rows of `W_FD` (no bias). Gradients reach `code.values`
    and only the used rows of `W_FD`. With `feature_mask_F` (a Matryoshka group), features outside
    the mask count as 0."""
    values = code.values.to(W_FD.dtype)
    if feature_mask_F is not None:
        values = values * per_entry(feature_mask_F, code.features)
    return _SparseDecode.apply(values, W_FD, code.rows, code.features, code.offsets)


class _SelectedPreactivations(torch.autograd.Function):
    """Entries `pre[rows[n], features[n]]` of `(x - b_in) @ W_FD.T + b_F`, already computed without autograd.

    Backward touches only the selected rows of `W_FD`: `dW[f] += g[n] * (x - b_in)[rows[n]]`,
    `db[f] += g[n]`, `db_in = -db @ W`; the dense backward would need a `[F, B] @ [B, D]` matmul.
    """

    @staticmethod
    def forward(ctx, x_BD, b_in_D, W_FD, b_F, pre_N, rows_N, features_N, offsets_B):
        ctx.save_for_backward(x_BD, b_in_D, W_FD, rows_N, features_N, offsets_B)
        return pre_N.clone()

    @staticmethod
    def backward(ctx, grad_N):
        x_BD, b_in_D, W_FD, rows_N, features_N, offsets_B = ctx.saved_tensors
        need_x, need_b_in, need_W, need_b = ctx.needs_input_grad[:4]
        grad_N = grad_N.to(W_FD.dtype)
        grad_x = grad_b_in = grad_W = grad_b = None
        if need_b or need_b_in:
            grad_b = grad_N.new_zeros(W_FD.shape[0]).index_add_(0, features_N, grad_N)
        if need_b_in:
            grad_b_in = -(grad_b @ W_FD)
        if need_W:
            x_centered = x_BD.to(W_FD.dtype) if b_in_D is None else (x_BD - b_in_D).to(W_FD.dtype)
            grad_W = feature_sums(grad_N, x_centered, rows_N, features_N, W_FD.shape[0])
        if need_x:
            W = W_FD.contiguous()
            grad_x = F.embedding_bag(features_N, W, offsets_B, mode="sum", per_sample_weights=grad_N).to(x_BD.dtype)
        return grad_x, grad_b_in, grad_W, grad_b if need_b else None, None, None, None, None


def selected_preactivations(
    x_BD: torch.Tensor,
    W_FD: torch.Tensor,
    b_F: torch.Tensor | None,
    pre_BF: torch.Tensor,
    rows_N,
    features_N,
    offsets_B,
    b_in_D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable `((x - b_in) @ W_FD.T + b_F)[rows, features]`, read from `pre_BF` (computed without
    autograd); rows must be grouped as `offsets_B` says. `b_F`/`b_in_D` may be None (no such bias)."""
    pre_N = pre_BF[rows_N, features_N]
    return _SelectedPreactivations.apply(x_BD, b_in_D, W_FD, b_F, pre_N, rows_N, features_N, offsets_B)


def per_row_entries(indices_BK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows_N, features_N, offsets_B) of K chosen features in every row."""
    B, K = indices_BK.shape
    rows_B = torch.arange(B, device=indices_BK.device)
    return rows_B.repeat_interleave(K), indices_BK.flatten(), rows_B * K


def row_topk_entries(pre_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows_N, features_N, offsets_B) of each row's k largest entries."""
    return per_row_entries(pre_BF.topk(k, dim=-1, sorted=False).indices)


def batch_topk_entries(pre_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows_N, features_N, offsets_B) of the `k * B` largest entries of the whole batch.

    On CPU a full top-(k * B) over B * F entries costs several dense passes, so a lower bound of the
    cut-off comes first: the (k * B)-th largest of each row's 2k largest entries (a subset of the
    batch, so its (k * B)-th largest is never above the batch's). Only entries at or above that bound
    are ranked. On accelerators the full selection runs directly (the narrowing needs a host sync).
    """
    B, F_ = pre_BF.shape
    n = min(k * B, B * F_)
    flat = pre_BF.flatten()
    if pre_BF.device.type == "cpu" and 2 * k < F_:
        candidates = pre_BF.topk(2 * k, dim=-1, sorted=False).values.flatten()
        bound = candidates.topk(n, sorted=False).values.min()
        index = (flat >= bound).nonzero().squeeze(1)  # ascending, so already grouped by row
        if index.numel() > n:
            index = index[flat[index].topk(n, sorted=False).indices].sort().values
    else:
        index = flat.topk(n, sorted=False).indices.sort().values
    return _entries_of_flat_index(index, B, F_)


def _entries_of_flat_index(index_N: torch.Tensor, B: int, F_: int):
    """(rows_N, features_N, offsets_B) of ascending flat indices into a `[B, F]` array."""
    rows_N = torch.div(index_N, F_, rounding_mode="floor")
    return rows_N, index_N - rows_N * F_, torch.searchsorted(rows_N, torch.arange(B, device=index_N.device))


# ------------------------------------------------------------------- sparse activations on CPU
# Above this fraction of non-zero features the dense matmuls win on CPU (measured break-even ~0.15 on
# 2 cores at B=4096, D=576, F=4608; see benchmarks/train_step.py --l0).
SPARSE_MAX_DENSITY = 0.12


def active_entries(mask_BF: torch.Tensor, max_density: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows_N, features_N, offsets_B) of the True entries of a 2-D mask, in row-major order, or None
    when the sparse path should not run: off CPU (finding them needs the count on the host), with
    `max_density <= 0`, or when more than `max_density` of the entries are True."""
    if not sparse_allowed(mask_BF, max_density) or int(mask_BF.count_nonzero()) > max_density * mask_BF.numel():
        return None
    return _entries_of_flat_index(mask_BF.flatten().nonzero().squeeze(1), *mask_BF.shape)


# Rows of a strided sample whose density is checked before the whole mask is built.
DENSITY_SAMPLE_ROWS = 256


def sparse_entries(mask_of: Callable[[slice], torch.Tensor], x: torch.Tensor, max_density: float):
    """`active_entries` of the `[B, F]` mask that `mask_of(rows)` builds for a slice of rows, or None.

    A strided sample of about `DENSITY_SAMPLE_ROWS` rows is checked first: when it is more than twice
    as dense as allowed, the step is dense and the whole mask (several passes over `[B, F]` for
    JumpReLU) is never built. A misjudged sample only costs speed, never correctness.
    """
    if not sparse_allowed(x, max_density):
        return None
    stride = x.shape[0] // DENSITY_SAMPLE_ROWS
    if stride > 1:
        sample = mask_of(slice(None, None, stride))
        if int(sample.count_nonzero()) > 2 * max_density * sample.numel():
            return None
    return active_entries(mask_of(slice(None)), max_density)


def sparse_allowed(x: torch.Tensor, max_density: float) -> bool:
    """Whether a sparse path may run at all (checked before any mask is built)."""
    return max_density > 0 and x.device.type == "cpu"
