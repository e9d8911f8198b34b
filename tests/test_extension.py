"""Building and loading the C++ extension: cache naming, SAFEPATCH_NO_EXT, failed builds."""
import logging

import pytest
import torch

from op_cases import require_backend
from safepatch_merge import ops
from safepatch_merge.ops import _extension, cpp_backend


def test_builds_and_registers_the_ops():
    require_backend("cpp", "cpu")
    for name in ("saliency_accumulate_", "radix_histogram", "masked_merge", "philox_words"):
        assert hasattr(torch.ops.safepatch, name)
    if not ops._requested():
        assert ops.backend_for("cpu")[0] == "cpp"  # the automatic choice for CPU tensors
    root = _extension.csrc_dir()
    assert (root / "philox.h").is_file() and (root / "ops.cpp").is_file()


def test_build_name_tracks_sources_and_torch(tmp_path):
    (tmp_path / "a.cpp").write_text("int a;")
    src = [tmp_path / "a.cpp"]
    n1 = _extension._build_name(src, tmp_path, ("flags",))
    assert torch.__version__.split("+")[0].replace(".", "_") in n1
    (tmp_path / "a.cpp").write_text("int a = 1;")
    n2 = _extension._build_name(src, tmp_path, ("flags",))
    (tmp_path / "b.h").write_text("// header")
    n3 = _extension._build_name(src, tmp_path, ("flags",))
    assert len({n1, n2, n3, _extension._build_name(src, tmp_path, ("other",))}) == 4
    assert n1.isidentifier()


def test_no_ext_disables(monkeypatch):
    monkeypatch.setenv("SAFEPATCH_NO_EXT", "1")
    assert not cpp_backend.available("cpu")
    assert ops.backend_for("cpu")[0] == "reference"


def test_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("SAFEPATCH_NO_EXT", raising=False)
    broken = tmp_path / "csrc"
    (broken / "cpu").mkdir(parents=True)
    (broken / "ops.cpp").write_text("#error deliberately broken source\n")
    monkeypatch.setattr(_extension, "csrc_dir", lambda: broken)
    monkeypatch.setattr(_extension, "_state", {})
    monkeypatch.setenv("SAFEPATCH_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="safepatch_merge.ops"):
        assert _extension.load() is False
        assert _extension.load() is False
        assert not cpp_backend.available("cpu")
    warnings = [r for r in caplog.records if "C++ extension is unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert "falling back to the plain-torch reference" in warnings[0].getMessage()
    assert _extension.error()
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available"):
        ops.set_backend("cpp")
        try:
            ops.backend_for("cpu")
        finally:
            ops.set_backend(None)


def test_automatic_choice_per_op_and_device(monkeypatch):
    """On CUDA, radix_histogram (10x the Triton kernel's bandwidth on an H200) and
    saliency_accumulate_ (same bandwidth, far cheaper launch from the per-parameter hooks)
    prefer the CUDA C++ kernel, the other ops Triton; each falls back down its order when
    unavailable."""
    monkeypatch.delenv("SAFEPATCH_BACKEND", raising=False)
    ops.set_backend(None)
    avail = {"reference", "cpp", "triton"}
    monkeypatch.setattr(ops, "_backend_module",
                        lambda name, device: name if name in avail else None)
    assert ops.backend_for("cuda", "radix_histogram")[0] == "cpp"
    assert ops.backend_for("cuda", "masked_merge")[0] == "triton"
    assert ops.backend_for("cuda", "saliency_accumulate_")[0] == "cpp"
    assert ops.backend_for("cuda")[0] == "triton"
    assert ops.backend_for("cpu", "radix_histogram")[0] == "cpp"
    avail.discard("cpp")  # extension built without CUDA sources
    assert ops.backend_for("cuda", "radix_histogram")[0] == "triton"
    assert ops.backend_for("cuda", "saliency_accumulate_")[0] == "triton"
    assert ops.backend_for("cpu", "radix_histogram")[0] == "reference"
    avail.discard("triton")
    assert ops.backend_for("cuda", "radix_histogram")[0] == "reference"
    avail.update({"cpp", "triton"})
    ops.set_backend("triton")  # a forced backend serves every op
    try:
        assert ops.backend_for("cuda", "radix_histogram")[0] == "triton"
    finally:
        ops.set_backend(None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_histogram_runs_on_the_cuda_extension():
    if not cpp_backend.available("cuda"):
        pytest.skip(f"the extension has no CUDA kernels here ({_extension.error()})")
    if ops._requested():
        pytest.skip("a backend is forced")
    assert ops.backend_for("cuda", "radix_histogram")[0] == "cpp"
    assert ops.backend_for("cuda", "masked_merge")[0] == "triton"
