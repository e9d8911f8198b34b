"""Triton kernels of the ops, importable as `safepatch_merge.triton_kernels` (never as a
top-level `triton_kernels`, which is Triton's own library).

One module per op, each with its @triton.jit kernel, a launcher that documents shapes and
dtypes and asserts its preconditions, and a pointer to the plain-torch reference
(safepatch_merge/ops/reference.py):

    saliency.py      score += scale * weight * grad (fp32, in place)
    histogram.py     65,536-bin histogram of one 16-bit digit of the uint32 score keys
    philox.py        Philox4x32-10 retention words (one counter block per four elements)
    masked_merge.py  the whole SafePatching merge formula in one pass
    floats.py        exact bf16 widening / round-to-nearest-even narrowing (GPU and interpreter)

The launchers serve the ``safepatch::triton_*`` custom ops (safepatch_merge/ops/library.py),
which take the arguments as safepatch_merge/ops/lowering.py lowers them.
On machines without CUDA they run under TRITON_INTERPRET=1 on CPU tensors (tests only).
"""
