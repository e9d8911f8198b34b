"""Checkpoint I/O: safetensors headers, checkpoint indexing and validation, streaming reads
with read-ahead into bounded buffers, a streaming, atomic, resumable writer, and atomic
whole-file writes. Import the submodule that holds what you need (checkpoint, reader,
safetensors_header, writer, atomic, ...): the package imports nothing itself, so that writing
a small file does not load torch."""
