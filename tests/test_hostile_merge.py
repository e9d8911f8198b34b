"""Hostile inputs and faults against `safepatch merge`: each is a one-line error with exit
status 1 that names what is wrong, leaves nothing at OUT (nor OUT.partial) and changes no
file outside OUT -- or, where the input is legitimate (a huggingface_hub cache), a correct
merge. Security first, then correctness, then what used to crash or hang."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hostile_helpers import expect_refusal, run_cli, snapshot
from merge_helpers import build_inputs, dir_bytes, in_memory_merge, load_dir, write_config
from safepatch_merge.merge import merge

NAME = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("hostile_inputs"))


@pytest.fixture
def inputs(pristine, tmp_path):
    """A private copy of the inputs under tmp_path/in (a test may damage it)."""
    return {k: shutil.copytree(p, tmp_path / "in" / k) for k, p in pristine.items()}


def shard_of(d, name=NAME):
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    return d / wm[name]


def merge_argv(cfg, out, *extra):
    return ["merge", cfg, out, "--no-progress", *extra]


def refuse(capsys, tmp_path, cfg, needles, out=None, extra=(), seconds=120.0):
    out = out if out is not None else tmp_path / "out"
    return expect_refusal(capsys, merge_argv(cfg, out, *extra), needles, watch=tmp_path,
                          out=out, seconds=seconds)


# -- security ---------------------------------------------------------------------------

def test_shard_linked_outside_the_directory_is_refused(inputs, tmp_path, capsys):
    shard = shard_of(inputs["base"])
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    cfg = write_config(tmp_path / "c.yaml", inputs)
    refuse(capsys, tmp_path, cfg, [shard.name, str(outside), "outside"])


def test_single_file_checkpoint_linked_outside_is_refused(tmp_path, capsys):
    from safepatch_merge.testing import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path / "base")
    patch = make_tiny_model_dir(tmp_path / "patch", seed=1)
    secret = tmp_path / "secret.safetensors"
    shutil.move(patch / "model.safetensors", secret)
    os.symlink(secret, patch / "model.safetensors")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backbone": str(base), "patches": {"se": str(patch)},
                                   "parameters": {"mask_mode": "none"}}))
    refuse(capsys, tmp_path, cfg, ["patch", "model.safetensors", "outside"])


def test_histograms_file_linked_outside_is_refused(inputs, tmp_path, capsys):
    hist = inputs["scores_se"] / "histograms.safetensors"
    outside = tmp_path / "hist.safetensors"
    shutil.move(hist, outside)
    os.symlink(outside, hist)
    cfg = write_config(tmp_path / "c.yaml", inputs)
    refuse(capsys, tmp_path, cfg, [str(hist), str(outside), "outside"])


def test_backbone_file_linked_outside_is_not_copied(inputs, tmp_path, capsys):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (inputs["base"] / "tokenizer.json").unlink()
    os.symlink(secret, inputs["base"] / "tokenizer.json")
    cfg = write_config(tmp_path / "c.yaml", inputs)
    refuse(capsys, tmp_path, cfg, ["tokenizer.json", str(secret), "outside"])


def test_backbone_file_linked_inside_is_copied_as_a_regular_file(inputs, tmp_path, capsys):
    base = inputs["base"]
    (base / "sub").mkdir()
    shutil.move(base / "tokenizer.json", base / "sub" / "tok.json")
    os.symlink("sub/tok.json", base / "tokenizer.json")
    cfg = write_config(tmp_path / "c.yaml", inputs)
    rc, _, err = run_cli(capsys, merge_argv(cfg, tmp_path / "out"))
    assert rc == 0, err
    got = tmp_path / "out" / "tokenizer.json"
    assert got.is_file() and not got.is_symlink()
    assert got.read_bytes() == (base / "sub" / "tok.json").read_bytes()


@pytest.mark.parametrize("flag", ["--resume", "--overwrite", None])
def test_link_at_out_partial_is_refused(inputs, tmp_path, capsys, flag):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    out = tmp_path / "out"
    os.symlink(victim, tmp_path / "out.partial")
    cfg = write_config(tmp_path / "c.yaml", inputs)
    before = snapshot(tmp_path)
    rc, line, err = run_cli(capsys, merge_argv(cfg, out, *([flag] if flag else [])))
    assert rc == 1 and "out.partial" in line and "symbolic link" in line, err
    assert snapshot(tmp_path) == before  # the link and its target untouched
    assert not out.exists() and list(victim.iterdir()) == [victim / "precious.txt"]


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_partial_directory_not_made_by_merge_is_refused(inputs, tmp_path, capsys, flag):
    foreign = tmp_path / "out.partial"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    cfg = write_config(tmp_path / "c.yaml", inputs)
    before = snapshot(tmp_path)
    rc, line, err = run_cli(capsys, merge_argv(cfg, tmp_path / "out", flag))
    assert rc == 1 and str(foreign) in line and "not made by safepatch merge" in line, err
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["backbone", "inside_patch", "contains_scores",
                                   "contains_config", "link_to_backbone"])
def test_out_overlapping_an_input_is_refused(inputs, tmp_path, capsys, where):
    conf = tmp_path / "conf"
    conf.mkdir()
    if where == "contains_scores":
        (tmp_path / "outer").mkdir()
        inputs["scores_osm"] = shutil.move(inputs["scores_osm"], tmp_path / "outer" / "s_osm")
    cfg = write_config(conf / "c.yaml", inputs)
    if where == "link_to_backbone":
        os.symlink(inputs["base"], tmp_path / "alias")
    out, other = {"backbone": (inputs["base"], inputs["base"]),
                  "inside_patch": (inputs["se"] / "merged", inputs["se"]),
                  "contains_scores": (tmp_path / "outer", inputs["scores_osm"]),
                  "contains_config": (conf, cfg),
                  "link_to_backbone": (tmp_path / "alias", inputs["base"])}[where]
    before = snapshot(tmp_path)
    rc, line, err = run_cli(capsys, merge_argv(cfg, out, "--overwrite"))
    assert rc == 1, err
    assert str(out) in line and str(other) in line, line
    assert "the output must be a directory apart from every input" in line
    assert snapshot(tmp_path) == before
    assert not os.path.lexists(str(out) + ".partial")


def test_out_given_as_dot_or_empty_is_refused(inputs, tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", inputs)
    monkeypatch.chdir(tmp_path)
    for out in (".", "", "..", "in/.."):
        before = snapshot(tmp_path)
        rc, line, err = run_cli(capsys, merge_argv(cfg, out, "--overwrite"))
        assert rc == 1 and "names no directory of its own" in line, (out, err)
        assert snapshot(tmp_path) == before
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


# -- correctness --------------------------------------------------------------------------

def _crash_after_first_shard(monkeypatch):
    """Make the next merge stop (KeyboardInterrupt) right after its first finished shard."""
    from safepatch_merge.io import writer as wmod

    real = wmod.OutputBuilder._record

    def crash(self, *a):
        real(self, *a)
        raise KeyboardInterrupt

    monkeypatch.setattr(wmod.OutputBuilder, "_record", crash)
    return lambda: monkeypatch.setattr(wmod.OutputBuilder, "_record", real)


def _rewrite_values_keep_header(path, mtime_ns=None):
    """New tensor bytes under the same header and size (and inode); optionally restore the
    file's mtime, as a copy tool that preserves times would."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n:] = bytes(b ^ 0x01 for b in data[8 + n:])  # flip the low bit of every byte
    with open(path, "r+b") as f:  # in place: same inode
        f.write(data)
    if mtime_ns is not None:
        os.utime(path, ns=(st.st_atime_ns, mtime_ns))
    assert path.stat().st_ino == st.st_ino and path.stat().st_size == st.st_size


