"""The accelerator pipeline's ordering (merge/transfer.py), checked on the CPU.

A fake device stands in for CUDA: every copy is queued on its stream and happens as late as
the events allow (when something waits on or synchronizes an event after it), device memory
starts as 0xAB garbage, and a copy's source is read only when the copy runs. So compute that
does not wait for its upload, or an output buffer handed to the writer before its download
ran, shows up as wrong output bytes. The merges below must equal the plain CPU merge byte for
byte, and those broken orderings must not. (The fake runs compute eagerly, so an upload has
always run by the time its compute is called: giving a reader slot back before its upload
finished is a mistake only a real GPU can show; Uploader.release_finished synchronizes on the
upload's event for that.)
"""
from __future__ import annotations

import threading

import pytest
import torch
from merge_helpers import build_inputs, dir_bytes, write_config

from safepatch_merge.merge import merge, transfer
from test_classic_engine import _cfg, models  # noqa: F401 - fixture

GARBAGE = 0xAB


class _Stream:
    def __init__(self, name: str):
        self.name = name
        self.ops: list = []  # (seq, callable) not yet run
        self.seq = 0  # number of ops ever queued
        self.ran = 0  # ops [0, ran) have run
        # the SNIP host buffers' worker thread runs copies while the hooks queue more
        self.lock = threading.RLock()

    def push(self, fn) -> None:
        with self.lock:
            self.ops.append((self.seq, fn))
            self.seq += 1

    def run_until(self, seq: int) -> None:
        with self.lock:
            while self.ops and self.ops[0][0] < seq:
                _, fn = self.ops.pop(0)
                fn()
                self.ran += 1


class _Event:
    def __init__(self, stream: _Stream):
        with stream.lock:
            self.stream, self.seq = stream, stream.seq


class FakeAsyncOps:
    """CudaOps' interface over CPU tensors, with every copy deferred as long as allowed."""

    pin = False

    def __init__(self, cache_limit: int = 1 << 40):
        self.compute = _Stream("compute")
        self.copies = 0
        self.limit = cache_limit

    def cache_limit(self) -> int:
        return self.limit

    def new_stream(self):
        return _Stream("side")

    def current_stream(self):
        return self.compute

    def record(self, stream):
        return _Event(stream)

    def wait(self, stream, ev) -> None:
        if stream is self.compute:
            # compute kernels run eagerly when the Python call is made, so whatever the
            # compute stream waits for must have happened by then
            ev.stream.run_until(ev.seq)
        else:
            stream.push(lambda: ev.stream.run_until(ev.seq))

    def query(self, ev) -> bool:
        return ev.stream.ran >= ev.seq

    def synchronize(self, ev) -> None:
        ev.stream.run_until(ev.seq)

    def copy(self, dst, src, stream) -> None:
        self.copies += 1
        stream.push(lambda: dst.copy_(src))

    def retain(self, t, stream) -> None:
        pass  # a deferred copy's closure keeps its source alive

    def pinned(self, nbytes):
        return torch.full((nbytes,), GARBAGE, dtype=torch.uint8)

    def device_bytes(self, nbytes):
        return torch.full((nbytes,), GARBAGE, dtype=torch.uint8)


@pytest.fixture
def fake(monkeypatch):
    ops = FakeAsyncOps()
    monkeypatch.setattr(transfer, "ops_for", lambda device: ops)
    return ops


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    # fp32 scores: the thresholds need a refinement pass, which streams through the device too
    return build_inputs(tmp_path_factory.mktemp("transfer_inputs"), score_dtype=torch.float32)


PARAMS = {"top_rate_se": 0.2, "top_rate_osm": 0.3, "retention": 0.7, "rescale": True}


def _safepatch(inputs, tmp_path, name, **kw):
    cfg = write_config(tmp_path / "c.yaml", inputs, PARAMS, output={"max_shard_size": "30KB"})
    return merge(cfg, tmp_path / name, **kw)


