"""Seeded fuzzing of the checkpoint reader: mutated safetensors headers and index files.

Headers: every case is checked against the safetensors library itself (`safe_open`). Where it
accepts a file, our reader must accept it with the same tensors (names, dtypes, shapes, bytes)
and metadata -- except the three forms we refuse on purpose (io/safetensors_header.py: dtypes
torch cannot hold here, a tensor entry written as a JSON array, a dtype written as an object).
Where it refuses, our reader must raise a one-line CheckpointError. Indexes: our reader must
give exactly the tensors a reference reading of the mutated index names (each read with
`safe_open`), or a one-line CheckpointError. Never another exception, never a hang: each case
runs under a time limit.
"""
from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hostile_helpers import time_limit
from safepatch_merge.errors import CheckpointError
from safepatch_merge.io.checkpoint import open_checkpoint
from safepatch_merge.io.safetensors_header import DTYPES, read_header

HEADER_CASES = 400
INDEX_CASES = 200
CASE_SECONDS = 5.0
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
         "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class Raw(str):
    """JSON text emitted verbatim (numbers and strings Python's json would not write)."""


class Pairs(list):
    """A JSON object as [(key, value)]: keys may repeat."""


def dump(o) -> str:
    if isinstance(o, Raw):
        return str(o)
    if isinstance(o, (Pairs, dict)):
        items = o if isinstance(o, Pairs) else list(o.items())
        return "{" + ",".join(f"{dump(k) if isinstance(k, Raw) else json.dumps(k)}:{dump(v)}"
                              for k, v in items) + "}"
    if isinstance(o, list):
        return "[" + ",".join(dump(x) for x in o) + "]"
    return json.dumps(o)


def nested(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


WEIRD_VALUES = [None, True, 1.5, "x", [], {}, -1, Raw("-0"), Raw("2.0"), Raw("2e0"),
                Raw("NaN"), Raw("Infinity"), Raw("1e400"), Raw("1" + "0" * 25),
                Raw("18446744073709551616"), 2**64 - 1, 2**63, 2**32, Raw("9" * 320),
                Raw('"\\ud800"'), nested(126), nested(127), nested(128), nested(5000)]


def base_header(rng: random.Random):
    """(entries Pairs, metadata, data bytes): a valid header of 0-5 tensors."""
    names = rng.sample(["w", "b", "model.layers.0.q", "é", "x.y", "", "z"], rng.randint(0, 5))
    dts = ["F32", "BF16", "F16", "I64", "U8", "BOOL", "I32", "F64", "I8", "U16"]
    infos, pos = [], 0
    for n in names:
        dt = rng.choice(dts)
        shape = [rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.randint(0, 3))]
        nb = SIZES[dt]
        for d in shape:
            nb *= d
        infos.append((n, {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + nb]}))
        pos += nb
    rng.shuffle(infos)  # any order in the JSON
    entries = Pairs((n, Pairs(e.items())) for n, e in infos)
    meta = rng.choice([None, {"format": "pt"}, {"a": "b", "c": ""}, "absent"])
    data = bytes(rng.getrandbits(8) for _ in range(pos))
    return entries, meta, data