PARAMS = {"top_rate_se": 0.2, "top_rate_osm": 0.25}


def test_resume_after_patch_values_changed_is_refused(inputs, tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", inputs, PARAMS, output={"max_shard_size": "24KB"})
    restore = _crash_after_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        merge(cfg, tmp_path / "out")
    restore()
    assert (tmp_path / "out.partial").is_dir()
    _rewrite_values_keep_header(shard_of(inputs["se"]))  # mtime moves, as edits do
    partial = tmp_path / "out.partial"
    before, kept = snapshot(tmp_path, (partial,)), dir_bytes(partial)
    rc, line, err = run_cli(capsys, merge_argv(cfg, tmp_path / "out", "--resume"))
    assert rc == 1 and "different merge" in line and "--overwrite" in line, err
    assert snapshot(tmp_path, (partial,)) == before and not (tmp_path / "out").exists()
    assert dir_bytes(partial) == kept  # refused, not discarded: --overwrite decides


def test_resume_with_hash_inputs_sees_content_behind_a_restored_mtime(inputs, tmp_path, capsys,
                                                                      monkeypatch):
    from safepatch_merge.io.checkpoint import ContentHasher
    from safepatch_merge.merge import engine

    class HashNow(ContentHasher):  # finish hashing before the first shard is recorded
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self._t.join()

    monkeypatch.setattr(engine, "ContentHasher", HashNow)
    cfg = write_config(tmp_path / "c.yaml", inputs, PARAMS,
                       output={"max_shard_size": "24KB", "hash_inputs": True})
    merge(cfg, tmp_path / "ref")
    restore = _crash_after_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        merge(cfg, tmp_path / "out")
    restore()
    manifest = json.loads((tmp_path / "out.partial" / ".safepatch_manifest.json").read_text())
    assert len(manifest["input_sha256"]) == 10 and len(manifest["shards"]) == 1
    victim = shard_of(inputs["se"])
    saved = victim.read_bytes()
    _rewrite_values_keep_header(victim, mtime_ns=victim.stat().st_mtime_ns)
    partial = tmp_path / "out.partial"
    before, kept = snapshot(tmp_path, (partial,)), dir_bytes(partial)
    rc, line, err = run_cli(capsys, merge_argv(cfg, tmp_path / "out", "--resume"))
    assert rc == 1 and "content has changed" in line and victim.name in line, err
    assert snapshot(tmp_path, (partial,)) == before and not (tmp_path / "out").exists()
    assert dir_bytes(partial) == kept
    # the same bytes back: the resume is accepted and completes the identical output
    mt = victim.stat().st_mtime_ns
    victim.write_bytes(saved)
    os.utime(victim, ns=(mt, mt))
    rc, _, err = run_cli(capsys, merge_argv(cfg, tmp_path / "out", "--resume"))
    assert rc == 0, err
    assert dir_bytes(tmp_path / "out") == dir_bytes(tmp_path / "ref")


@pytest.mark.parametrize("bad,word", [(-1.0, "negative"), (float("nan"), "NaN")])
def test_stale_histograms_do_not_skip_score_validation(inputs, tmp_path, capsys, bad, word):
    """histograms.safetensors made from valid scores; the scores changed afterwards."""
    f = shard_of(inputs["scores_osm"])
    sd = load_file(f)
    sd[NAME] = sd[NAME].clone()
    sd[NAME].view(-1)[3] = bad
    save_file(sd, str(f))
    cfg = write_config(tmp_path / "c.yaml", inputs)
    refuse(capsys, tmp_path, cfg, ["scores_osm", NAME, word, "element 3"])


def _hub_cache(src, cache, repo="models--org--tiny", commit="a" * 40):
    """huggingface_hub's cache layout for the files of `src`: blobs/<hash> (sha256 for
    safetensors files, as LFS names them; git's blob sha1 otherwise) and
    snapshots/<commit>/<file> -> ../../blobs/<hash>, plus refs/main."""
    r = cache / repo
    (r / "blobs").mkdir(parents=True, exist_ok=True)
    (r / "refs").mkdir(exist_ok=True)
    (r / "refs" / "main").write_text(commit)
    snap = r / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        digest = (hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else
                  hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        (r / "blobs" / digest).write_bytes(data)
        os.symlink(os.path.relpath(r / "blobs" / digest, snap), snap / f.name)
    return snap


def test_sharded_checkpoints_in_a_hub_cache_merge(inputs, tmp_path, capsys):
    cache = tmp_path / "hub"
    hub = {k: _hub_cache(p, cache, f"models--org--{k}") for k, p in inputs.items()}
    assert os.readlink(shard_of(hub["base"])).startswith("../../blobs/")
    rc, _, err = run_cli(capsys, merge_argv(write_config(tmp_path / "c.yaml", hub, PARAMS),
                                            tmp_path / "out"))
    assert rc == 0, err
    expected = in_memory_merge(inputs, PARAMS)
    got = load_dir(tmp_path / "out")
    assert set(got) == set(expected) and all(torch.equal(got[n], expected[n]) for n in got)
    for f in (tmp_path / "out").iterdir():
        assert f.is_file() and not f.is_symlink(), f
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
        (inputs["base"] / "tokenizer.json").read_bytes()


def test_hub_snapshot_link_into_another_repo_is_refused(inputs, tmp_path, capsys):
    cache = tmp_path / "hub"
    base = _hub_cache(inputs["base"], cache, "models--org--base")
    other = _hub_cache(inputs["se"], cache, "models--org--other", commit="b" * 40)
    shard = shard_of(base)
    shard.unlink()
    os.symlink(os.path.relpath(os.path.realpath(shard_of(other)), base), shard)
    cfg = write_config(tmp_path / "c.yaml", {**inputs, "base": base})
    refuse(capsys, tmp_path, cfg, [shard.name, "models--org--other", "outside"])


def test_tensor_in_shard_but_not_in_index(inputs, tmp_path, capsys):
    f = shard_of(inputs["osm"])
    sd = load_file(f)
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, str(f), metadata={"format": "pt"})
    cfg = write_config(tmp_path / "c.yaml", inputs)
    refuse(capsys, tmp_path, cfg, ["'model.extra.weight'", str(f), "not in the index",
                                   "model.safetensors.index.json"])


def test_duplicated_yaml_key(inputs, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", inputs, {"alpha": 1.0})
    text = cfg.read_text()
    cfg.write_text(text.replace("  alpha: 1.0\n", "  alpha: 1.0\n  alpha: 5.0\n"))
    line = refuse(capsys, tmp_path, cfg, [str(cfg), "key 'alpha' is given twice", "lines"])
    assert "alpha" in line


def test_nonfinite_output_is_an_error_unless_allowed(inputs, tmp_path, capsys):
    params = {"top_rate_se": 1.0, "top_rate_osm": 0.0, "alpha": 1e300}
    cfg = write_config(tmp_path / "c.yaml", inputs, params)
    refuse(capsys, tmp_path, cfg, ["merged tensor", "NaN/inf", "allow_nonfinite"])
    cfg = write_config(tmp_path / "c.yaml", inputs, params, output={"allow_nonfinite": True})
    rc, _, err = run_cli(capsys, merge_argv(cfg, tmp_path / "out"))
    assert rc == 0, err
    got = load_dir(tmp_path / "out")
    assert not torch.isfinite(got[NAME].float()).all()


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_pattern_matching_no_tensor(inputs, tmp_path, capsys, key):
    cfg = write_config(tmp_path / "c.yaml", inputs, **{key: ["model.layer.*.q_proj.weight"]})
    refuse(capsys, tmp_path, cfg, [f"{key} pattern 'model.layer.*.q_proj.weight'",
                                   "matches no tensor"])


def test_relative_path_is_resolved_beside_the_config_only(inputs, tmp_path, capsys,
                                                          monkeypatch):
    conf_dir = tmp_path / "configs"
    conf_dir.mkdir()
    cfg = write_config(conf_dir / "c.yaml", inputs)
    doc = yaml.safe_load(cfg.read_text())
    doc["patches"]["se"] = "se_patch"  # exists in the working directory, not beside the config
    cfg.write_text(yaml.safe_dump(doc))
    shutil.copytree(inputs["se"], tmp_path / "work" / "se_patch")
    monkeypatch.chdir(tmp_path / "work")
    refuse(capsys, tmp_path, cfg, [str(conf_dir / "se_patch"), str(tmp_path / "work" / "se_patch"),
                                   "resolved against the config's directory"])
    doc["patches"]["se"] = "nowhere/se"  # exists nowhere: looks like a Hub id as well
    cfg.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refuse(capsys, tmp_path, cfg, [str(conf_dir / "nowhere" / "se"),
                                   str(tmp_path / "work" / "nowhere" / "se"), "Hugging Face Hub"])


def test_torn_caches_in_the_work_dir_are_recomputed(inputs, tmp_path, capsys, monkeypatch):
    """A kill while the threshold or histogram cache was written leaves a torn file; a
    resume treats it as absent and gives the uninterrupted output."""
    for p in inputs["scores_se"].glob("histograms.safetensors"):
        p.unlink()  # the merge computes (and caches) these histograms itself
    cfg = write_config(tmp_path / "c.yaml", inputs, PARAMS, output={"max_shard_size": "24KB"})
    merge(cfg, tmp_path / "ref")
    restore = _crash_after_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        merge(cfg, tmp_path / "out")
    restore()
    work = tmp_path / "out.partial" / ".safepatch_work"
    hist, thr = work / "hist0_scores_se.safetensors", work / "thresholds.json"
    assert hist.is_file() and thr.is_file()
    hist.write_bytes(hist.read_bytes()[:100])
    thr.write_text(thr.read_text()[:7])
    (work / "thresholds.json.tmp").write_text('{"half')  # killed inside an atomic write
    (tmp_path / "out.partial" / ".safepatch_manifest.json.tmp").write_text("{")
    rc, _, err = run_cli(capsys, merge_argv(cfg, tmp_path / "out", "--resume"))
    assert rc == 0, err
    assert dir_bytes(tmp_path / "out") == dir_bytes(tmp_path / "ref")


def test_cache_writes_are_atomic(tmp_path, monkeypatch):
    """A failing write leaves the previous cache file whole and no temporary file."""
    from safepatch_merge.io import atomic

    target = tmp_path / "thresholds.json"
    target.write_bytes(b'{"old": 1}')
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data)[:3])  # short writes, to exercise the loop

    monkeypatch.setattr(atomic.os, "write", failing_write)
    with pytest.raises(OSError):
        atomic.write_atomic(target, b'{"new": 22}')
    monkeypatch.setattr(atomic.os, "write", real_write)
    assert target.read_bytes() == b'{"old": 1}' and list(tmp_path.iterdir()) == [target]
    atomic.write_atomic(target, b'{"new": 22}')
    assert target.read_bytes() == b'{"new": 22}' and list(tmp_path.iterdir()) == [target]


