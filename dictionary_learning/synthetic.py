"""Synthetic activations with planted sparse features: known ground truth for checking that a recipe learns."""

from __future__ import annotations

import hashlib

import torch


def stream_generator(label: str, seed: int) -> torch.Generator:
    """A generator for the random stream named `label` under `seed`, derived by hashing both. A
    synthetic model's directions and batches then never replay what `torch.manual_seed(seed)` hands
    a trainer with the same seed: with plain seeds, seed 0's randn-initialised decoder would start on
    the true directions (drawn by randn from seed 0) and score a near-perfect recovery it never learnt."""
    digest = hashlib.sha256(f"dictionary_learning.synthetic:{label}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class PlantedFeatures:
    """`x = codes @ directions`, each of `n_features` unit directions active with probability
    `p_active` and magnitude uniform in [0.5, 1.5]. Deterministic for a given seed."""

    def __init__(self, d: int = 32, n_features: int = 48, p_active: float = 0.06, seed: int = 0):
        gen = stream_generator("planted-directions", seed)
        directions = torch.randn(n_features, d, generator=gen)
        self.directions = directions / directions.norm(dim=1, keepdim=True)
        self.d, self.n_features, self.p_active, self.seed = d, n_features, p_active, seed

    def batches(self, n_batches: int, batch_size: int = 256, seed: int | None = None):
        gen = stream_generator("planted-batches", self.seed + 1 if seed is None else seed)
        for _ in range(n_batches):
            active = torch.rand(batch_size, self.n_features, generator=gen) < self.p_active
            magnitude = 0.5 + torch.rand(batch_size, self.n_features, generator=gen)
            yield (active * magnitude) @ self.directions

    def recovered(self, decoder_FD: torch.Tensor, threshold: float = 0.9, either_sign: bool = False) -> int:
        """How many planted directions some decoder row matches with cosine > threshold (with
        `either_sign`, |cosine|: a signed code such as AbsTopK's writes a direction with -1 times its row)."""
        W = decoder_FD.detach().float().cpu()
        W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = self.directions @ W.T
        return int(((cos.abs() if either_sign else cos).max(dim=1).values > threshold).sum())


class SyntheticModel:
    """A synthetic model with known ground truth: `n_features` unit directions in `d < n_features`
    dimensions (superposition), each firing with a Zipfian probability scaled so that on average
    `mean_l0` fire per sample, with noisy magnitudes, a parent/child hierarchy and correlated firing.
    Samples are `(codes [n, n_features], activations [n, d] = codes @ directions)`: what
    `evaluation.ground_truth_metrics` scores a dictionary against.

    Args:
        n_features, d: the true features and the width of the activations.
        mean_l0: expected number of features firing per sample.
        zipf_exponent: feature i fires with probability proportional to (i + 1) ** -zipf_exponent.
        magnitude_std: a firing feature's magnitude is 1 + magnitude_std * N(0, 1), at least 0.
        child_fraction: this share of the features are children: each has a parent among the others
            and fires only when its parent fires (its marginal probability kept where possible).
        correlation: features fall into `n_groups` groups whose firing shares a Gaussian factor with
            this weight (a Gaussian copula: each feature's own probability is unchanged).
        seed: fixes the directions, probabilities and hierarchy; `sample` has its own generator.
    """

    def __init__(
        self,
        n_features: int = 1024,
        d: int = 128,
        mean_l0: float = 16.0,
        zipf_exponent: float = 0.5,
        magnitude_std: float = 0.2,
        child_fraction: float = 0.1,
        correlation: float = 0.2,
        n_groups: int = 16,
        seed: int = 0,
    ):
        if not 0 < d < n_features:
            raise ValueError(f"a synthetic model needs 0 < d < n_features (superposition), got d={d}, n={n_features}")
        if not 0 < mean_l0 < n_features:
            raise ValueError(f"mean_l0 must lie in (0, n_features), got {mean_l0}")
        if not (0 <= child_fraction < 1 and 0 <= correlation < 1 and magnitude_std >= 0):
            raise ValueError("child_fraction and correlation must lie in [0, 1), magnitude_std must be >= 0")
        gen = stream_generator("model", seed)
        directions = torch.randn(n_features, d, generator=gen)
        self.directions = directions / directions.norm(dim=1, keepdim=True)  # [N, D]
        weights = (torch.arange(n_features, dtype=torch.float64) + 1) ** -zipf_exponent
        self.probabilities = (weights * mean_l0 / weights.sum()).clamp(max=1.0).float()  # [N]
        n_children = int(child_fraction * n_features)
        order = torch.randperm(n_features, generator=gen)
        children, candidates = order[:n_children], order[n_children:]
        self.parent = torch.full((n_features,), -1, dtype=torch.long)
        self.parent[children] = candidates[torch.randint(len(candidates), (n_children,), generator=gen)]
        self.group = torch.randint(n_groups, (n_features,), generator=gen)
        self.n_features, self.d, self.mean_l0 = n_features, d, mean_l0
        self.magnitude_std, self.correlation, self.n_groups, self.seed = magnitude_std, correlation, n_groups, seed
        self.child_fraction = child_fraction
        # A child fires when its parent does and its own draw says so: P(own) = p_child / p_parent.
        has_parent = self.parent >= 0
        own = self.probabilities.clone()
        own[has_parent] = (own[has_parent] / self.probabilities[self.parent[has_parent]]).clamp(max=1.0)
        self._thresholds = torch.special.ndtri(own.double().clamp(1e-12, 1 - 1e-12)).float()

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`(codes [n, N], activations [n, D])` drawn with `generator`."""
        shared = torch.randn(n, self.n_groups, generator=generator)[:, self.group]
        own = torch.randn(n, self.n_features, generator=generator)
        z = (1 - self.correlation) ** 0.5 * own + self.correlation**0.5 * shared
        fires = z < self._thresholds
        has_parent = self.parent >= 0
        fires[:, has_parent] &= fires[:, self.parent[has_parent]]
        magnitude = (1 + self.magnitude_std * torch.randn(n, self.n_features, generator=generator)).clamp_min(0)
        codes = fires * magnitude
        return codes, codes @ self.directions

    def batches(self, n_batches: int, batch_size: int = 4096, seed: int = 1):
        """`n_batches` activation batches `[batch_size, D]` (a seeded stream; the codes are dropped)."""
        generator = stream_generator("batches", seed)
        for _ in range(n_batches):
            yield self.sample(batch_size, generator)[1]

    @property
    def record(self) -> dict:
        """The settings that rebuild this model."""
        return {
            "n_features": self.n_features,
            "d": self.d,
            "mean_l0": self.mean_l0,
            "magnitude_std": self.magnitude_std,
            "correlation": self.correlation,
            "n_groups": self.n_groups,
            "child_fraction": self.child_fraction,
            "seed": self.seed,
        }