def test_safepatch_merge_through_the_fake_device_equals_the_cpu(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEPATCH_MERGE_MIN_CHUNK", "300")
    _safepatch(inputs, tmp_path, "cpu", max_memory="1KB")
    ops = FakeAsyncOps()
    monkeypatch.setattr(transfer, "ops_for", lambda device: ops)
    res = _safepatch(inputs, tmp_path, "dev", max_memory="1KB")
    assert ops.copies > 50  # many chunks went up and came down
    assert dir_bytes(tmp_path / "cpu") == dir_bytes(tmp_path / "dev")
    st = res.stages
    assert st["prepass"] > 0 and st["stream"] > 0 and "stream.d2h_wait" in st
    assert "prepass.compute" in st  # the threshold refinement streamed


def test_classic_prepass_through_the_fake_device(models, tmp_path, monkeypatch, fake):  # noqa: F811
    cfg = _cfg(models, "ties")
    monkeypatch.setenv("SAFEPATCH_MERGE_MIN_CHUNK", "700")  # chunked: multi-pass statistics
    monkeypatch.setattr(transfer, "ops_for", lambda device: None)
    merge(cfg, tmp_path / "cpu", max_memory="1KB")
    monkeypatch.setattr(transfer, "ops_for", lambda device: fake)
    merge(cfg, tmp_path / "dev", max_memory="1KB")
    assert fake.copies > 20
    assert dir_bytes(tmp_path / "cpu") == dir_bytes(tmp_path / "dev")


@pytest.mark.parametrize("broken", ["no_compute_wait", "written_before_download"])
def test_broken_orderings_are_caught(inputs, tmp_path, monkeypatch, broken):
    """The fake is strict enough: each of these mistakes changes the output."""
    monkeypatch.setenv("SAFEPATCH_MERGE_MIN_CHUNK", "300")
    _safepatch(inputs, tmp_path, "cpu", max_memory="1KB")
    ops = FakeAsyncOps()
    monkeypatch.setattr(transfer, "ops_for", lambda device: ops)
    if broken == "no_compute_wait":
        real = ops.wait
        monkeypatch.setattr(ops, "wait", lambda s, ev: None if s is ops.compute else real(s, ev))
    else:
        monkeypatch.setattr(ops, "synchronize", lambda ev: None)
        monkeypatch.setattr(ops, "query", lambda ev: True)
    _safepatch(inputs, tmp_path, "dev", max_memory="1KB")
    assert dir_bytes(tmp_path / "cpu") != dir_bytes(tmp_path / "dev")


@pytest.mark.parametrize("limit", [1 << 40, 20_000])
def test_prepass_scores_stay_on_the_device(inputs, tmp_path, monkeypatch, limit):
    """Score chunks the threshold refinement brought to the device are kept there (within
    the budget) and not read again by the merge pass; the output does not change."""
    from safepatch_merge.merge import engine

    monkeypatch.setattr(engine, "MAX_CHUNK", 300)  # many chunks, and budget left for the cache
    cpu = _safepatch(inputs, tmp_path, "cpu", max_memory="4GiB")
    ops = FakeAsyncOps(cache_limit=limit)
    monkeypatch.setattr(transfer, "ops_for", lambda device: ops)
    dev = _safepatch(inputs, tmp_path, "dev", max_memory="4GiB")
    assert dir_bytes(tmp_path / "cpu") == dir_bytes(tmp_path / "dev")
    cached = dev.plan.device_cache_bytes
    assert 0 < cached <= limit
    assert cpu.plan.device_cache_bytes == 0
    saved = cpu.bytes_read - dev.bytes_read
    assert cached <= saved <= cached * 1.1  # slot parts are 64-byte aligned
    assert dev.prepass_bytes_read == cpu.prepass_bytes_read > 0
    if limit == 1 << 40:  # every refined score chunk was kept
        assert cached >= 0.9 * dev.prepass_bytes_read
