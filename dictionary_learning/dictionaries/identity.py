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

    def forward(self, x: torch.Tensor, output_features: bool = False):
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
    def from_pretrained(cls, path=None, dtype=None, device=None, activation_dim: int | None = None):
        """No weights to read. Also accepts the reference's HEAD order `(activation_dim, path, ...)`."""
        if isinstance(path, int) and not isinstance(path, bool):
            path, activation_dim = None, path
        return cls(activation_dim, dtype=dtype, device=device)
