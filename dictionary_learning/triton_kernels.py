"""Triton kernels for the two backward primitives of the sparse path (see `sparse.sampled_products` and
`sparse.feature_sums`). Optional: imported only when `sparse.USE_TRITON` is on, and `triton` is not a
dependency of the package (CUDA builds of torch ship it).

Both read each source row once per entry and accumulate in float32:

- `sampled_products`: `out[n] = a[rows[n]] . W[features[n]]`, the gradient of the kept code values.
  One program per block of entries, looping over the width `D`.
- `group_sums`: `out[f] = sum over entries n of feature f of w[n] * src[rows[n]]`, the gradient of
  the decoder rows (and of the encoder rows), from the entries `sparse.feature_sums` has grouped by
  feature; one program per (feature, block of `D`) sums its group.

Under `TRITON_INTERPRET=1` they run on CPU tensors (numpy), which is how CI checks them against the
PyTorch path on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sampled_products_kernel(
    a_ptr, w_ptr, rows_ptr, features_ptr, out_ptr, n_entries, width, stride_a, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_entries
    rows = tl.load(rows_ptr + n, mask=n_ok, other=0)
    features = tl.load(features_ptr + n, mask=n_ok, other=0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, width, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = n_ok[:, None] & (d < width)[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_a + d[None, :], mask=ok, other=0.0)
        w = tl.load(w_ptr + features[:, None] * stride_w + d[None, :], mask=ok, other=0.0)
        acc += tl.sum(a.to(tl.float32) * w.to(tl.float32), axis=1)
    tl.store(out_ptr + n, acc, mask=n_ok)


@triton.jit
def _group_sums_kernel(
    weights_ptr, src_ptr, rows_ptr, bounds_ptr, out_ptr, width, stride_src, stride_out,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    group = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < width
    start = tl.load(bounds_ptr + group)
    end = tl.load(bounds_ptr + group + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        rows = tl.load(rows_ptr + n, mask=n_ok, other=0)
        weights = tl.load(weights_ptr + n, mask=n_ok, other=0.0)
        src = tl.load(src_ptr + rows[:, None] * stride_src + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(src.to(tl.float32) * weights.to(tl.float32)[:, None], axis=0)
    tl.store(out_ptr + group * stride_out + d, acc, mask=d_ok)


def sampled_products(a_BD: torch.Tensor, W_FD: torch.Tensor, rows_N: torch.Tensor, features_N: torch.Tensor):
    """`[N]`: `(a @ W.T)[rows, features]`, in `W`'s dtype."""
    a_BD, W_FD = a_BD.contiguous(), W_FD.contiguous()
    n, width = features_N.shape[0], a_BD.shape[1]
    out = torch.empty(n, device=a_BD.device, dtype=torch.float32)
    if n:
        block_n = 32
        _sampled_products_kernel[(triton.cdiv(n, block_n),)](
            a_BD, W_FD, rows_N.contiguous(), features_N.contiguous(), out, n, width, a_BD.stride(0),
            W_FD.stride(0), BLOCK_N=block_n, BLOCK_D=min(128, triton.next_power_of_2(width)),
        )  # fmt: skip
    return out.to(W_FD.dtype)


def group_sums(weights_N: torch.Tensor, src_BD: torch.Tensor, rows_N: torch.Tensor, bounds_G: torch.Tensor):
    """`[G - 1, D]`: `out[g] = sum of weights[n] * src[rows[n]]` over entries `bounds[g] <= n < bounds[g + 1]`,
    in `src`'s dtype (the entries already grouped, as `sparse.feature_sums` does)."""
    src_BD = src_BD.contiguous()
    n_groups, width = bounds_G.shape[0] - 1, src_BD.shape[1]
    out = torch.empty(n_groups, width, device=src_BD.device, dtype=torch.float32)
    block_d = min(128, triton.next_power_of_2(width))
    _group_sums_kernel[(n_groups, triton.cdiv(width, block_d))](
        weights_N.contiguous(), src_BD, rows_N.contiguous(), bounds_G, out, width,
        src_BD.stride(0), out.stride(0), BLOCK_N=16, BLOCK_D=block_d,
    )  # fmt: skip
    return out.to(src_BD.dtype)
