"""Dictionary architectures; importing this package registers every one of them."""

from .base import DICTIONARY_REGISTRY, Dictionary, FeatureLayout, register_dictionary
from .crosscoder import BatchTopKCrossCoder, CrossCoder, relative_decoder_norms
from .gated import GatedAutoEncoder
from .identity import IdentityDict
from .jumprelu import JumpReluAutoEncoder
from .relu import AutoEncoder, AutoEncoderNew
from .topk import AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE

__all__ = [
    "DICTIONARY_REGISTRY",
    "AutoEncoder",
    "AutoEncoderNew",
    "AutoEncoderTopK",
    "BatchTopKCrossCoder",
    "BatchTopKSAE",
    "CrossCoder",
    "Dictionary",
    "FeatureLayout",
    "GatedAutoEncoder",
    "IdentityDict",
    "JumpReluAutoEncoder",
    "MatryoshkaBatchTopKSAE",
    "register_dictionary",
    "relative_decoder_norms",
]
