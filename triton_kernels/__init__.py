"""Triton kernels of the ops, importable as `safepatch_merge.triton_kernels` (never as a
top-level `triton_kernels`, which is Triton's own library)."""
