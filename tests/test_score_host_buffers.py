"""SNIP with the score buffers in host memory (score/host_buffers.py) gives the device
buffers' scores bit for bit. On the CPU the staging path runs through a fake asynchronous
device (tests/test_transfer.py's): its copies happen only when an event is waited on, into
slots that start as garbage. On a GPU it must also hold less device memory (and equal
autograd there: tests/test_score_snip.py's CUDA test runs both buffers)."""
import pytest
import torch
from conftest import requires_cuda
from test_score_snip import _autograd_scores, _assert_close_scores, _setup
from test_transfer import FakeAsyncOps

from safepatch_merge import cuda_streams
from safepatch_merge.derive.dataset import PairCollator
from safepatch_merge.derive.loss import per_example_nll
from safepatch_merge.score import host_buffers
from safepatch_merge.score.snip import SnipAccumulator, scored_parameters, snip_scores


def _score(model, tok, ex, params, **kw):
    return snip_scores(model, ex, tok.pad_token_id, params, batch_size=3, **kw)[0]


def _assert_identical(a, b):
    assert list(a) == list(b)
    for n in a:
        assert a[n].device.type == "cpu" and a[n].dtype == torch.float32
        assert torch.equal(a[n], b[n]), n


@pytest.fixture
def fake(monkeypatch):
    ops = FakeAsyncOps()
    monkeypatch.setattr(cuda_streams, "ops_for", lambda device: ops)
    return ops


def _ring(monkeypatch, slot_bytes, slots):
    monkeypatch.setattr(host_buffers, "SLOT_BYTES", slot_bytes)
    monkeypatch.setattr(host_buffers, "SLOTS", slots)


@pytest.mark.parametrize("accumulation", ["signed", "abs_per_batch"])
@pytest.mark.parametrize("slot_bytes,slots", [(1 << 20, 4), (4096, 2), (256, 1), (1000, 3)])
def test_host_buffers_equal_device_buffers(fake, monkeypatch, accumulation, slot_bytes, slots):
    # small slots split every weight over several slots and pack small ones together; one
    # slot makes a hook wait for the worker each time it needs a slot (the ring's backpressure)
    _ring(monkeypatch, slot_bytes, slots)
    model, tok, ex, params = _setup(True)
    dev = _score(model, tok, ex, params, accumulation=accumulation)
    copies = fake.copies
    host = _score(model, tok, ex, params, accumulation=accumulation, buffers="host")
    assert fake.copies - copies >= 3 * len(params)  # every gradient went through the fake
    _assert_identical(host, dev)
    assert all(p.grad is None for p in model.parameters())
    if accumulation == "signed":
        _assert_close_scores(host, _autograd_scores(model, ex, tok.pad_token_id), 2e-5)


def test_on_the_cpu_host_buffers_are_the_device_buffers():
    model, tok, ex, params = _setup(False)
    acc = SnipAccumulator(params, "signed", "host")
    acc.remove()
    assert acc.host is None  # no staging ring for a model already in host memory
    _assert_identical(_score(model, tok, ex, params, buffers="host"), _score(model, tok, ex, params))


def test_small_gradients_share_a_slot(fake, monkeypatch):
    """The worker gets one job per slot, not per parameter: 3 batches of this model's
    gradients (about 140 KB each) fit one 1 MiB slot, and 8 KiB slots are filled to the brim
    (up to 63 bytes of alignment per part): fewer jobs than parameters × batches."""
    model, tok, ex, params = _setup(False)
    grad_bytes = sum(p.numel() * p.element_size() for p in params.values())
    packed = -(-3 * (grad_bytes + 64 * len(params)) // 8192)
    for slot_bytes, most in ((1 << 20, 1), (8192, packed)):
        _ring(monkeypatch, slot_bytes, 2)
        acc = SnipAccumulator(params, "signed", "host")
        collate = PairCollator(tok.pad_token_id)
        for i in range(0, 7, 3):
            b = collate(ex[i:i + 3])
            acc.scale = len(ex[i:i + 3]) / 7
            per_example_nll(model(input_ids=b["input_ids"],
                                  attention_mask=b["attention_mask"]).logits,
                            b["labels"]).mean().backward()
        scores = acc.finalize()
        assert 1 <= acc.host.handed <= most < 3 * len(params), (slot_bytes, acc.host.handed)
        _assert_close_scores(scores, _autograd_scores(model, ex, tok.pad_token_id), 2e-5)


def test_a_worker_that_does_not_wait_for_the_copy_is_caught(fake, monkeypatch):
    """The fake runs a slot's copies only when its event is waited on, so a worker that adds
    without waiting reads garbage. (A slot refilled too early is something only a GPU can
    show: the fake copies when waited on, and the ring hands a slot out again only after the
    worker's add.)"""
    _ring(monkeypatch, 4096, 2)
    model, tok, ex, params = _setup(False)
    dev = _score(model, tok, ex, params)
    monkeypatch.setattr(fake, "synchronize", lambda ev: None)
    host = _score(model, tok, ex, params, buffers="host")
    assert any(not torch.equal(host[n], dev[n]) for n in dev)


def test_a_failing_host_add_is_raised_and_the_worker_stops(fake, monkeypatch):
    _ring(monkeypatch, 4096, 2)
    model, tok, ex, params = _setup(False)
    threads = []
    real = host_buffers.HostScoreBuffers.__init__

    def init(self, params, ops, accumulate, *a, **kw):
        def boom(name, *args):
            if name == "model.layers.0.mlp.up_proj.weight":
                raise ValueError("disk on fire")
            accumulate(name, *args)
        real(self, params, ops, boom, *a, **kw)
        threads.append(self.thread)

    monkeypatch.setattr(host_buffers.HostScoreBuffers, "__init__", init)
    with pytest.raises(RuntimeError, match="host score accumulation failed: disk on fire"):
        _score(model, tok, ex, params, buffers="host")
    assert threads and not threads[0].is_alive()
    assert all(p.grad is None for p in model.parameters())


def test_bad_buffers_value():
    from safepatch_merge.errors import ConfigError
    from safepatch_merge.score.api import ScoreConfig

    model, tok, ex, params = _setup(False)
    with pytest.raises(ValueError, match="buffers must be one of"):
        _score(model, tok, ex, params, buffers="disk")
    with pytest.raises(ConfigError, match="score buffers must be device or host, got 'gpu'"):
        ScoreConfig(score_buffers="gpu").validate()


@requires_cuda
@pytest.mark.gpu
def test_host_buffers_hold_less_device_memory():
    """Two equal batches through a bf16 model: with device buffers the second batch's
    activations meet every fp32 buffer; with host buffers at most the bf16 gradients whose
    copies are in flight, half the buffers' size."""
    model, tok, ex, _ = _setup(False)
    model = model.to(device="cuda", dtype=torch.bfloat16)
    same = [ex[0]] * 6
    params = scored_parameters(model, {n: tuple(p.shape) for n, p in model.state_dict().items()})
    peaks = {}
    for buffers in ("device", "host", "device"):  # the first run warms up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        snip_scores(model, same, tok.pad_token_id, params, batch_size=3, buffers=buffers)
        torch.cuda.synchronize()
        peaks[buffers] = torch.cuda.max_memory_allocated() - base
    buffer_bytes = sum(p.numel() * 4 for p in params.values())
    assert peaks["host"] <= peaks["device"] - buffer_bytes // 2, (peaks, buffer_bytes)
