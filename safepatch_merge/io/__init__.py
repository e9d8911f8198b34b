"""Checkpoint I/O: safetensors headers, checkpoint indexing and validation, streaming reads
with read-ahead into bounded buffers, and a streaming, atomic, resumable writer."""
from .checkpoint import Checkpoint, ContentHasher, open_checkpoint
from .reader import Item, Part, Prefetcher, item_bytes
from .safetensors_header import DTYPES, Header, TensorInfo, build_header, read_header
from .writer import OutputBuilder, OutputError, ShardPlan, index_json, plan_shards

__all__ = ["Checkpoint", "ContentHasher", "open_checkpoint", "Item", "Part", "Prefetcher",
           "item_bytes", "DTYPES", "Header", "TensorInfo", "build_header", "read_header",
           "OutputBuilder", "OutputError", "ShardPlan", "index_json", "plan_shards"]
