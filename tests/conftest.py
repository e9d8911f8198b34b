"""Test set-up: Triton's interpreter on machines without CUDA (before triton is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from safepatch_merge.paths import shared_data_dir  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data (the workplace's public data sets). Missing data is a failure, not a skip."""
    d = shared_data_dir()
    if not d.is_dir():
        pytest.fail(f"shared data not found at {d}; set SAFEPATCH_SHARED_DATA")
    return d


def pytest_collection_modifyitems(config, items):
    """SAFEPATCH_TEST_SHARD=i/n keeps every n-th collected test starting at i (0-based), so a
    GPU host can run one long file in n processes at once (bench/gpu_check.sh: Triton compiles
    a kernel variant per parametrisation, on one core per process)."""
    spec = os.environ.get("SAFEPATCH_TEST_SHARD", "").strip()
    if not spec:
        return
    try:
        i, n = (int(x) for x in spec.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"SAFEPATCH_TEST_SHARD={spec!r}: expected i/n with 0 <= i < n")
    keep = [it for k, it in enumerate(items) if k % n == i]
    config.hook.pytest_deselected(items=[it for k, it in enumerate(items) if k % n != i])
    items[:] = keep