# -- what used to crash or hang -----------------------------------------------------------

def _rewrite_header(path, obj_or_raw):
    raw = obj_or_raw if isinstance(obj_or_raw, bytes) else json.dumps(obj_or_raw).encode()
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("how", ["deep_header", "huge_int_header", "deep_index",
                                 "huge_int_index", "index_value_number"])
def test_hostile_json_in_header_or_index(inputs, tmp_path, capsys, how):
    idx = inputs["se"] / "model.safetensors.index.json"
    shard = shard_of(inputs["se"])
    if how == "deep_header":
        _rewrite_header(shard, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        needles = [str(shard), "nested deeper than 127"]
    elif how == "huge_int_header":
        hdr = json.loads(shard.read_bytes()[8:8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]])
        hdr[NAME]["data_offsets"][1] = 123456789
        _rewrite_header(shard, json.dumps(hdr).replace("123456789", "9" * 5000).encode())
        needles = [str(shard), "number out of range"]
    elif how == "deep_index":
        idx.write_bytes(b'{"weight_map": ' + b"{" * 50_000 + b"}" * 50_000 + b"}")
        needles = [str(idx), "nested deeper than 127"]
    elif how == "huge_int_index":
        idx.write_text('{"metadata": {"total_size": 1' + "0" * 100_000 + '}, "weight_map": {}}')
        needles = [str(idx), "number out of range"]
    else:
        j = json.loads(idx.read_text())
        j["weight_map"][NAME] = 5
        idx.write_text(json.dumps(j))
        needles = [str(idx), NAME, "not a file name"]
    cfg = write_config(tmp_path / "c.yaml", inputs)
    refuse(capsys, tmp_path, cfg, needles, seconds=30)


