"""Plain-torch reference of every op: the ground truth for tests and the slow fallback.

Conventions shared by all backends (docs/design.md §1.4–§2):

* Score keys. A score s (fp32, bf16 or fp16) is compared through the 32-bit pattern of
  float32(s), read as an unsigned integer; -0 maps to key 0 and every NaN (any sign or
  payload) to the one key 0x7FC00000 (widening fp16 NaNs quiets them on some code paths and
  not on others, so raw NaN bits would differ by backend). Non-negative floats order like
  their keys, so thresholds, histograms and masks are exact integer operations and agree
  bit for bit across devices (no denormal flushing can change a comparison). Negative scores
  have keys >= 2^31 and inf/NaN keys >= 0x7F800000: digit-0 histograms expose them for free.
* Selection: element selected iff key(S) >= key(t) and key(S) > 0 (ties at t in, zeros out).
  t = +inf selects nothing.
* Retention order. ``after_selection``: T_X = selected elements, applied_X = M_X and R_X.
  ``before_selection``: T_X = selected and R_X (thresholds come from histograms of the retained
  scores), M_X by mode from those T_X, applied_X = M_X. Mode ``none`` has no selection and is
  the same under both orders (applied_X = R_X); so is p == 1 (R_X is all ones).
* Retained histograms (before_selection): a non-retained element counts as key 0, except an
  invalid score (key >= 0x7F800000: inf, NaN, negative) keeps its key, so a histogram of
  retained scores still exposes every invalid score.
* Merge arithmetic in fp32: acc = base; if applied_se: acc = acc + c_se * d_se;
  if applied_osm: acc = acc + c_osm * d_osm; out = acc rounded (nearest-even) to out dtype,
  where c_X = float32(alpha_or_beta / s), s = p if rescale else 1, and d_X = float32(patch_X)
  (deltas) or float32(patch_X) - float32(base) (full patched tensors). Elements whose masks are
  off keep the base value exactly (including -0; NaN in a dropped patch element stays out).
"""
from __future__ import annotations

import torch

from .philox import PATCH_OSM, PATCH_SE, retention_mask

