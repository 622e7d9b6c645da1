"""Helpers kept at the reference's `dictionary_learning.utils` import path."""

from .checkpoint import get_nested_folders, load_dictionary

__all__ = ["get_nested_folders", "load_dictionary"]
