"""Batched gradient pursuit: inference-time sparse coding of signals against a fixed dictionary.

Blumensath & Davies 2008 ("Gradient Pursuits"): a greedy method between matching pursuit and
orthogonal matching pursuit. Each iteration adds the atom most correlated with the residual to a
row's support, then takes the exact line-search step along the gradient restricted to the support.
Codes are kept non-negative, as an SAE's features are.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def grad_pursuit(
    signal: torch.Tensor, dictionary: torch.Tensor, target_l0: int = 20, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Sparse non-negative codes `[B, F]` with at most `target_l0` atoms per row such that
    `codes @ dictionary.T` approximates `signal` `[B, D]`; `dictionary` is `[D, F]` (atoms as
    columns, like an `AutoEncoder`'s `decoder.weight`)."""
    if signal.ndim != 2 or dictionary.ndim != 2 or signal.shape[1] != dictionary.shape[0]:
        raise ValueError(
            f"signal [B, D] and dictionary [D, F] must share D; got {tuple(signal.shape)} and {tuple(dictionary.shape)}"
        )
    signal_BD = signal.to(device, torch.float32)
    atoms_DF = dictionary.to(device, torch.float32)
    codes_BF = torch.zeros(signal_BD.shape[0], atoms_DF.shape[1], device=device)
    support_BF = torch.zeros_like(codes_BF, dtype=torch.bool)
    rows = torch.arange(signal_BD.shape[0], device=device)
    for _ in range(target_l0):
        residual_BD = signal_BD - codes_BF @ atoms_DF.T
        correlation_BF = residual_BD @ atoms_DF
        support_BF[rows, correlation_BF.argmax(dim=1)] = True
        grad_BF = correlation_BF * support_BF
        direction_BD = grad_BF @ atoms_DF.T
        step_B = (direction_BD * residual_BD).sum(-1) / (direction_BD * direction_BD).sum(-1).clamp_min(1e-12)
        codes_BF = (codes_BF + step_B[:, None] * grad_BF).clamp_min(0)
    return codes_BF
