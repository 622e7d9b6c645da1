"""Matching-pursuit SAE (MP-SAE, Costa et al. 2025, "From Flat to Hierarchical"): the code is found
by greedy residual pursuit over the decoder's unit-norm atoms, k steps, instead of one linear map.

Each step picks the atom most correlated with what is left of `x - b_dec`, adds that (ReLU'd)
correlation to the atom's code and subtracts the atom's contribution from the residual. An atom can
be picked again, so a row has at most k active latents. The encoder is the decoder itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..files import CheckpointError
from ..sparse import per_entry
from .base import Dictionary, FeatureLayout, check_sizes, register_dictionary


def matching_pursuit(residual_BD: torch.Tensor, W_dec_FD: torch.Tensor, steps: int) -> torch.Tensor:
    """The `[B, F]` code of `steps` greedy pursuit steps of `residual_BD` over the rows of `W_dec_FD`
    (assumed unit-norm); differentiable in both through the selected rows (the choice itself is not)."""
    chosen, values = [], []
    for _ in range(steps):
        with torch.no_grad():
            chosen_B = (residual_BD @ W_dec_FD.T).argmax(-1)
        atom_BD = per_entry(W_dec_FD, chosen_B)  # indexing's backward would add in a run-to-run order
        value_B = (residual_BD * atom_BD).sum(-1).relu()
        residual_BD = residual_BD - value_B[:, None] * atom_BD
        chosen.append(chosen_B)
        values.append(value_B)
    f_BF = residual_BD.new_zeros(residual_BD.shape[0], W_dec_FD.shape[0])
    return f_BF.scatter_add(1, torch.stack(chosen, 1), torch.stack(values, 1))  # a repeated atom's values add


@register_dictionary
class MatchingPursuitSAE(Dictionary):
    """`f = MP_k(x - b_dec; W_dec)`, `x_hat = f @ W_dec + b_dec`, decoder rows kept at unit norm by
    the recipe (`MatchingPursuitTrainer`). Keys: W_dec `[F, D]`, b_dec `[D]`, k (int32)."""

    layout = FeatureLayout(decoder=("W_dec", 0))
    bias_names = ("b_dec",)
    tied_input_bias = "b_dec"

    def __init__(self, activation_dim: int, dict_size: int, k: int):
        super().__init__()
        check_sizes(activation_dim, dict_size, k)
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        # Drawn as [D, F] and transposed: a plain randn(F, D) under seed 0 is, row for row, the
        # directions of a synthetic model or planted-feature set built with seed 0 (and a uniform
        # draw from that stream still correlates with them: mean |cos| 0.35 in 128 dims).
        W_dec = torch.randn(activation_dim, dict_size).T.contiguous()
        self.W_dec = nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True))
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        self.register_buffer("k", torch.tensor(k, dtype=torch.int32))
        self._k = int(k)

    @property
    def active_k(self) -> int:
        """The number of pursuit steps, as a Python int."""
        return self._k

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._k = int(self.k)

    def architecture_config(self) -> dict[str, Any]:
        return super().architecture_config() | {"k": self._k}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_width(x)
        flat_BD = (x - self.b_dec).reshape(-1, self.activation_dim)
        return matching_pursuit(flat_BD, self.W_dec, self._k).reshape(*x.shape[:-1], self.dict_size)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    @classmethod
    def _expected_keys(cls):
        return ("W_dec", "b_dec", "k")

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, **kwargs):
        dict_size, activation_dim = state_dict["W_dec"].shape
        return cls(activation_dim, dict_size, int(state_dict["k"]))

    # ------------------------------------------------------------------------------------ SAELens
    saelens_architecture = "matching_pursuit"

    def to_saelens(self):
        """SAELens's matching_pursuit SAE stopped after exactly k steps (no residual threshold, no
        stop on a repeated support): the same codes."""
        fields = {
            "architecture": "matching_pursuit",
            "residual_threshold": 0.0,
            "max_iterations": self._k,
            "stop_on_duplicate_support": False,
        }
        return fields, {"W_dec": self.W_dec, "b_dec": self.b_dec}

    @classmethod
    def from_saelens(cls, weights) -> MatchingPursuitSAE:
        """A SAELens matching_pursuit SAE that runs a fixed number of steps; one that stops early (a
        residual threshold, a repeated support) has no fixed k and is refused."""
        cfg, source = weights.cfg, weights.source
        k = cfg.get("max_iterations")
        threshold = cfg.get("residual_threshold", 1e-2)
        duplicate = cfg.get("stop_on_duplicate_support", True)
        if float(threshold) > 0 or duplicate or not isinstance(k, int) or not 0 < k <= weights.d_sae:
            raise CheckpointError(
                f"{source}: this matching_pursuit SAE stops early or has no step count (residual_threshold="
                f"{threshold}, stop_on_duplicate_support={duplicate}, max_iterations={k}); MatchingPursuitSAE "
                "runs exactly k steps: set residual_threshold=0, stop_on_duplicate_support=False, max_iterations=k"
            )
        if not weights.subtracts_b_dec:
            raise CheckpointError(f"{source}: a matching_pursuit SAE with apply_b_dec_to_input=False is not supported")
        ae = cls(weights.d_in, weights.d_sae, k)
        ae.W_dec.copy_(weights.W_dec)
        ae.b_dec.copy_(weights.b_dec)
        return ae

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self._k}"
