"""Header parsing/building, checkpoint indexing, the read-ahead reader and the shard writer."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safepatch_merge.errors import CheckpointError
from safepatch_merge.io.checkpoint import open_checkpoint
from safepatch_merge.io.reader import Part, Prefetcher
from safepatch_merge.io.safetensors_header import build_header, read_header
from safepatch_merge.io.writer import MANIFEST, OutputBuilder, plan_shards


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
            "a.bias": torch.randn(3, generator=g),
            "c.ids": torch.arange(11, dtype=torch.int64),
            "d.half": torch.randn(2, 3, 4, generator=g).half(),
            "e.empty": torch.zeros(0, 4)}


def test_read_header_matches_safetensors(tmp_path):
    t = _tensors()
    f = tmp_path / "m.safetensors"
    save_file(t, str(f), metadata={"format": "pt"})
    h = read_header(f)
    assert set(h.tensors) == set(t) and h.metadata == {"format": "pt"}
    starts = [i.start for i in h.tensors.values()]
    assert starts == sorted(starts)
    raw = f.read_bytes()
    for name, info in h.tensors.items():
        assert info.shape == tuple(t[name].shape)
        got = torch.frombuffer(bytearray(raw[info.start:info.end]), dtype=info.torch_dtype) \
            if info.nbytes else torch.zeros(0, dtype=info.torch_dtype)
        assert torch.equal(got.reshape(t[name].shape), t[name])


def test_build_header_is_loadable_and_padded(tmp_path):
    t = _tensors()
    entries = [(n, {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64",
                    torch.float16: "F16"}[v.dtype], tuple(v.shape)) for n, v in t.items()]
    head, offsets = build_header(entries)
    (n,) = struct.unpack("<Q", head[:8])
    assert n % 8 == 0 and len(head) == 8 + n and head.endswith(b" " * (len(head) - 8 - len(
        head[8:].rstrip(b" "))))
    assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
    f = tmp_path / "x.safetensors"
    f.write_bytes(head + b"".join(v.contiguous().view(torch.uint8).numpy().tobytes()
                                  for v in t.values()))
    loaded = load_file(f)
    for k, v in t.items():
        assert torch.equal(loaded[k], v)
    with safe_open(f, "pt") as so:
        assert so.metadata() == {"format": "pt"}


@pytest.mark.parametrize("mutate,needle", [
    (lambda b: b[:5], "truncated safetensors file"),
    (lambda b: struct.pack("<Q", 200_000_000) + b[8:], "header length"),
    (lambda b: b[:8] + b"{" * 8 + b[16:], "not JSON"),
    (lambda b: b[:-3], "truncated shard"),
])
def test_bad_headers(tmp_path, mutate, needle):
    f = tmp_path / "m.safetensors"
    save_file(_tensors(), str(f))
    f.write_bytes(mutate(f.read_bytes()))
    with pytest.raises(CheckpointError, match=needle) as e:
        read_header(f)
    assert str(f) in str(e.value)


def test_overlapping_and_wrong_size_entries(tmp_path):
    def write(obj, data_len):
        raw = json.dumps(obj).encode()
        raw += b" " * (-len(raw) % 8)
        f = tmp_path / "h.safetensors"
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))
        return f

    f = write({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12)
    with pytest.raises(CheckpointError, match="overlap"):
        read_header(f)
    f = write({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8)
    with pytest.raises(CheckpointError, match="'x'.*needs 12"):
        read_header(f)
    f = write({"x": {"dtype": "Q7", "shape": [3], "data_offsets": [0, 8]}}, 8)
    with pytest.raises(CheckpointError, match="invalid dtype 'Q7'"):
        read_header(f)
    f = write({"x": {"dtype": "F4", "shape": [16], "data_offsets": [0, 8]}}, 8)
    with pytest.raises(CheckpointError, match="unsupported dtype 'F4'"):
        read_header(f)


def test_open_checkpoint_sharded_and_outside_paths(tmp_path):
    t = _tensors()
    d = tmp_path / "ck"
    d.mkdir()
    names = list(t)
    save_file({n: t[n] for n in names[:2]}, str(d / "s1.safetensors"))
    save_file({n: t[n] for n in names[2:]}, str(d / "s2.safetensors"))
    wm = {n: ("s1.safetensors" if i < 2 else "s2.safetensors") for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    ck = open_checkpoint(str(d), "backbone")
    assert list(ck.tensors)[:2] == [n for n in ck.tensors if wm[n] == "s1.safetensors"]
    assert set(ck.tensors) == set(t)
    for bad in ("/etc/passwd", "../ck/s1.safetensors/..", "../x.safetensors"):
        wm2 = dict(wm, **{"a.bias": bad})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm2}))
        with pytest.raises(CheckpointError, match="outside"):
            open_checkpoint(str(d), "backbone")
    with pytest.raises(CheckpointError, match="no such directory"):
        open_checkpoint(str(tmp_path / "nope"), "patch_se")


@pytest.mark.parametrize("zero_copy", [True, False])
def test_prefetcher_delivers_every_chunk_in_order(tmp_path, zero_copy):
    t = _tensors()
    f = tmp_path / "m.safetensors"
    save_file(t, str(f))
    ck = open_checkpoint(str(tmp_path), "x")
    items, expect = [], []
    for name, info in ck.tensors.items():
        flat = t[name].reshape(-1)
        for off in range(0, max(info.numel, 1), 3):
            cnt = min(3, info.numel - off)
            items.append([Part("a", info, off, cnt), Part("b", info, 0, info.numel)])
            expect.append((flat[off:off + cnt], flat))
    slot = max(sum(p.nbytes + 64 for p in it) for it in items)
    got = 0
    with Prefetcher(items, slot, depth=2, zero_copy=zero_copy) as pf:
        assert pf.zero_copy is zero_copy
        for item in pf:
            a, b = expect[item.index]
            assert item.index == got
            assert torch.equal(item.views["a"], a) and torch.equal(item.views["b"], b)
            item.release()
            got += 1
    assert got == len(items)


def _mappings_of(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(str(path)))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc")
def test_prefetcher_unmaps_released_windows(tmp_path):
    """Mapped windows live only while their item is out: at most `depth` items' windows at
    once, none after close, and a view kept past release does not crash anything."""
    t = {"w": torch.arange(300_000, dtype=torch.float32)}
    f = tmp_path / "m.safetensors"
    save_file(t, str(f))
    info = open_checkpoint(str(tmp_path), "x").tensors["w"]
    items = [[Part("a", info, o, 10_000)] for o in range(0, 300_000, 10_000)]
    kept = None
    with Prefetcher(items, 40_064, depth=2) as pf:
        for item in pf:
            # this item, the one read ahead, one being unmapped, and the window `kept` pins
            assert _mappings_of(f) <= 3 + (kept is not None)
            assert float(item.views["a"][0]) == item.index * 10_000
            if item.index == 5:
                kept = item.views["a"]
            item.release()
    assert _mappings_of(f) <= 1  # only the window still referenced by `kept`
    assert float(kept[-1]) == 59_999.0
    del kept
    import gc
    gc.collect()
    assert _mappings_of(f) == 0


def test_prefetcher_copies_parts_it_cannot_map(tmp_path):
    """A part whose bytes are not aligned to its element size is copied into a slot."""
    import dataclasses

    f = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.int16)}, str(f))
    info = open_checkpoint(str(tmp_path), "x").tensors["w"]
    odd = dataclasses.replace(info, name="odd", start=info.start + 1, end=info.end - 1)
    raw = f.read_bytes()[odd.start:odd.end]
    want = torch.frombuffer(bytearray(raw), dtype=torch.int16)
    with Prefetcher([[Part("a", odd, 0, odd.numel - 1), Part("b", info, 2, 5)]], 256, 1) as pf:
        (item,) = list(pf)
        assert torch.equal(item.views["a"], want[:odd.numel - 1])
        assert torch.equal(item.views["b"], torch.arange(2, 7, dtype=torch.int16))
        item.release()


def test_prefetcher_reports_file_truncated_after_indexing(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file(_tensors(), str(f))
    ck = open_checkpoint(str(tmp_path), "x")
    info = ck.tensors["b.weight"]
    f.write_bytes(f.read_bytes()[:info.start + 4])
    with Prefetcher([[Part("a", info, 0, info.numel)]], info.nbytes, 1) as pf:
        with pytest.raises(CheckpointError, match="b.weight.*truncated"):
            list(pf)


def test_writer_streams_shards_atomically(tmp_path):
    t = _tensors()
    entries = [(n, {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64",
                    torch.float16: "F16"}[v.dtype], tuple(v.shape)) for n, v in t.items()]
    shards = plan_shards(entries, 100)
    assert len(shards) > 1 and all(s.filename.endswith(f"-of-{len(shards):05d}.safetensors")
                                   for s in shards)
    out = tmp_path / "out"
    b = OutputBuilder(out, "plan-1")
    b.open()
    for s in shards:
        w = b.shard(s)
        for name, _, _ in s.entries:
            flat = t[name].reshape(-1)
            w.write(flat[:2])
            w.write(flat[2:])
        assert not (b.partial / s.filename).exists()
        w.finish()
        assert (b.partial / s.filename).exists()
        assert s.filename in json.loads((b.partial / MANIFEST).read_text())["shards"]
    assert not out.exists()
    b.finish()
    assert out.exists() and not b.partial.exists() and not (out / MANIFEST).exists()
    for s in shards:
        loaded = load_file(out / s.filename)
        for name, _, _ in s.entries:
            assert torch.equal(loaded[name], t[name])


@pytest.mark.parametrize("zero_copy", [True, False])
def test_prefetcher_check_runs_on_the_reader_thread(tmp_path, zero_copy):
    """check(part, chunk) sees every part's bytes on the reader thread; what it raises
    reaches the consumer after the items before it, in order."""
    import threading

    f = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(f))
    info = open_checkpoint(str(tmp_path), "x").tensors["w"]
    seen = []

    def check(part, chunk):
        seen.append((threading.current_thread().name, part.key, part.elem_start,
                     float(chunk[0]), chunk.dtype))
        if part.elem_start == 500:
            raise CheckpointError("bad chunk at 500")

    items = [[Part("s", info, o, 100)] for o in range(0, 1000, 100)]
    got = []
    with Prefetcher(items, 512, depth=2, zero_copy=zero_copy, check=check) as pf:
        with pytest.raises(CheckpointError, match="bad chunk at 500"):
            for item in pf:
                got.append(float(item.views["s"][0]))
                item.release()
    assert got == [0.0, 100.0, 200.0, 300.0, 400.0]
    assert seen[:6] == [("safepatch-reader", "s", o, float(o), torch.float32)
                        for o in range(0, 600, 100)]
