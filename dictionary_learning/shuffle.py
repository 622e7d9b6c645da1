"""The shuffle a data source owns: what a resumed run needs to serve the same batches again."""

from __future__ import annotations

from typing import Any

import torch


class OwnedShuffle:
    """A data source's own random generator. Its seed is the user's, or, when none is given, one
    drawn from torch's global generator at first use (so a seeded program stays reproducible); from
    then on nothing else draws from it, and `state_dict` / `load_state_dict` carry the seed into a
    resumed run."""

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self._generator: torch.Generator | None = None

    @property
    def started(self) -> bool:
        return self._generator is not None

    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.draw_seed())
        return self._generator

    def draw_seed(self) -> int:
        """The seed, drawn now if none was given."""
        if self.seed is None:
            self.seed = int(torch.randint(0, 2**62, ()))
        return self.seed

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.draw_seed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self._generator = int(state["seed"]), None
