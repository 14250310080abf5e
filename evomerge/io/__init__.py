"""Lazy access to Hugging Face model directories and sharded safetensors output."""

from evomerge.io.model_dir import ModelDir, TensorInfo
from evomerge.io.writer import StreamingShardWriter, TensorSlot, parse_size

__all__ = ["ModelDir", "StreamingShardWriter", "TensorInfo", "TensorSlot", "parse_size"]
