"""Merge methods: a registry of pure per-tensor kernels with mergekit's names.

A kernel takes the base tensor, the source tensors (aligned with their
per-source parameters) and global parameters, and returns the merged tensor.
Kernels do no I/O and draw randomness only from an explicit generator.
"""

from evomerge.methods.registry import METHODS, MergeMethod, get_method

__all__ = ["METHODS", "MergeMethod", "get_method"]
