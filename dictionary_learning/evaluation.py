"""Reconstruction metrics as pure tensor functions (definitions as in the reference, spec section 8).

`evaluate` with cross-entropy metrics through the model arrives with the activation pipeline.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def frac_variance_explained(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """`1 - sum_D var_B(x - x_hat) / sum_D var_B(x)` (unbiased variance over the batch)."""
    x_BD, x_hat_BD = x_BD.reshape(-1, x_BD.shape[-1]).float(), x_hat_BD.reshape(-1, x_BD.shape[-1]).float()
    return 1 - (x_BD - x_hat_BD).var(dim=0).sum() / x_BD.var(dim=0).sum()


@torch.no_grad()
def l0(f_BF: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero features per row."""
    return (f_BF != 0).float().sum(-1).mean()


@torch.no_grad()
def reconstruction_metrics(x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor) -> dict[str, float]:
    """The reference's per-batch metrics that need no model: l2_loss (un-squared), l1_loss, l0,
    frac_variance_explained, cossim, l2_ratio and relative_reconstruction_bias (Gated SAE paper, eq. 10)."""
    x, x_hat, f = x_BD.float(), x_hat_BD.float(), f_BF.float()
    x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
    return {
        "l2_loss": float((x - x_hat).norm(dim=-1).mean()),
        "l1_loss": float(f.norm(p=1, dim=-1).mean()),
        "l0": float(l0(f)),
        "frac_variance_explained": float(frac_variance_explained(x, x_hat)),
        "cossim": float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()),
        "l2_ratio": float((x_hat_norm / x_norm).mean()),
        "relative_reconstruction_bias": float(x_hat.pow(2).sum(-1).mean() / (x * x_hat).sum(-1).mean()),
    }
