"""The merge pass's value checks: scores finite and >= 0 (-0 allowed), merged values finite;
checked per chunk on the CPU, or accumulated per tensor and judged once (device chunks)."""
import math

import pytest
import torch

from safepatch_merge.errors import CheckpointError, ConfigError
from safepatch_merge.merge.value_checks import ValueWatch


@pytest.mark.parametrize("defer", [False, True])
def test_scores_must_be_finite_and_non_negative(defer):
    good = torch.tensor([0.0, -0.0, 1.5, 3e38])
    w = ValueWatch(defer)
    w.scores("scores_se /s", "a", good, 0)
    w.scores("scores_se /s", "a", good.bfloat16(), 4)
    w.check()
    for bad, word in ((-1e-30, "negative"), (math.nan, "NaN/inf"), (math.inf, "NaN/inf")):
        w = ValueWatch(defer)
        w.scores("scores_se /s", "a", good, 0)
        t = good.clone()
        t[2] = bad
        with pytest.raises(CheckpointError) as e:
            w.scores("scores_se /s", "b", t, 100)
            w.check()
        msg = str(e.value)
        assert msg.startswith("scores_se /s: scores of tensor 'b' contain") and word in msg
        if not defer:
            assert "first at element 102" in msg


@pytest.mark.parametrize("defer", [False, True])
def test_merged_values_must_be_finite(defer):
    w = ValueWatch(defer)
    w.output("x", torch.tensor([-1.0, 2.0]), 0)
    w.output("i", torch.tensor([1, 2]), 0)  # integer tensors are never checked
    w.check()
    with pytest.raises(ConfigError, match="merged tensor 'y' has .*NaN/inf.*allow_nonfinite"
                       ) as e:
        w.output("y", torch.tensor([1.0, -math.inf], dtype=torch.float16), 7)
        w.check()
    assert ("first at element 8" in str(e.value)) is not defer
