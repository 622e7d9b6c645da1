"""IdentityDict: the model's own neurons as a "dictionary" (a baseline in circuit work)."""

from __future__ import annotations

import torch

from .base import Dictionary, register_dictionary


@register_dictionary
class IdentityDict(Dictionary):
    """`encode`, `decode` and `forward` return their input, moved to `device`/`dtype` when given."""

    def __init__(
        self,
        activation_dim: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.activation_dim = activation_dim
        self.dict_size = activation_dim
        self.dtype = dtype
        self.device = device

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_dim is not None:
            self._check_width(x)
        return x.to(device=self.device, dtype=self.dtype) if (self.device or self.dtype) else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._cast(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self._cast(f)

    def forward(self, x: torch.Tensor, output_features: bool = False, ghost_mask: torch.Tensor | None = None):
        if ghost_mask is not None:
            raise ValueError("IdentityDict has no features to ghost: ghost_mask must be None")
        x = self._cast(x)
        return (x, x) if output_features else x

    def scale_biases(self, scale: float) -> None:
        """No biases: nothing to scale."""

    @classmethod
    def _expected_keys(cls):
        return ()

    @classmethod
    def _from_state_dict_shapes(cls, state_dict, activation_dim: int | None = None, **kwargs):
        return cls(activation_dim)

    @classmethod
    def from_pretrained(cls, activation_dim=None, path=None, dtype=None, device=None):
        """No weights to read: the reference's order `(activation_dim, path, dtype, device)`; a path
        given first (`from_pretrained(path, activation_dim)`, the older order) is accepted too."""
        if isinstance(activation_dim, (str, bytes)) or hasattr(activation_dim, "__fspath__"):
            activation_dim, path = path, activation_dim
        return cls(activation_dim, dtype=dtype, device=device)
