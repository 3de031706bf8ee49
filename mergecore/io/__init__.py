"""Checkpoint I/O: lazy model sources and the atomic sharded writer."""

from mergecore.io.source import ModelSource, TensorInfo, dtype_from_name, dtype_name, resolve_model_path
from mergecore.io.writer import DEFAULT_SHARD_SIZE, ShardedWriter, parse_size, prepare_output_dir

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ModelSource",
    "ShardedWriter",
    "TensorInfo",
    "dtype_from_name",
    "dtype_name",
    "parse_size",
    "prepare_output_dir",
    "resolve_model_path",
]
