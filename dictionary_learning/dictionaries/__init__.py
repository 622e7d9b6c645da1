"""Dictionary architectures; importing this package registers every one of them."""

from .base import DICTIONARY_REGISTRY, Dictionary, FeatureLayout, register_dictionary
from .clt import (
    BatchTopKCrossLayerTranscoder,
    CrossLayerTranscoderBase,
    JumpReluCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
)
from .crosscoder import BatchTopKCrossCoder, CrossCoder, relative_decoder_norms
from .gated import GatedAutoEncoder
from .identity import IdentityDict
from .jumprelu import JumpReluAutoEncoder
from .pursuit import MatchingPursuitSAE
from .relu import AutoEncoder, AutoEncoderNew
from .topk import AbsTopKSAE, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE

__all__ = [
    "DICTIONARY_REGISTRY",
    "AbsTopKSAE",
    "AutoEncoder",
    "AutoEncoderNew",
    "AutoEncoderTopK",
    "BatchTopKCrossCoder",
    "BatchTopKSAE",
    "CrossCoder",
    "BatchTopKCrossLayerTranscoder",
    "CrossLayerTranscoderBase",
    "Dictionary",
    "FeatureLayout",
    "GatedAutoEncoder",
    "IdentityDict",
    "JumpReluAutoEncoder",
    "JumpReluCrossLayerTranscoder",
    "MatchingPursuitSAE",
    "MatryoshkaBatchTopKSAE",
    "TopKCrossLayerTranscoder",
    "register_dictionary",
    "relative_decoder_norms",
]
