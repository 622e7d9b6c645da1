"""Compatibility module: the reference's `dictionary_learning.dictionary` import path."""

from .dictionaries import (  # noqa: F401
    AutoEncoder,
    AutoEncoderNew,
    AutoEncoderTopK,
    BatchTopKSAE,
    Dictionary,
    GatedAutoEncoder,
    IdentityDict,
    JumpReluAutoEncoder,
    MatryoshkaBatchTopKSAE,
)