def mutate_entry(rng, entries: Pairs) -> None:
    if not entries:
        entries.append(("new", Pairs([("dtype", "F32"), ("shape", [1]),
                                      ("data_offsets", [0, 4])])))
        return
    i = rng.randrange(len(entries))
    name, ent = entries[i]
    fields = dict(ent) if isinstance(ent, Pairs) else {}
    op = rng.randrange(9)
    if op == 0:
        fields["dtype"] = rng.choice(["F32", "BF16", "I64", "U8", "F4", "C64", "F8_E8M0",
                                      "f32", "Q7", "", 5, None, {"F32": None}, ["F32"]])
    elif op == 1:
        shape = list(fields.get("shape", []))
        if shape and rng.random() < 0.5:
            shape[rng.randrange(len(shape))] = rng.choice(WEIRD_VALUES + [0, 1, 2, 4])
        else:
            shape.append(rng.choice([0, 1, 2, 2**33, 2**64 - 1]))
        fields["shape"] = shape
    elif op == 2:
        offs = list(fields.get("data_offsets", [0, 0]))
        k = rng.randrange(5)
        if k == 0 and len(offs) == 2:
            offs[rng.randrange(2)] += rng.choice([-8, -1, 1, 4])
        elif k == 1:
            offs = offs[::-1]
        elif k == 2:
            offs.append(0)
        elif k == 3 and offs:
            offs[rng.randrange(len(offs))] = rng.choice(WEIRD_VALUES)
        else:
            offs = rng.choice([None, "0,4", {"0": 0}, [0]])
        fields["data_offsets"] = offs
    elif op == 3 and fields:
        fields.pop(rng.choice(list(fields)))
    elif op == 4:  # a field given twice
        k = rng.choice(["dtype", "shape", "data_offsets", "extra"])
        ent = Pairs(list(fields.items()) + [(k, fields.get(k, 1))])
        entries[i] = (name, ent)
        return
    elif op == 5:  # an unknown field
        fields[rng.choice(["extra", "quant", "__x"])] = rng.choice(WEIRD_VALUES)
    elif op == 6:  # the entry as a JSON array, null or a scalar
        entries[i] = (name, rng.choice([[fields.get("dtype"), fields.get("shape"),
                                         fields.get("data_offsets")], None, 3, "F32"]))
        return
    elif op == 7:  # the name
        entries[i] = (rng.choice(["", "é", "__metadata__", Raw('"\\ud83d\\ude00"'),
                                  Raw('"\\ud800"'), Raw('"a\\u0000b"'), Raw('"a\x01b"'),
                                  entries[rng.randrange(len(entries))][0]]), ent)
        return
    else:
        fields["shape"], fields["data_offsets"] = [0, 2**63], [0, 0]
    entries[i] = (name, Pairs(fields.items()))


def header_case(rng: random.Random) -> bytes:
    """The bytes of one (probably) damaged safetensors file."""
    entries, meta, data = base_header(rng)
    top_meta = None if meta == "absent" else meta
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        kind = rng.random()
        if kind < 0.7:
            mutate_entry(rng, entries)
        elif kind < 0.85:
            top_meta = rng.choice([None, [], {"a": 1}, {"a": {"b": "c"}}, {"a": Raw('"\\udc00"')},
                                   {"a": nested(200)}, Pairs([("a", "1"), ("a", "2")])])
        elif kind < 0.9:
            entries.append(("__metadata__", {"format": "pt"}))
        else:
            entries.append((f"pad{rng.randrange(9)}", Pairs([("dtype", "U8"), ("shape", [0]),
                                                            ("data_offsets", [0, 0])])))
    items = Pairs(list(entries))
    if meta != "absent" or top_meta is not None:
        items.insert(rng.randrange(len(items) + 1), ("__metadata__", top_meta))
    text = dump(items)
    if rng.random() < 0.05:
        text = dump(rng.choice([[], 5, "x", None]))
    raw = text.encode("utf-8", "surrogatepass")
    k = rng.random()
    if k < 0.1:
        raw = rng.choice([b" ", b"\t", b"\n", b"\r", b"\x0c", b"\x00", b"\xef\xbb\xbf"]) + raw
    elif k < 0.2:
        raw += rng.choice([b" " * rng.randrange(1, 9), b"\n", b"\x00", b"x"])
    elif k < 0.25 and raw:
        j = rng.randrange(len(raw))
        raw = raw[:j] + bytes([rng.getrandbits(8)]) + raw[j + 1:]
    n = len(raw)
    k = rng.random()
    if k < 0.05:
        n = rng.choice([0, n - 1, n + 1, n + 8, 2**40, 2**64 - 1])
    blob = struct.pack("<Q", n) + raw + data
    k = rng.random()
    if k < 0.08:
        blob = blob[:rng.randrange(len(blob) + 1)]
    elif k < 0.14:
        blob += bytes(rng.randrange(1, 9))
    return blob


