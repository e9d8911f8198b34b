"""Classic merges on SafePatching's engine: task_arithmetic, ties, dare_linear, dare_ties,
with mergekit 0.1.5's semantics (docs/classic_merges.md).

spec: method table and parameter defaults (no torch). terms: one model's part in a tensor.
trim: TIES's magnitude trim (exactly k per tensor, by the merges' exact selector,
merge/select.py). abs_sum: exact L1 norms (DARE's rescale). combine: the elementwise merge of a
chunk. fused / cpu_kernels: the fused kernels. tensor_merge: one tensor's statistics passes
and merge. in_memory: state-dict API. method: the engine method. The package imports nothing
itself, so that the config can read spec without loading torch.
"""
