"""Patching: make a model's decoder layers sparse, and undo it."""

from .sparsify import sparse_state, sparsify, unsparsify

__all__ = ["sparse_state", "sparsify", "unsparsify"]
