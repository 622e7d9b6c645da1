"""Training recipes. Each registers itself in TRAINER_REGISTRY (the list trainSAE and the CLI read)."""

from .abs_top_k import AbsTopKSAE, AbsTopKTrainer
from .batch_top_k import BatchTopKSAE, BatchTopKTrainer
from .clt import BatchTopKCLTTrainer, JumpReluCLTTrainer, TopKCLTTrainer
from .crosscoder import BatchTopKCrossCoderTrainer, CrossCoderTrainer
from .gated_anneal import GatedAnnealTrainer
from .gdm import GatedSAETrainer
from .jumprelu import JumpReluTrainer
from .matching_pursuit import MatchingPursuitSAE, MatchingPursuitTrainer
from .matryoshka_batch_top_k import MatryoshkaBatchTopKSAE, MatryoshkaBatchTopKTrainer
from .p_anneal import PAnnealTrainer
from .standard import StandardTrainer, StandardTrainerAprilUpdate
from .top_k import AutoEncoderTopK, TopKTrainer
from .trainer import TRAINER_REGISTRY, ConstrainedAdam, SAETrainer, register_trainer

__all__ = [
    "TRAINER_REGISTRY",
    "AbsTopKSAE",
    "AbsTopKTrainer",
    "AutoEncoderTopK",
    "BatchTopKCLTTrainer",
    "BatchTopKCrossCoderTrainer",
    "BatchTopKSAE",
    "BatchTopKTrainer",
    "ConstrainedAdam",
    "CrossCoderTrainer",
    "GatedAnnealTrainer",
    "GatedSAETrainer",
    "JumpReluCLTTrainer",
    "JumpReluTrainer",
    "MatchingPursuitSAE",
    "MatchingPursuitTrainer",
    "MatryoshkaBatchTopKSAE",
    "MatryoshkaBatchTopKTrainer",
    "PAnnealTrainer",
    "SAETrainer",
    "StandardTrainer",
    "StandardTrainerAprilUpdate",
    "TopKCLTTrainer",
    "TopKTrainer",
    "register_trainer",
]
