"""The optimizer of every recipe (Adam that keeps decoder directions at unit norm) and the
reference's decoder helpers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..dictionaries.base import feature_first
from ..ops import remove_parallel_grad_, unit_norm_rows_


def _check_decoder_shape(W_dec_DF: torch.Tensor, activation_dim: int, d_sae: int) -> None:
    if tuple(W_dec_DF.shape) != (activation_dim, d_sae):
        expected = (activation_dim, d_sae)
        raise ValueError(f"decoder shape {tuple(W_dec_DF.shape)} != (activation_dim, d_sae) = {expected}")


def set_decoder_norm_to_unit_norm(W_dec_DF: torch.Tensor, activation_dim: int, d_sae: int) -> torch.Tensor:
    """Unit-norm columns of a `[D, F]` decoder, in place (the reference's helper, same signature)."""
    _check_decoder_shape(W_dec_DF, activation_dim, d_sae)
    return unit_norm_rows_(W_dec_DF.data.T).T


def remove_gradient_parallel_to_decoder_directions(
    W_dec_DF: torch.Tensor, W_dec_DF_grad: torch.Tensor, activation_dim: int, d_sae: int
) -> torch.Tensor:
    """Project out each column's parallel gradient component, in place (reference signature)."""
    _check_decoder_shape(W_dec_DF, activation_dim, d_sae)
    return remove_parallel_grad_(W_dec_DF.data.T, W_dec_DF_grad.T).T


def adam(
    params: Iterable, constrained: Iterable = (), max_grad_norm: float | None = None, **kwargs: Any
) -> ConstrainedAdam:
    """The optimizer of every recipe: `ConstrainedAdam` on the fused kernel (one pass over all
    parameters instead of a Python loop of small ops, which dominates small dictionaries' steps)."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return ConstrainedAdam(params, constrained, fused=fused, max_grad_norm=max_grad_norm, **kwargs)


class DecoderConstraint:
    """The decoder-norm constraint, for any torch optimizer it is mixed into: each step removes the
    gradient component parallel to each feature direction of `constrained_params`, clips the
    gradient norm of all parameters to `max_grad_norm` when given (after the projection, as the
    reference's TopK and JumpReLU trainers do), takes the optimizer's step, and renormalises the
    directions. Entries are parameters (Linear-style `[D, F]` decoders, a feature is a column, as in
    the reference) or `(parameter, feature_dim)` pairs."""

    param_groups: list[dict]

    def _constrain(self, constrained_params: Iterable, max_grad_norm: float | None) -> None:
        self.constrained_params = [p if isinstance(p, tuple) else (p, 1) for p in constrained_params]
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):
        for p, dim in self.constrained_params:
            if p.grad is not None:
                remove_parallel_grad_(feature_first(p.data, dim), feature_first(p.grad, dim))
        if self.max_grad_norm is not None:
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        loss = super().step(closure)
        for p, dim in self.constrained_params:
            unit_norm_rows_(feature_first(p.data, dim))
        return loss


class ConstrainedAdam(DecoderConstraint, torch.optim.Adam):
    """Adam that keeps each feature direction of `constrained_params` at unit norm (see
    `DecoderConstraint`): the optimizer of every recipe."""

    def __init__(
        self,
        params: Iterable,
        constrained_params: Iterable,
        lr: float,
        betas=(0.9, 0.999),
        max_grad_norm: float | None = None,
        **kwargs,
    ):
        super().__init__(params, lr=lr, betas=betas, **kwargs)
        self._constrain(constrained_params, max_grad_norm)


class Signum(torch.optim.Optimizer):
    """Sign descent with momentum (Bernstein et al. 2018, "signSGD"; sparsify's default optimizer):
    `m = beta * m + (1 - beta) * g`, `p -= lr * sign(m)`. Every coordinate moves by lr, so the step
    does not depend on the gradient's scale."""

    def __init__(self, params: Iterable, lr: float, beta: float = 0.9):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("momentum", torch.zeros_like(p))
                momentum.lerp_(p.grad, 1 - group["beta"])
                p.add_(momentum.sign(), alpha=-group["lr"])
        return loss


class ConstrainedSignum(DecoderConstraint, Signum):
    """Signum that keeps each feature direction of `constrained_params` at unit norm (`DecoderConstraint`)."""

    def __init__(
        self, params: Iterable, constrained_params: Iterable, lr: float, beta: float = 0.9, max_grad_norm=None
    ):
        super().__init__(params, lr=lr, beta=beta)
        self._constrain(constrained_params, max_grad_norm)
