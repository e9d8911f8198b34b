"""The low-layer helpers every stage shares: device resolution, version records, atomic
writes, local model loading."""
from __future__ import annotations

import platform

import pytest
import torch

from safepatch_merge import __version__
from safepatch_merge.devices import resolve_device
from safepatch_merge.errors import CheckpointError, ConfigError
from safepatch_merge.io.atomic import write_atomic
from safepatch_merge.versions import TRAINING_LIBRARIES, versions


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"--device: unknown device 'gpu0'"):
        resolve_device("gpu0", "--device")
    with pytest.raises(ConfigError, match="unknown device 'auto'"):
        resolve_device("auto", allow_auto=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_resolve_device_refuses_missing_cuda():
    with pytest.raises(ConfigError, match="device cuda:1: CUDA is not available"):
        resolve_device("cuda:1")


def test_versions():
    v = versions()
    assert list(v)[:3] == ["python", "torch", "safepatch_merge"]
    assert v["python"] == platform.python_version() and v["torch"] == torch.__version__
    assert v["safepatch_merge"] == __version__ and "safetensors" in v and "peft" not in v
    assert "transformers" in versions(TRAINING_LIBRARIES)
    assert "no_such_library_here" not in versions(("no_such_library_here",))


def test_write_atomic_text_and_bytes(tmp_path):
    target = tmp_path / "new" / "dir" / "f.json"
    write_atomic(target, "é\n")
    assert target.read_bytes() == "é\n".encode("utf-8")
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]


def test_load_local_names_the_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    from safepatch_merge.models.loading import load_local

    with pytest.raises(CheckpointError, match=rf"{tmp_path}: cannot load guard model \("):
        load_local(AutoModelForCausalLM, tmp_path, "guard model")