NUM_BINS = 1 << 16
MODES = ("difference", "intersection", "topk", "none")
RETENTION_ORDERS = ("after_selection", "before_selection")
_SIGN = 0x80000000
_INF_KEY = 0x7F800000
_NAN_KEY = 0x7FC00000  # the one key of every NaN score


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 tensor (same shape) of the uint32 keys of float32(scores); -0 -> 0, NaN -> 0x7FC00000."""
    k = scores.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    k = torch.where(k == _SIGN, torch.zeros_like(k), k)
    return torch.where((k & 0x7FFFFFFF) > _INF_KEY, torch.full_like(k, _NAN_KEY), k)


def threshold_key(t: float) -> int:
    """Key of the fp32 threshold t (t >= 0 or +inf; -0 -> 0)."""
    return int(score_keys(torch.tensor([t], dtype=torch.float32))[0])


def saliency_accumulate_(score: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                         scale: float = 1.0) -> torch.Tensor:
    """In place: score += float32(scale) * (float32(weight) * float32(grad)); returns score."""
    prod = weight.to(torch.float32) * grad.to(torch.float32)
    score.add_(prod * torch.tensor(scale, dtype=torch.float32))
    return score


def saliency_finalize_(score: torch.Tensor) -> torch.Tensor:
    """In place: score = |score| (the SNIP absolute value, taken once at the end)."""
    return score.abs_()


def retained_keys(scores: torch.Tensor, p: float, seed: int, name: str, patch_id: int,
                  offset: int) -> torch.Tensor:
    """int64 (numel,) keys of the flattened scores with non-retained valid scores set to 0
    (retention words of elements offset.. of tensor `name`, patch `patch_id`)."""
    k = score_keys(scores).reshape(-1)
    keep = retention_mask(k.numel(), offset, seed, name, patch_id, p, device=k.device)
    return torch.where(keep | (k >= _INF_KEY), k, torch.zeros_like(k))


def radix_histogram(scores: torch.Tensor, prefix: int = 0, digit: int = 0, *, p: float = 1.0,
                    seed: int = 0, name: str = "", patch_id: int = 0,
                    offset: int = 0) -> torch.Tensor:
    """int64 (65536,) histogram of one 16-bit digit of the score keys.

    digit 0: bins over key >> 16 for all elements (prefix ignored).
    digit 1: bins over key & 0xFFFF for the elements whose key >> 16 == prefix.
    p < 1: keys of the retained scores (:func:`retained_keys`; seed, name, patch_id, offset
    as in masked_merge).
    """
    if p < 1.0:
        k = retained_keys(scores, p, seed, name, patch_id, offset)
    else:
        k = score_keys(scores).reshape(-1)
    if digit == 0:
        d = k >> 16
    else:
        d = (k[(k >> 16) == prefix]) & 0xFFFF
    return torch.bincount(d, minlength=NUM_BINS).to(torch.int64)


def selection_mask(scores: torch.Tensor, t: float) -> torch.Tensor:
    """Bool mask of S >= t and S > 0, compared through keys."""
    k = score_keys(scores)
    return (k >= threshold_key(t)) & (k > 0)


def masked_merge(base: torch.Tensor, patch_se: torch.Tensor | None, patch_osm: torch.Tensor | None,
                 score_se: torch.Tensor | None, score_osm: torch.Tensor | None, *,
                 t_se: float, t_osm: float, mode: str, alpha: float, beta: float, p: float,
                 rescale: bool, seed: int, name: str, offset: int, patches_are_deltas: bool,
                 out_dtype: torch.dtype, return_masks: bool = False,
                 retention_order: str = "after_selection",
                 applied_counts: torch.Tensor | None = None):
    """Reference masked merge of one tensor or chunk (arguments validated by the caller).
    applied_counts: int64 (2,) tensor to which the numbers of applied SE / OSM elements are
    added (in place)."""
    n = base.numel()
    b = base.to(torch.float32).reshape(-1)
    s = p if rescale else 1.0
    coeff = {PATCH_SE: alpha / s, PATCH_OSM: beta / s}
    retain_first = retention_order == "before_selection" and mode != "none"

    def kept(pid):
        return retention_mask(n, offset, seed, name, pid, p, device=base.device)

    def selected(score, patch, t, pid):
        if patch is None:
            return torch.zeros(n, dtype=torch.bool, device=base.device)
        if mode == "none":
            return torch.ones(n, dtype=torch.bool, device=base.device)
        sel = selection_mask(score.reshape(-1), t)
        return sel & kept(pid) if retain_first else sel

    # Thresholds passed explicitly: the same tensor may serve as both scores.
    in_se = selected(score_se, patch_se, t_se, PATCH_SE)
    in_osm = selected(score_osm, patch_osm, t_osm, PATCH_OSM)
    if mode == "difference":
        m = {PATCH_SE: in_se & ~in_osm, PATCH_OSM: in_osm & ~in_se}
    elif mode == "intersection":
        both = in_se & in_osm
        m = {PATCH_SE: both, PATCH_OSM: both}
    else:  # topk, none
        m = {PATCH_SE: in_se, PATCH_OSM: in_osm}

    acc = b.clone()
    applied = {}
    for pid, patch in ((PATCH_SE, patch_se), (PATCH_OSM, patch_osm)):
        if patch is None:
            applied[pid] = torch.zeros(n, dtype=torch.bool, device=base.device)
            continue
        applied[pid] = m[pid] if retain_first else m[pid] & kept(pid)
        d = patch.to(torch.float32).reshape(-1)
        if not patches_are_deltas:
            d = d - b
        c = torch.tensor(coeff[pid], dtype=torch.float32)
        acc = torch.where(applied[pid], acc + c * d, acc)
    out = acc.to(out_dtype).reshape(base.shape)
    if applied_counts is not None:
        applied_counts += torch.stack([applied[PATCH_SE].sum(), applied[PATCH_OSM].sum()]).to(
            applied_counts)
    if return_masks:
        return out, applied[PATCH_SE].reshape(base.shape), applied[PATCH_OSM].reshape(base.shape)
    return out
