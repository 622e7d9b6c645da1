"""The one shape contract between data and trainers: each trainer states the batch layout it takes
(`batch_layout`) and refuses any other rank or width with a `BatchLayoutError` that names both
layouts, what the batch looks like it holds, and the fix."""

from __future__ import annotations

from typing import Any

import torch


def describe_batch(x: Any) -> str:
    """A batch's shape as errors name it: `[8, 2, 16]`, `a pair of [8, 16] and [9, 32]`, or its type."""
    if isinstance(x, torch.Tensor):
        return str(list(x.shape))
    if isinstance(x, (tuple, list)):
        parts = [str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in x]
        return f"a {len(x)}-tuple of {' and '.join(parts)}"
    return type(x).__name__


class BatchLayoutError(ValueError):
    """A batch whose rank or dimensions are not the layout its trainer takes: the message names
    both, what the batch looks like it holds, and the fix."""

    def __init__(self, trainer: Any, x: Any, fix: str | None = None, where: str = ""):
        self.trainer, self.x, self.fix = trainer, x, fix or layout_hint(trainer, x)
        super().__init__(
            f"{where}{type(trainer).__name__} takes {trainer.batch_layout()}, but the data yields "
            f"{describe_batch(x)}: {self.fix}"
        )


def layout_hint(trainer: Any, x: Any) -> str:
    """What a batch of another layout looks like it holds, and how to give the trainer its own."""
    transcoder = getattr(trainer, "transcoder", False)
    if isinstance(x, (tuple, list)):
        if transcoder and len(x) == 2 and all(isinstance(t, torch.Tensor) for t in x):
            if x[0].shape[0] != x[1].shape[0]:
                return "the input and output halves have different row counts; row i of each must be the same token"
            ae = trainer.ae
            widths = tuple(t.shape[-1] for t in x)
            return (
                f"its widths {widths} must be the trainer's activation_dim={ae.activation_dim} and "
                f"output_dim={ae.output_dim}, each half [B, width]"
            )
        return "an (input, output) pair is a transcoder's batch: pass transcoder=True (--transcoder)"
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        return "yield activation tensors, one row per token"
    width = x.shape[-1]
    if x.ndim == 2:
        if transcoder:
            return (
                "a transcoder needs each site's input and output: read it with io='in_and_out' (--transcoder does; "
                "a cache for it is built with io='in_and_out', `cache --io in_and_out`)"
            )
        return (
            f"the width {width} is not the trainer's activation_dim={trainer.ae.activation_dim}: read the site it "
            f"was made for, or set activation_dim={width}"
        )
    if x.ndim == 3 and x.shape[1] == 2 and not transcoder:
        return (
            "these look like a site's (input, output) rows (io='in_and_out'): pass transcoder=True to train "
            "transcoders (--transcoder), or read io='out'"
        )
    if x.ndim == 3:
        return (
            f"these rows stack {x.shape[1]} sites or heads: train a crosscoder (num_layers={x.shape[1]}, "
            f"--crosscoder), read the sites as separate streams (stack_sites=False: a dict per site), or for "
            f"HeadActivationBuffer pass activations_split_by_head=True"
        )
    if x.ndim == 4 and x.shape[2] == 2:
        return (
            f"these are {x.shape[1]} stacked sites of (input, output) rows (stack_sites=True with io='in_and_out'): "
            f"give each transcoder one site (stack_sites=False), or read io='out' for a crosscoder"
        )
    return "no trainer takes batches of this rank"
