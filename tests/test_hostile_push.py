"""Hostile model directories against `safepatch push`: links never carry files from outside
the directory to the Hub, suspicious files are named before upload, and damaged headers or
indexes are one-line refusals (exit 1) with nothing sent and nothing changed locally."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
from pathlib import Path

import pytest

from hostile_helpers import expect_refusal, run_cli, snapshot
from safepatch_merge.errors import CheckpointError
from safepatch_merge.io.links import UntrustedLinkError
from safepatch_merge.push import check_model_dir, push_model
from safepatch_merge.testing import make_tiny_model_dir

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub  # noqa: E402

TOKEN = "hf_fake_hostile_0123456789"
CARD = "---\ntags: [safepatch]\n---\n# tiny patched model\n"
SECRET = b"root:x:0:0:root:/root:/bin/bash\nsecret-token-do-not-upload\n"


@pytest.fixture
def model_dir(tmp_path):
    d = make_tiny_model_dir(tmp_path / "model", seed=5, max_shard_size="40KB")
    (d / "README.md").write_text(CARD)
    return d


@pytest.fixture
def secret(tmp_path):
    p = tmp_path / "outside" / "passwd"
    p.parent.mkdir()
    p.write_bytes(SECRET)
    return p


@pytest.fixture
def hub(monkeypatch):
    """A fake Hub that huggingface_hub's defaults point at (for in-process CLI runs)."""
    import huggingface_hub.constants as c

    with FakeHub(token=TOKEN) as h:
        monkeypatch.setattr(c, "ENDPOINT", h.endpoint)
        monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield h


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _shards(d):
    return sorted(set(json.loads((d / "model.safetensors.index.json").read_text())
                      ["weight_map"].values()))


@pytest.mark.parametrize("dry", [True, False])
def test_link_to_a_file_outside_is_refused(model_dir, secret, tmp_path, capsys, hub, dry):
    os.symlink(secret, model_dir / "passwd")
    line = expect_refusal(capsys, ["push", model_dir, "me/tiny"] + (["--dry-run"] if dry else []),
                          ["passwd", str(secret), "outside", "--skip-untrusted-links"],
                          watch=tmp_path)
    assert "secret-token" not in line
    assert hub.requests == [] and hub.repos == {} and hub.lfs == {}


def test_skip_untrusted_links_uploads_the_rest_and_never_the_target(model_dir, secret, hub,
                                                                    caplog):
    os.symlink(secret, model_dir / "passwd")
    res = push_model(model_dir, "me/tiny", token=TOKEN, endpoint=hub.endpoint,
                     skip_untrusted=True)
    assert res.skipped == ["passwd"]
    local = {p.relative_to(model_dir).as_posix(): _sha(p.read_bytes())
             for p in model_dir.iterdir() if p.is_file() and not p.is_symlink()}
    remote = {p: _sha(b) for p, b in hub.files("me/tiny").items()}
    assert remote == local and "passwd" not in remote
    assert all(SECRET not in b for b in hub.files("me/tiny").values())
    assert all(SECRET not in b for b in hub.lfs.values())
    assert any("passwd" in r.getMessage() and "not uploaded" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def test_shard_linked_outside_is_refused_as_merge_refuses_it(model_dir, tmp_path):
    shard = model_dir / _shards(model_dir)[0]
    moved = tmp_path / "elsewhere.safetensors"
    shard.rename(moved)
    os.symlink(moved, shard)
    with pytest.raises(UntrustedLinkError, match=f"{shard.name} links to {moved}, outside"):
        check_model_dir(model_dir)
    # skipping the link leaves an incomplete model, which is refused as such
    with pytest.raises(CheckpointError, match=f"shard {shard.name}"):
        check_model_dir(model_dir, skip_untrusted=True)


def test_linked_directory_outside_is_refused(model_dir, secret):
    os.symlink(secret.parent, model_dir / "extra")
    with pytest.raises(UntrustedLinkError, match="extra links to .*outside"):
        check_model_dir(model_dir)


def test_links_inside_and_into_a_hub_cache_are_trusted(model_dir, tmp_path):
    # a link that stays inside the directory is uploaded as the file it names
    os.symlink("README.md", model_dir / "MODEL_CARD.md")
    assert "MODEL_CARD.md" in {f.path for f in check_model_dir(model_dir)}
    # a huggingface_hub snapshot (every file a link into the repo's blobs/) is pushable
    repo = tmp_path / "hub" / "models--me--tiny"
    snap = repo / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in model_dir.iterdir():
        if f.is_symlink():
            continue
        blob = repo / "blobs" / _sha(f.read_bytes())
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    files = {f.path: f.size for f in check_model_dir(snap)}
    assert files == {f.name: f.stat().st_size for f in model_dir.iterdir()
                     if not f.is_symlink()}


def test_dotfiles_and_oversized_files_are_named_before_upload(model_dir, capsys, hub, caplog):
    (model_dir / ".env").write_text("HF_TOKEN=hf_secret\n")
    with open(model_dir / "optimizer.pt", "wb") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB, > 2x the 40 kB shards and > 16 MiB
    rc, _, err = run_cli(capsys, ["push", model_dir, "me/tiny", "--dry-run"])
    assert rc == 0, err
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(".env is a dotfile" in w for w in warn), warn
    assert any("optimizer.pt" in w and "much larger than the model's largest shard" in w
               for w in warn), warn
    assert not any("config.json" in w for w in warn)
    assert hub.requests == []


@pytest.mark.parametrize("how,needle", [
    ("header_list", "not a JSON object"),
    ("no_data_offsets", "no data_offsets"),
    ("index_value_number", "not a file name"),
    ("deep_index", "nested deeper than 127"),
    ("huge_int_header", "number out of range"),
])
def test_push_checker_on_hostile_headers_and_indexes(model_dir, tmp_path, capsys, hub, how,
                                                     needle):
    shard = model_dir / _shards(model_dir)[0]
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    idx = model_dir / "model.safetensors.index.json"

    def put(raw: bytes):
        shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])

    if how == "header_list":
        put(json.dumps(list(header.items())).encode())
    elif how == "no_data_offsets":
        name = next(k for k in header if k != "__metadata__")
        del header[name]["data_offsets"]
        put(json.dumps(header).encode())
    elif how == "huge_int_header":
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][0] = 424242
        put(json.dumps(header).replace("424242", "1" * 400).encode())
    elif how == "index_value_number":
        j = json.loads(idx.read_text())
        j["weight_map"][next(iter(j["weight_map"]))] = 7
        idx.write_text(json.dumps(j))
    else:
        idx.write_text('{"weight_map": ' + "[" * 20000 + "]" * 20000 + "}")
    with pytest.raises(CheckpointError, match=needle) as e:
        check_model_dir(model_dir)
    assert "\n" not in str(e.value)
    expect_refusal(capsys, ["push", model_dir, "me/tiny"], [str(model_dir), needle],
                   watch=tmp_path, seconds=30)
    assert hub.requests == []
    assert snapshot(model_dir)  # still readable, nothing removed
