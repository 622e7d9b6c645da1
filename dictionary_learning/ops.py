"""Pure tensor functions shared by the recipes: each piece of math written once and tested once
(the decoder-norm constraint, geometric median, AuxK, Lp norms, JumpReLU's estimators). The sparse
engine is `sparse`; each architecture's fused training forward lives in its own file."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .sparse import SparseCode, per_entry


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
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to the rows (Weiszfeld's iteration).

    Used to initialise `b_dec` of TopK-family SAEs (Gao et al. 2024, section 2.1 / appendix A).
    """
    points_ND = points
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
        return f_BF.row_sums(None if weight_F is None else f_BF.values * per_entry(weight_F, f_BF.features))
    return (f_BF if weight_F is None else f_BF * weight_F).sum(-1)


def tanh_row_sums(f_BF, weight_F: torch.Tensor, scale: float) -> torch.Tensor:
    """`[B]` sums over each row's features of `tanh(scale * f * weight_F)`, for a dense code or a
    `SparseCode` (its absent entries add tanh(0) = 0): Anthropic's smooth L0 (January 2025 update)."""
    if isinstance(f_BF, SparseCode):
        return f_BF.row_sums(torch.tanh(scale * f_BF.values * per_entry(weight_F, f_BF.features)))
    return torch.tanh(scale * f_BF * weight_F).sum(-1)


# ------------------------------------------------------------------------ JumpReLU estimators
def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class RectangleFunction(torch.autograd.Function):
    """The rectangle kernel `1[-1/2 < u < 1/2]` with the gradient passed through inside it and 0
    outside (the reference's helper of the JumpReLU estimators; ours use `_rectangle` directly)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ((x > -0.5) & (x < 0.5)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return torch.where((x <= -0.5) | (x >= 0.5), 0.0, grad_output)


class JumpReLUFunction(torch.autograd.Function):
    """`x * 1[x > theta]`; straight-through gradient for theta (Rajamanoharan et al. 2024, eq. 11)."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold)

    @staticmethod
    def backward(ctx, grad_output):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_x = (x > threshold) * grad_output
        grad_theta = -(threshold / bw) * _rectangle((x - threshold) / bw) * grad_output
        return grad_x, _sum_to(grad_theta, threshold), None


class StepFunction(torch.autograd.Function):
    """`1[x > theta]`; gradient only to theta, `-(1/eps) * rect((x - theta)/eps)` (eq. 12)."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_theta = -(1.0 / bw) * _rectangle((x - threshold) / bw) * grad_output
        return torch.zeros_like(x), _sum_to(grad_theta, threshold), None


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of `like` (the per-feature threshold)."""
    return grad.reshape(-1, *like.shape).sum(0) if grad.shape != like.shape else grad
