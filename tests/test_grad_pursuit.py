"""Gradient pursuit recovers sparse non-negative codes against a known dictionary."""

from __future__ import annotations

import pytest
import torch

from dictionary_learning.grad_pursuit import grad_pursuit


def test_recovers_sparse_codes_of_a_known_dictionary():
    gen = torch.Generator().manual_seed(0)
    atoms_DF = torch.nn.functional.normalize(torch.randn(64, 128, generator=gen), dim=0)
    codes = torch.zeros(32, 128)
    for row in range(32):
        support = torch.randperm(128, generator=gen)[:3]
        codes[row, support] = 1 + torch.rand(3, generator=gen)
    signal = codes @ atoms_DF.T
    found = grad_pursuit(signal, atoms_DF, target_l0=6)
    assert ((found > 0).sum(1) <= 6).all() and (found >= 0).all()
    residual = (signal - found @ atoms_DF.T).norm(dim=1) / signal.norm(dim=1)
    assert residual.mean() < 0.05
    assert ((found > 0.2) == (codes > 0)).float().mean() > 0.99  # the true supports are found


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="must share D"):
        grad_pursuit(torch.randn(4, 8), torch.randn(9, 16))
