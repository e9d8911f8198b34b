"""C++ (CPU) and CUDA sources of the ops, shipped as package data and compiled on first use
by `safepatch_merge.ops._extension` (torch.utils.cpp_extension, cached per machine)."""
