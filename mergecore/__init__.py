"""mergecore: a model-merging engine (recipes -> streaming executor -> checkpoints)."""

__version__ = "0.1.0"
