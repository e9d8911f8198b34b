"""Classic merges of state dicts held in memory, through the same per-tensor code as the
streaming engine (optionally in chunks, to show chunking does not change a bit)."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from .spec import MethodSpec, TensorParams, get_method
from .tensor_merge import FLOAT_DTYPES, TensorMerge


def merge_state_dicts(method: str | MethodSpec, base: Mapping[str, torch.Tensor],
                      models: Sequence[Mapping[str, torch.Tensor]],
                      params: TensorParams | Callable[[str], TensorParams], *, seed: int = 0,
                      chunk_elems: int | None = None,
                      out_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{name: merged tensor} for every tensor of `base`.

    models: the non-base state dicts (same names, shapes) in config order. params: one
    TensorParams for all tensors or a function name -> TensorParams. chunk_elems: process
    each tensor in flat chunks of that many elements (None: whole tensors). Non-float tensors
    are copied from base. out_dtype: default each base tensor's dtype.
    """
    spec = get_method(method) if isinstance(method, str) else method
    out = {}
    for name, b in base.items():
        if b.dtype not in FLOAT_DTYPES:
            out[name] = b.clone()
            continue
        xs = [m[name] for m in models]
        p = params(name) if callable(params) else params
        tm = TensorMerge(spec, p, name, b.numel(), seed)
        if chunk_elems is None:
            out[name] = tm.merge_whole(b, xs, out_dtype)
            continue
        flat_b = b.reshape(-1)
        flat_x = [x.reshape(-1) for x in xs]
        spans = [(s, min(s + chunk_elems, b.numel())) for s in range(0, b.numel(), chunk_elems)]
        while tm.pending:
            for s, e in reversed(spans):  # any order works; reversed shows it
                tm.observe(flat_b[s:e], [x[s:e] for x in flat_x], s)
            tm.end_pass()
        parts = [tm.merge(flat_b[s:e], [x[s:e] for x in flat_x], s, out_dtype) for s, e in spans]
        out[name] = (torch.cat(parts) if parts else b.reshape(-1).to(out_dtype or b.dtype)
                     ).reshape(b.shape)
    return out
