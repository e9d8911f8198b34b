"""safepatch_provenance.json identifies the inputs: header hashes always, the Hub's blob sha256
and commit for checkpoints in huggingface_hub's cache, content sha256 with output.hash_inputs."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from safepatch_merge.errors import CheckpointError
from safepatch_merge.io.checkpoint import ContentHasher
from safepatch_merge.merge import merge
from safepatch_merge.testing import make_tiny_model_dir


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _merge(tmp_path, base, patch, out, **output):
    cfg = {"backbone": str(base), "patches": {"se": str(patch)},
           "parameters": {"mask_mode": "none"}, "output": output}
    merge(cfg, tmp_path / out)
    return json.loads((tmp_path / out / "safepatch_provenance.json").read_text())


def test_content_hashes_only_when_asked(tmp_path):
    base = make_tiny_model_dir(tmp_path / "b")
    patch = make_tiny_model_dir(tmp_path / "p", seed=3)
    plain = _merge(tmp_path, base, patch, "o1")
    assert all("sha256" not in f for r in plain["inputs"].values() for f in r["files"])
    hashed = _merge(tmp_path, base, patch, "o2", hash_inputs=True)
    for role, d in (("base", base), ("patch_se", patch)):
        files = hashed["inputs"][role]["files"]
        assert files and all(f["sha256"] == _sha(d / f["file"]) for f in files)
        assert all(len(f["header_sha256"]) == 64 for f in files)
    assert "hub_commit" not in hashed["inputs"]["base"]


def test_hub_cache_blobs_and_commit_are_recorded(tmp_path):
    """A snapshot in huggingface_hub's cache layout: files are links to blobs named by the
    Hub's sha256 (LFS) and the snapshot directory by the commit."""
    src = make_tiny_model_dir(tmp_path / "src")
    repo = tmp_path / "hub" / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        digest = _sha(f)
        shutil.copyfile(f, repo / "blobs" / digest)
        os.symlink(os.path.relpath(repo / "blobs" / digest, snap), snap / f.name)
    prov = _merge(tmp_path, snap, src, "o")
    base = prov["inputs"]["base"]
    assert base["hub_commit"] == commit
    st = [f for f in base["files"] if f["file"].endswith(".safetensors")]
    assert st and all(f["hub_sha256"] == _sha(src / f["file"]) for f in st)
    assert "hub_commit" not in prov["inputs"]["patch_se"]
    assert all("hub_sha256" not in f for f in prov["inputs"]["patch_se"]["files"])


def test_content_hasher_reports_a_vanished_file(tmp_path):
    a = tmp_path / "a"
    a.write_bytes(b"x" * 10_000)
    h = ContentHasher([a, a], block=4096)  # duplicates hashed once
    assert h.result() == {a: _sha(a)}
    with pytest.raises(CheckpointError, match="hashing the inputs failed"):
        ContentHasher([tmp_path / "gone"]).result()


def test_file_sha256_reads_in_blocks_and_stops_when_asked(tmp_path):
    import threading

    from safepatch_merge.io.hashing import file_sha256

    a = tmp_path / "a"
    a.write_bytes(bytes(range(256)) * 100)
    assert file_sha256(a, block=1000) == _sha(a)
    stop = threading.Event()
    stop.set()
    assert file_sha256(a, block=1000, stop=stop) is None
