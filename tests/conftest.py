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
