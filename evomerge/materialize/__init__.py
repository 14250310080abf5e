"""Turning recipes into weights: the merge plan, streaming export to disk."""