def reference(path):
    """('ok', {name: (dtype, shape)}, metadata, {name: bytes}) from safetensors, or ('err',)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            info = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape()))
                    for k in f.keys()}
            meta = f.metadata() or {}
            data = {}
            for k, (dt, shape) in info.items():
                if dt in DTYPES and all(d < 2**31 for d in shape):
                    data[k] = f.get_tensor(k).reshape(-1).view(torch.uint8).numpy().tobytes()
        return "ok", info, meta, data
    except Exception:  # noqa: BLE001 - any refusal by the library
        return ("err",)


def lenient_forms(blob: bytes) -> set[str]:
    """Which of our deliberate refusals a header uses (parsed leniently)."""
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        obj = json.loads(blob[8:8 + n])
    except Exception:  # noqa: BLE001
        return set()
    forms = set()
    for k, v in (obj.items() if isinstance(obj, dict) else []):
        if k == "__metadata__":
            continue
        if isinstance(v, list):
            forms.add("not a JSON object")
        elif isinstance(v, dict) and isinstance(v.get("dtype"), dict):
            forms.add("invalid dtype {")
    return forms


def check_one_line(e: BaseException) -> None:
    assert isinstance(e, CheckpointError), repr(e)
    msg = str(e)
    assert msg and "\n" not in msg and len(msg) < 2000, msg[:300]


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_headers_agree_with_safetensors(tmp_path, seed):
    rng = random.Random(1000 + seed)
    counts = {"both_ok": 0, "both_err": 0, "ours_stricter": 0}
    for case in range(HEADER_CASES // 2):
        blob = header_case(rng)
        path = tmp_path / f"c{case}.safetensors"
        path.write_bytes(blob)
        ref = reference(path)
        with time_limit(CASE_SECONDS):
            try:
                got, err = read_header(path), None
            except Exception as e:  # noqa: BLE001 - judged below
                got, err = None, e
        where = f"seed {seed} case {case}: {blob[:300]!r}"
        if err is not None:
            check_one_line(err)
        if ref[0] == "err":
            assert err is not None, f"accepted what safetensors refuses; {where}"
            counts["both_err"] += 1
            continue
        _, info, meta, data = ref
        if err is not None:
            unsupported = any(dt not in DTYPES for dt, _ in info.values())
            allowed = ({"unsupported dtype"} if unsupported else set()) | lenient_forms(blob)
            assert any(a in str(err) for a in allowed), f"{err}; {where}"
            counts["ours_stricter"] += 1
            continue
        assert {k: (t.dtype, list(t.shape)) for k, t in got.tensors.items()} == info, where
        assert got.metadata == meta, where
        for k, b in data.items():
            t = got.tensors[k]
            assert blob[t.start:t.end] == b, where
        counts["both_ok"] += 1
        path.unlink()
    # the mutations reach every outcome, valid files included
    assert min(counts["both_ok"], counts["both_err"]) >= 20, counts
    assert counts["ours_stricter"] <= counts["both_ok"], counts


def _sharded(root):
    g = torch.Generator().manual_seed(0)
    t = {f"t{i}": torch.randn(i + 1, generator=g) for i in range(6)}
    root.mkdir()
    save_file({k: t[k] for k in ("t0", "t1", "t2")}, str(root / "a.safetensors"))
    save_file({k: t[k] for k in ("t3", "t4", "t5")}, str(root / "b.safetensors"))
    save_file({"u": torch.zeros(2)}, str(root / "c.safetensors"))
    (root / "sub").mkdir()
    save_file({"t0": t["t0"], "t1": t["t1"], "t2": t["t2"]}, str(root / "sub" / "a.safetensors"))
    return {k: ("a.safetensors" if k in ("t0", "t1", "t2") else "b.safetensors") for k in t}


def index_case(rng: random.Random, wm: dict) -> bytes:
    m = Pairs(wm.items())
    doc = Pairs([("metadata", {"total_size": 84}), ("weight_map", m)])
    for _ in range(rng.choice([0, 1, 1, 2])):
        op = rng.randrange(10)
        i = rng.randrange(len(m)) if m else 0
        if op == 0 and m:
            m.pop(i)  # a shard's tensor missing from the index
        elif op == 1:
            m.append((f"t{rng.randrange(9)}", rng.choice(["a.safetensors", "c.safetensors"])))
        elif op == 2 and m:
            m[i] = (m[i][0], rng.choice(["nope.safetensors", "/etc/passwd", "../a.safetensors",
                                         "sub/../a.safetensors", "./b.safetensors", "",
                                         "sub/a.safetensors", "sub", 7, None, ["a"],
                                         Raw('"\\ud800"'), "c.safetensors"]))
        elif op == 3 and m:
            m.append(m[i])  # a name given twice
        elif op == 4:
            doc[0] = ("metadata", rng.choice([nested(130), nested(20000), Raw("1" + "0" * 400),
                                              Raw("NaN"), {"total_size": Raw("9" * 30)}, None]))
        elif op == 5:
            doc[1] = ("weight_map", rng.choice([[], None, "x", nested(3), Pairs()]))
        elif op == 6:
            doc = rng.choice([[], None, 5, Pairs([("weight_map", m), ("weight_map", m)])])
            break
        elif op == 7 and m:
            m[i] = (rng.choice(["", "é", Raw('"\\ud800"'), m[i][0] + "x"]), m[i][1])
        else:
            doc.append(("extra", rng.choice(WEIRD_VALUES)))
    raw = dump(doc).encode("utf-8", "surrogatepass")
    k = rng.random()
    if k < 0.1:
        raw = raw[:rng.randrange(len(raw) + 1)]
    elif k < 0.2:
        raw = b" \n" + raw + b"\t"
    return raw


def index_reference(root, raw: bytes):
    """{name: (file, dtype, shape)} that a correct reading of this index gives, or None."""
    import os

    def pairs(p):
        keys = [k for k, _ in p]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate key")
        return dict(p)

    def bad_constant(c):
        raise ValueError(c)

    def depth(o):
        if isinstance(o, dict):
            return 1 + max((depth(v) for v in o.values()), default=0)
        if isinstance(o, list):
            return 1 + max((depth(v) for v in o), default=0)
        return 0

    def numbers_ok(o):
        if isinstance(o, dict):
            return all(numbers_ok(v) for v in o.values())
        if isinstance(o, list):
            return all(numbers_ok(v) for v in o)
        if isinstance(o, float):
            return o not in (float("inf"), float("-inf"))
        if isinstance(o, int) and not isinstance(o, bool):
            return abs(o) < 10**308
        return True

    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=bad_constant)
        json.dumps(obj, ensure_ascii=False).encode("utf-8")  # no lone surrogates
    except (ValueError, RecursionError, UnicodeError):
        return None
    if depth(obj) > 127 or not numbers_ok(obj) or not isinstance(obj, dict):
        return None
    wm = obj.get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(v, str) and v for v in wm.values()):
        return None
    out, listed = {}, {}
    for name, rel in wm.items():
        if os.path.isabs(rel):
            return None
        full = os.path.realpath(root / rel)
        if not full.startswith(str(root) + os.sep) or not os.path.isfile(full):
            return None
        with safe_open(full, framework="pt") as f:
            if name not in f.keys():
                return None
            out[name] = (full, f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape()))
        listed.setdefault(full, set()).add(name)
    for full, names in listed.items():
        with safe_open(full, framework="pt") as f:
            if set(f.keys()) - set(wm):
                return None  # a shard's tensor missing from the index
    return out


def test_fuzzed_indexes_read_exactly_or_refuse_in_one_line(tmp_path):
    import os

    rng = random.Random(77)
    root = tmp_path / "ck"
    wm = _sharded(root)
    root = root.resolve()
    idx = root / "model.safetensors.index.json"
    counts = {"ok": 0, "err": 0}
    for case in range(INDEX_CASES):
        raw = index_case(rng, wm)
        idx.write_bytes(raw)
        want = index_reference(root, raw)
        with time_limit(CASE_SECONDS):
            try:
                got, err = open_checkpoint(str(root), "fuzz"), None
            except Exception as e:  # noqa: BLE001 - judged below
                got, err = None, e
        where = f"case {case}: {raw[:300]!r}"
        if want is None:
            assert err is not None, f"accepted an index the reference refuses; {where}"
            check_one_line(err)
            counts["err"] += 1
            continue
        assert err is None, f"{err}; {where}"
        assert {k: (os.path.realpath(t.path), t.dtype, list(t.shape))
                for k, t in got.tensors.items()} == want, where
        counts["ok"] += 1
    assert min(counts.values()) >= 20, counts
