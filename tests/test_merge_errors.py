"""Every bad input: a one-line error naming the file/tensor/key, exit code 1, nothing at OUT."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_helpers import build_inputs, in_memory_merge, load_dir, write_config, write_scores
from safepatch_merge.cli import main


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("err_inputs"))


@pytest.fixture
def inputs(pristine, tmp_path):
    """A private copy of the inputs that a test may corrupt."""
    out = {}
    for k, p in pristine.items():
        out[k] = tmp_path / "in" / k
        shutil.copytree(p, out[k])
    return out


def run_cli(capsys, cfg, out, *extra):
    rc = main(["merge", str(cfg), str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("safepatch merge: error:")]
    return rc, (lines[-1] if lines else ""), err


def expect_error(capsys, tmp_path, cfg, *needles, extra=()):
    out = tmp_path / "out"
    rc, line, err = run_cli(capsys, cfg, out, *extra)
    assert rc == 1, err
    for n in needles:
        assert n in line, (n, line)
    assert "\n" not in line
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    return line


def shard_of(d, name):
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    return d / wm[name]


NAME = "model.layers.0.self_attn.q_proj.weight"


def rewrite_shard(path, fn):
    sd = load_file(path)
    fn(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def test_missing_tensor(inputs, tmp_path, capsys):
    rewrite_shard(shard_of(inputs["se"], NAME), lambda sd: sd.pop(NAME))
    idx = inputs["se"] / "model.safetensors.index.json"
    j = json.loads(idx.read_text())
    del j["weight_map"][NAME]
    idx.write_text(json.dumps(j))
    cfg = write_config(tmp_path / "c.yaml", inputs)
    expect_error(capsys, tmp_path, cfg, "patch_se", NAME, "missing")


def test_index_lists_tensor_missing_from_shard(inputs, tmp_path, capsys):
    rewrite_shard(shard_of(inputs["osm"], NAME), lambda sd: sd.pop(NAME))
    cfg = write_config(tmp_path / "c.yaml", inputs)
    expect_error(capsys, tmp_path, cfg, NAME, "missing from the shard")


def test_shape_mismatch(inputs, tmp_path, capsys):
    f = shard_of(inputs["scores_se"], NAME) if (inputs["scores_se"] / "model.safetensors.index.json"
                                                 ).exists() else inputs["scores_se"] / "model.safetensors"
    rewrite_shard(f, lambda sd: sd.__setitem__(NAME, torch.rand(3, 5)))
    cfg = write_config(tmp_path / "c.yaml", inputs)
    expect_error(capsys, tmp_path, cfg, "scores_se", NAME, "shape [3, 5]")


def test_dtype_mismatch(inputs, tmp_path, capsys):
    rewrite_shard(shard_of(inputs["osm"], NAME),
                  lambda sd: sd.__setitem__(NAME, sd[NAME].to(torch.int32)))
    cfg = write_config(tmp_path / "c.yaml", inputs)
    expect_error(capsys, tmp_path, cfg, "patch_osm", NAME, "dtype I32")


def test_truncated_shard(inputs, tmp_path, capsys):
    f = shard_of(inputs["base"], NAME)
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    cfg = write_config(tmp_path / "c.yaml", inputs)
    expect_error(capsys, tmp_path, cfg, str(f), "truncated")


def test_corrupt_header(inputs, tmp_path, capsys):
    f = shard_of(inputs["se"], NAME)
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "c.yaml", inputs)
    expect_error(capsys, tmp_path, cfg, str(f), "corrupt safetensors header")


def test_oversized_header(inputs, tmp_path, capsys):
    f = shard_of(inputs["base"], NAME)
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    f.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "c.yaml", inputs)
    expect_error(capsys, tmp_path, cfg, str(f), "header length")


def test_index_points_outside(inputs, tmp_path, capsys):
    idx = inputs["base"] / "model.safetensors.index.json"
    j = json.loads(idx.read_text())
    outside = tmp_path / "evil.safetensors"
    shutil.copy(shard_of(inputs["base"], NAME), outside)
    j["weight_map"][NAME] = "../../evil.safetensors"
    idx.write_text(json.dumps(j))
    cfg = write_config(tmp_path / "c.yaml", inputs)
    expect_error(capsys, tmp_path, cfg, "outside", NAME)


def _poison_patch(inputs):
    def fn(sd):
        t = sd[NAME].clone()
        t.view(-1)[5] = float("nan")
        t.view(-1)[77] = float("inf")
        sd[NAME] = t
    rewrite_shard(shard_of(inputs["se"], NAME), fn)


def test_nonfinite_patch_error(inputs, tmp_path, capsys):
    _poison_patch(inputs)
    cfg = write_config(tmp_path / "c.yaml", inputs, {"top_rate_se": 1.0})
    expect_error(capsys, tmp_path, cfg, "patch_se", NAME, "NaN/Inf", "element 5")


def test_nonfinite_patch_skip(inputs, tmp_path, capsys, caplog):
    _poison_patch(inputs)
    params = {"top_rate_se": 1.0, "top_rate_osm": 0.2}
    cfg = write_config(tmp_path / "c.yaml", inputs, params, patches={"nonfinite": "skip"})
    rc, _, err = run_cli(capsys, cfg, tmp_path / "out")
    assert rc == 0, err
    warn = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("NaN/Inf" in w and NAME in w for w in warn), warn
    # Expected: the poisoned elements keep the backbone's values.
    base = load_dir(inputs["base"])
    fixed = tmp_path / "fixed_se"
    shutil.copytree(inputs["se"], fixed)

    def fn(sd):
        t = sd[NAME].clone()
        bad = ~torch.isfinite(t)
        t[bad] = base[NAME][bad]
        sd[NAME] = t
    rewrite_shard(shard_of(fixed, NAME), fn)
    expected = in_memory_merge({**inputs, "se": fixed}, params)
    got = load_dir(tmp_path / "out")
    for n, t in expected.items():
        assert torch.equal(got[n], t), n
    assert torch.isfinite(got[NAME].float()).all()


@pytest.mark.parametrize("bad,word", [(-1.0, "negative"), (float("nan"), "NaN")])
@pytest.mark.parametrize("with_hist", [True, False])
def test_bad_scores(inputs, tmp_path, capsys, bad, word, with_hist):
    sc = load_dir(inputs["scores_osm"])
    sc[NAME].view(-1)[3] = bad
    shutil.rmtree(inputs["scores_osm"])
    write_scores(inputs["scores_osm"], sc, histograms=with_hist)
    cfg = write_config(tmp_path / "c.yaml", inputs)
    expect_error(capsys, tmp_path, cfg, "scores_osm", NAME, word)


def test_unknown_config_key(inputs, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", inputs, {"top_rate_se": 0.1, "alpah": 1.0})
    expect_error(capsys, tmp_path, cfg, "unknown config key parameters.alpah")
    cfg = write_config(tmp_path / "c.yaml", inputs, colour="blue")
    expect_error(capsys, tmp_path, cfg, "unknown config key colour")


@pytest.mark.parametrize("key,value", [("top_rate_se", 1.5), ("top_rate_osm", -0.1),
                                       ("retention", 2.0)])
def test_out_of_range_rate(inputs, tmp_path, capsys, key, value):
    cfg = write_config(tmp_path / "c.yaml", inputs, {key: value})
    expect_error(capsys, tmp_path, cfg, f"parameters.{key}", "out of range")


def test_bad_thread_count(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAFEPATCH_MERGE_THREADS", "two")
    cfg = write_config(tmp_path / "c.yaml", inputs, {"top_rate_se": 0.1})
    expect_error(capsys, tmp_path, cfg, "SAFEPATCH_MERGE_THREADS='two'")


def test_existing_output(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cfg = write_config(tmp_path / "c.yaml", inputs)
    rc, line, _ = run_cli(capsys, cfg, out)
    assert rc == 1 and str(out) in line and "--overwrite" in line
    assert (out / "keep.txt").read_text() == "x" and not (tmp_path / "out.partial").exists()
    rc, _, err = run_cli(capsys, cfg, out, "--overwrite")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_pickle_refused_then_allowed(inputs, tmp_path, capsys):
    pk = tmp_path / "pickled_se"
    pk.mkdir()
    for f in inputs["se"].iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, pk / f.name)
    torch.save(load_dir(inputs["se"]), pk / "pytorch_model.bin")
    paths = {**inputs, "se": pk}
    cfg = write_config(tmp_path / "c.yaml", paths)
    expect_error(capsys, tmp_path, cfg, "patch_se", "pickle", "allow_pickle")
    cfg = write_config(tmp_path / "c.yaml", paths, allow_pickle=True)
    rc, _, err = run_cli(capsys, cfg, tmp_path / "out")
    assert rc == 0, err
    expected = in_memory_merge(inputs, {})
    got = load_dir(tmp_path / "out")
    for n, t in expected.items():
        assert torch.equal(got[n], t), n


def test_pickle_with_code_is_rejected(inputs, tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pk = tmp_path / "evil_se"
    pk.mkdir()
    with open(pk / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    cfg = write_config(tmp_path / "c.yaml", {**inputs, "se": pk}, allow_pickle=True)
    line = expect_error(capsys, tmp_path, cfg, str(pk / "pytorch_model.bin"), "weights_only")
    assert "pwned" not in capsys.readouterr().out
    assert line


def test_op_threads_leave_the_writer_a_core(monkeypatch):
    from safepatch_merge.merge.engine import compute_threads

    monkeypatch.delenv("SAFEPATCH_MERGE_THREADS", raising=False)
    assert compute_threads(2, writing=True) == 1 and compute_threads(2, writing=False) == 2
    assert compute_threads(1, writing=True) == 1
    monkeypatch.setenv("SAFEPATCH_MERGE_THREADS", "3")
    assert compute_threads(2, writing=True) == compute_threads(2, writing=False) == 3
