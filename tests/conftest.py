"""Test set-up: Triton's interpreter on machines without CUDA (before triton is imported), and
the one way tests reach the public data sets that do not ship with the package."""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def shared_data_dir() -> Path:
    """Where the public data sets live: $SAFEPATCH_SHARED_DATA, else `shared/data` beside the
    repository (`../shared/data` seen from its root)."""
    env = os.environ.get("SAFEPATCH_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")  # pytest's scope: one lookup per test run
def shared_data():
    """The public data sets the package does not ship (harmful training pairs, the judge's
    labelled completions, the evaluation sets' source files; sources and licences in their
    README). Tests that need them take this fixture; nothing else in the repository reads
    them. Absent data skips those tests with the reason, except under CI=true, where it is a
    failure: CI provides the data, so a missing folder there is a broken set-up, not a pass."""
    d = shared_data_dir()
    if not d.is_dir():
        msg = f"public data not found at {d} (set SAFEPATCH_SHARED_DATA to its folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
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
