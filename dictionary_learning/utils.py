"""Helpers kept at the reference's `dictionary_learning.utils` import path."""

from .checkpoint import get_nested_folders, load_dictionary
from .data import (
    hf_dataset_to_generator,
    hf_mixed_dataset_to_generator,
    hf_sequence_packing_dataset_to_generator,
    jsonl_to_generator,
    randomly_remove_system_prompt,
    simple_hf_mixed_dataset_to_generator,
    text_files_to_generator,
    zst_to_generator,
)
from .dictionaries import (  # noqa: F401 (the reference re-exports these names here)
    AutoEncoder,
    AutoEncoderNew,
    AutoEncoderTopK,
    BatchTopKSAE,
    GatedAutoEncoder,
    JumpReluAutoEncoder,
    MatryoshkaBatchTopKSAE,
)
from .models import default_texts, get_submodule, load_default_model, load_model, truncate_model

__all__ = [
    "default_texts",
    "get_nested_folders",
    "get_submodule",
    "hf_dataset_to_generator",
    "hf_mixed_dataset_to_generator",
    "hf_sequence_packing_dataset_to_generator",
    "jsonl_to_generator",
    "load_default_model",
    "load_dictionary",
    "load_model",
    "randomly_remove_system_prompt",
    "simple_hf_mixed_dataset_to_generator",
    "text_files_to_generator",
    "truncate_model",
    "zst_to_generator",
]
