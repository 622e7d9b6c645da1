"""Pure tensor functions shared by the trainers: each piece of math written once and tested once."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- decoder-norm constraint
@torch.no_grad()
def unit_norm_rows_(W_FD: torch.Tensor) -> torch.Tensor:
    """Divide each row (feature direction) by its norm, in place; eps = the dtype's machine epsilon."""
    W_FD.div_(W_FD.norm(dim=-1, keepdim=True) + torch.finfo(W_FD.dtype).eps)
    return W_FD


@torch.no_grad()
def remove_parallel_grad_(W_FD: torch.Tensor, grad_FD: torch.Tensor) -> torch.Tensor:
    """Remove from each row's gradient its component along that row, in place.

    Keeps a unit-norm decoder on its sphere to first order (Bricken et al. 2023, "Towards
    Monosemanticity", appendix on the decoder-norm constraint).
    """
    W_hat_FD = W_FD / (W_FD.norm(dim=-1, keepdim=True) + 1e-6)
    grad_FD.sub_((grad_FD * W_hat_FD).sum(-1, keepdim=True) * W_hat_FD)
    return grad_FD


# -------------------------------------------------------------------------------- initialisation
@torch.no_grad()
def geometric_median(points_ND: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to the rows (Weiszfeld's iteration).

    Used to initialise `b_dec` of TopK-family SAEs (Gao et al. 2024, section 2.1 / appendix A).
    """
    points_ND = points_ND.float()
    guess_D = points_ND.mean(dim=0)
    for _ in range(max_iter):
        previous_D = guess_D
        weights_N = 1.0 / (points_ND - guess_D).norm(dim=1).clamp_min(1e-12)
        weights_N = weights_N / weights_N.sum()
        guess_D = (weights_N[:, None] * points_ND).sum(dim=0)
        if (guess_D - previous_D).norm() < tol:
            break
    return guess_D


# ---------------------------------------------------------------------------------- sparsity terms
def auxk_loss(
    residual_BD: torch.Tensor,
    pre_BF: torch.Tensor,
    dead_F: torch.Tensor,
    k_aux: int,
    decode_dead: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """AuxK loss of Gao et al. 2024 (appendix A.2): dead latents' top-k_aux reconstruct the residual.

    `pre_BF` ranks the latents (values need no gradient); `decode_dead(indices_BK, valid_BK)` returns
    the reconstruction (decoder without bias, differentiable) from the ReLU activations of those
    latents, entries with `valid_BK` False counting as 0. Returns `(normalised, raw)`: raw = mean
    squared error of that reconstruction of the detached residual; normalised divides it by the
    residual's variance so that the coefficient (1/32 in appendix B.1) does not depend on scale.
    Both are 0 (raw: -1) when no latent is dead. Computed without host synchronisation.
    """
    k_aux = min(k_aux, dead_F.numel())
    masked_BF = torch.where(dead_F, pre_BF.detach(), torch.full_like(pre_BF, -torch.inf))
    values_BK, indices_BK = masked_BF.topk(k_aux, dim=-1, sorted=False)
    # Entries beyond the number of dead latents are -inf: they contribute nothing.
    recon_BD = decode_dead(indices_BK, torch.isfinite(values_BK))
    raw = (residual_BD.float() - recon_BD.float()).pow(2).sum(-1).mean()
    scale = (residual_BD.float() - residual_BD.float().mean(0)).pow(2).sum(-1).mean()
    any_dead = dead_F.any()
    normalised = torch.where(any_dead, (raw / scale).nan_to_num(0.0), torch.zeros_like(raw))
    return normalised, torch.where(any_dead, raw, torch.full_like(raw, -1.0))


def lp_norm(f_BF: torch.Tensor, p: float, kind: str = "Lp") -> torch.Tensor:
    """Sparsity penalty for p-annealing: `"Lp^p"` = mean_b sum_F f^p, `"Lp"` = mean_b (sum_F f^p)^(1/p).

    At `p = 0` both count non-zero features (L0); the reference divides by zero there with its
    default `p_end=0` and `"Lp"`.
    """
    if kind not in ("Lp", "Lp^p"):
        raise ValueError(f"sparsity_function must be 'Lp' or 'Lp^p', got {kind!r}")
    v = f_BF.values if isinstance(f_BF, SparseCode) else f_BF
    v = (v != 0).to(v.dtype) if p == 0 else v.pow(p)
    s_B = f_BF.row_sums(v) if isinstance(f_BF, SparseCode) else v.sum(-1)
    return s_B.mean() if p == 0 or kind == "Lp^p" else s_B.pow(1.0 / p).mean()


def fired_features(f_BF) -> torch.Tensor:
    """`[F]` bool: features with a positive value in some row of a `[..., F]` code or a `SparseCode`."""
    if isinstance(f_BF, SparseCode):
        return f_BF.fired()
    return (f_BF.detach().reshape(-1, f_BF.shape[-1]) > 0).any(0)


def row_sums(f_BF, weight_F: torch.Tensor | None = None) -> torch.Tensor:
    """`[B]` row sums of a `[B, F]` code or a `SparseCode`, each feature weighted by `weight_F` if given."""
    if isinstance(f_BF, SparseCode):
        return f_BF.row_sums(None if weight_F is None else f_BF.values * weight_F[f_BF.features])
    return (f_BF if weight_F is None else f_BF * weight_F).sum(-1)


# ------------------------------------------------------------------------ JumpReLU estimators
def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """`x * 1[x > theta]`; straight-through gradient for theta (Rajamanoharan et al. 2024, eq. 11)."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold)

    @staticmethod
    def backward(ctx, grad_out):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_x = (x > threshold) * grad_out
        grad_theta = -(threshold / bw) * _rectangle((x - threshold) / bw) * grad_out
        return grad_x, _sum_to(grad_theta, threshold), None


class StepFunction(torch.autograd.Function):
    """`1[x > theta]`; gradient only to theta, `-(1/eps) * rect((x - theta)/eps)` (eq. 12)."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_theta = -(1.0 / bw) * _rectangle((x - threshold) / bw) * grad_out
        return torch.zeros_like(x), _sum_to(grad_theta, threshold), None


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of `like` (the per-feature threshold)."""
    return grad.reshape(-1, *like.shape).sum(0) if grad.shape != like.shape else grad


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
        """`[F]` bool: features with a positive value in some row."""
        positive_N = (self.values.detach() > 0).float()
        return positive_N.new_zeros(self.dict_size).index_add_(0, self.features, positive_N) > 0


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
            f"DICTIONARY_LEARNING_TRITON=1 (ops.USE_TRITON) needs the triton package ({e}); "
            "pip install triton, or unset it to use the PyTorch path"
        ) from e
    return triton_kernels


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
        values = values * feature_mask_F[code.features]
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
    if not _sparse_allowed(mask_BF, max_density) or int(mask_BF.count_nonzero()) > max_density * mask_BF.numel():
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
    if not _sparse_allowed(x, max_density):
        return None
    stride = x.shape[0] // DENSITY_SAMPLE_ROWS
    if stride > 1:
        sample = mask_of(slice(None, None, stride))
        if int(sample.count_nonzero()) > 2 * max_density * sample.numel():
            return None
    return active_entries(mask_of(slice(None)), max_density)


def _sparse_allowed(x: torch.Tensor, max_density: float) -> bool:
    """Whether a sparse path may run at all (checked before any mask is built)."""
    return max_density > 0 and x.device.type == "cpu"


# ------------------------------------------------------------------------- fused ReLU dictionary
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


class JumpReLUWithL0(torch.autograd.Function):
    """`(x * 1[x > theta], mean_b sum_F 1[x > theta])`: JumpReLUFunction and the row-mean of
    StepFunction in one pass, with one shared rectangle-kernel pass in backward (same gradients)."""

    @staticmethod
    def forward(ctx, x_BF, threshold_F, bandwidth):
        active = x_BF > threshold_F
        ctx.save_for_backward(x_BF, threshold_F)
        ctx.bandwidth = bandwidth
        l0 = active.sum(-1, dtype=x_BF.dtype).mean()
        return torch.where(active, x_BF, 0.0), l0

    @staticmethod
    def backward(ctx, grad_f_BF, grad_l0):
        x_BF, threshold_F = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_x = torch.where(x_BF > threshold_F, grad_f_BF, 0.0) if grad_f_BF is not None else None
        near_BF = (x_BF - threshold_F).abs_() < bw / 2  # rectangle kernel of (x - theta) / bw
        grad_theta = torch.zeros_like(threshold_F)
        if grad_f_BF is not None:
            grad_theta -= (threshold_F / bw) * torch.where(near_BF, grad_f_BF, 0.0).sum(0)
        if grad_l0 is not None:
            grad_theta -= near_BF.sum(0, dtype=x_BF.dtype) * (grad_l0 / (bw * x_BF.shape[0]))
        return grad_x, grad_theta, None


def jumprelu_dictionary(x_BD, W_enc_FD, b_enc_F, threshold_F, W_dec_FD, b_dec_D, bandwidth, max_density=0.0):
    """(f, mean L0, x_hat) of a JumpReLU dictionary in training (2-D `x`): `f = jumprelu(x W_enc.T + b_enc)`,
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
        threshold_N = threshold_F[features_N]
        values_N = JumpReLUFunction.apply(pre_N, threshold_N, bandwidth)
        l0 = StepFunction.apply(pre_N, threshold_N, bandwidth).sum() / x_BD.shape[0]
        code = SparseCode(values_N, features_N, rows_N, offsets_B, W_enc_FD.shape[0])
        return code, l0, sparse_decode(code, W_dec_FD) + b_dec_D
    f_BF, l0 = JumpReLUWithL0.apply(pre_BF, threshold_F, bandwidth)
    return f_BF, l0, f_BF @ W_dec_FD + b_dec_D


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
    gate_N = torch.relu(z_N + b_gate_F[features_N])
    f_N = torch.relu(r_mag_F.exp()[features_N] * z_N + b_mag_F[features_N])  # the gate is open on every entry
    f = SparseCode(f_N, features_N, rows_N, offsets_B, W_enc_FD.shape[0])
    gate = f._replace(values=gate_N)
    x_hat = sparse_decode(f, W_dec_DF.T) + b_dec_D
    x_hat_gate = sparse_decode(gate, W_dec_DF.detach().T) + b_dec_D.detach()
    return f, gate, x_hat, x_hat_gate
