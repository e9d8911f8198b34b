"""Classic merges on SafePatching's engine: task_arithmetic, ties, dare_linear, dare_ties,
with mergekit 0.1.5's semantics (docs/classic_merges.md).

spec: method table and parameter defaults. trim: TIES's magnitude trim by exact radix
selection. abs_sum: exact L1 norms (DARE's rescale). combine: the elementwise merge of a chunk.
tensor_merge: one tensor's statistics passes and merge. in_memory: state-dict API.
method: the engine methods (registered on import).
"""
from .combine import Term, combine_chunk
from .in_memory import merge_state_dicts
from .spec import METHODS, MethodSpec, TensorParams, default_params, get_method
from .tensor_merge import TensorMerge
from .trim import KthLargest, trim_count
from . import method  # noqa: E402,F401 - registers the four methods with the engine

__all__ = ["METHODS", "MethodSpec", "TensorParams", "Term", "TensorMerge", "KthLargest",
           "combine_chunk", "default_params", "get_method", "merge_state_dicts", "trim_count"]