def test_fifo_in_place_of_a_shard(inputs, tmp_path, capsys):
    shard = shard_of(inputs["osm"])
    shard.unlink()
    os.mkfifo(shard)
    cfg = write_config(tmp_path / "c.yaml", inputs)
    refuse(capsys, tmp_path, cfg, [shard.name, "not a regular file", "FIFO"], seconds=30)


def _read_only(monkeypatch, directory):
    """`directory` refuses new entries: chmod, and where that binds nobody (running as root)
    the same refusal from the permission check and mkdir that the kernel gives others."""
    directory.chmod(0o555)
    if os.geteuid() != 0:
        return
    real_access, real_mkdir = os.access, os.mkdir
    d = str(directory)

    def access(path, mode, *a, **k):
        if os.path.abspath(path) == d and mode & os.W_OK:
            return False
        return real_access(path, mode, *a, **k)

    def mkdir(path, *a, **k):
        if os.path.dirname(os.path.abspath(path)) == d:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("where", ["missing_dir", "parent_is_file", "read_only_dir", "a_dir"])
def test_stats_path_unwritable_is_refused_before_the_merge(inputs, tmp_path, capsys,
                                                           monkeypatch, where):
    cfg = write_config(tmp_path / "c.yaml", inputs)
    (tmp_path / "plain").write_text("x")
    (tmp_path / "ro").mkdir()
    stats = {"missing_dir": tmp_path / "nope" / "s.json",
             "parent_is_file": tmp_path / "plain" / "s.json",
             "read_only_dir": tmp_path / "ro" / "s.json", "a_dir": tmp_path / "ro"}[where]
    if where == "read_only_dir":
        _read_only(monkeypatch, tmp_path / "ro")
    try:
        refuse(capsys, tmp_path, cfg, ["--stats", str(stats)], extra=("--stats", stats))
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_read_only_output_parent(inputs, tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", inputs)
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    try:
        refuse(capsys, tmp_path, cfg, [str(ro / "out.partial"), "not writable"], out=ro / "out")
    finally:
        ro.chmod(0o755)


def test_yaml_billion_laughs_in_include(inputs, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", inputs)
    cfg.write_text(cfg.read_text() + "include: " + _inline_bomb() + "\n")
    line = refuse(capsys, tmp_path, cfg, ["include: expected a glob pattern"], seconds=10)
    assert len(line) < 400


def _inline_bomb() -> str:
    """A flow-style YAML list whose aliases expand to 9**9 strings (never built here)."""
    s = '&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'
    for i in range(1, 10):
        s = f"&l{i} [" + ", ".join([s] + [f"*l{i - 1}"] * 8) + "]"
    return s


def test_enospc_while_writing_the_histogram_cache(inputs, tmp_path, capsys, monkeypatch):
    for p in inputs["scores_osm"].glob("histograms.safetensors"):
        p.unlink()  # so the merge computes and caches this side's histograms
    from safepatch_merge.io import atomic

    real_write = os.write

    def full_disk(fd, data):
        if "hist0_" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(atomic.os, "write", full_disk)
    cfg = write_config(tmp_path / "c.yaml", inputs)
    refuse(capsys, tmp_path, cfg, ["hist0_scores_osm.safetensors", "histogram cache",
                                   "No space left on device"])


def test_usage_errors_keep_exit_status_2(capsys):
    from safepatch_merge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["merge", "--no-such-option"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["merge"])
    assert e.value.code == 2
    assert "the following arguments are required" in capsys.readouterr().err
