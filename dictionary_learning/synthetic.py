"""Synthetic activations with planted sparse features: known ground truth for checking that a recipe learns."""

from __future__ import annotations

import torch


class PlantedFeatures:
    """`x = codes @ directions`, each of `n_features` unit directions active with probability
    `p_active` and magnitude uniform in [0.5, 1.5]. Deterministic for a given seed."""

    def __init__(self, d: int = 32, n_features: int = 48, p_active: float = 0.06, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        directions = torch.randn(n_features, d, generator=gen)
        self.directions = directions / directions.norm(dim=1, keepdim=True)
        self.d, self.n_features, self.p_active, self.seed = d, n_features, p_active, seed

    def batches(self, n_batches: int, batch_size: int = 256, seed: int | None = None):
        gen = torch.Generator().manual_seed(self.seed + 1 if seed is None else seed)
        for _ in range(n_batches):
            active = torch.rand(batch_size, self.n_features, generator=gen) < self.p_active
            magnitude = 0.5 + torch.rand(batch_size, self.n_features, generator=gen)
            yield (active * magnitude) @ self.directions

    def recovered(self, decoder_FD: torch.Tensor, threshold: float = 0.9) -> int:
        """How many planted directions some decoder row matches with cosine > threshold."""
        W = decoder_FD.detach().float().cpu()
        W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return int(((self.directions @ W.T).max(dim=1).values > threshold).sum())
