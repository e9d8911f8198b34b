"""The value checks a merge runs off its compute thread: scores finite and >= 0 (-0 allowed)
on the reader thread, merged values finite on the writer thread."""
import math

import pytest
import torch

from safepatch_merge.errors import CheckpointError, ConfigError
from safepatch_merge.merge.value_checks import check_output, check_scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scores_must_be_finite_and_non_negative(dtype):
    good = torch.tensor([0.0, -0.0, 1.5, 6e4, 0.0]).to(dtype)
    check_scores("scores_se /s", "a", good, 0)
    check_scores("scores_se /s", "a", good[1:], 1)  # not contiguous from an aligned start
    for bad, word in ((-1e-3, "1 negative"), (math.nan, "1 NaN/inf"), (math.inf, "1 NaN/inf"),
                      (-math.inf, "1 negative and 1 NaN/inf")):
        t = good.clone()
        t[2] = bad
        with pytest.raises(CheckpointError) as e:
            check_scores("scores_se /s", "b", t, 100)
        assert str(e.value) == (f"scores_se /s: scores of tensor 'b' contain {word} values "
                                "(first at element 102); saliency scores must be finite and >= 0")


def test_merged_values_must_be_finite():
    check_output("x", torch.tensor([-1.0, 2.0]), 0)
    check_output("i", torch.tensor([1, 2]), 0)  # integer tensors are never checked
    with pytest.raises(ConfigError, match="merged tensor 'y' has 1 NaN/inf values \\(first at "
                                          "element 8\\).*allow_nonfinite"):
        check_output("y", torch.tensor([1.0, -math.inf], dtype=torch.float16), 7)
