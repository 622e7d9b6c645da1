"""AbsTopK SAE training (arXiv 2510.00404, "AbsTopK: Rethinking Sparse Autoencoders for
Bidirectional Features").

The TopK recipe unchanged (its loss, AuxK, geometric-median init, threshold, sparse path) on a
dictionary whose code keeps the k pre-activations of largest magnitude with their signs. Not a
reference recipe, so its encoder starts at SAELens's row norm 0.1 by default (`encoder_init_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dictionaries import AbsTopKSAE
from .top_k import TopKConfig, TopKTrainer
from .trainer import register_trainer

__all__ = ["AbsTopKSAE", "AbsTopKTrainer"]


@dataclass(frozen=True, kw_only=True)
class AbsTopKConfig(TopKConfig):
    dict_class: type | str = AbsTopKSAE
    wandb_name: str = "AbsTopKSAE"
    encoder_init_norm: float | None = 0.1
    """norm of each encoder row at initialisation (0.1, SAELens's; None: the unit-norm decoder's
    transpose, TopK's default, 0.054 lower MCC on the synthetic ground truth)"""


@register_trainer
class AbsTopKTrainer(TopKTrainer):
    """`TopKTrainer.loss` on an `AbsTopKSAE`: the kept latents are the k largest |pre-activations|
    with their signs; AuxK ranks dead latents by magnitude and the inference threshold tracks the
    smallest kept magnitude."""

    Config = AbsTopKConfig
