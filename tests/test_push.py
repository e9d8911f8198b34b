"""`safepatch push` / push_model against a fake Hub on 127.0.0.1 (tests/hub_server.py).

huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET when imported, so the CLI runs in a
subprocess with them set; Xet is disabled so the plain preupload / LFS / commit API is used.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safepatch_merge.errors import CheckpointError, ConfigError, SafepatchError
from safepatch_merge.push import check_model_dir, push_model
from safepatch_merge.push.hub import choose_method, is_large
from safepatch_merge.testing import make_tiny_model_dir

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub  # noqa: E402

TOKEN = "hf_fake_0123456789abcdef"  # must never show up in any output
CARD = "---\nbase_model: tiny/random\ntags: [safepatch]\n---\n# tiny patched model\n"


def _model_dir(path, shard="40KB"):
    d = make_tiny_model_dir(path, seed=3, max_shard_size=shard)
    (d / "README.md").write_text(CARD)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("push") / "patched")


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _local_files(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): _sha(p.read_bytes()) for p in d.rglob("*") if p.is_file()}


def _cli(args, hub=None, token=TOKEN, home=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(home), HF_HUB_DISABLE_PROGRESS_BARS="1")
    if hub is not None:
        env["HF_ENDPOINT"] = hub.endpoint
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: any request would fail
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "safepatch_merge", "push", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_check_lists_every_file(model_dir):
    files = check_model_dir(model_dir)
    local = {p.relative_to(model_dir).as_posix(): p.stat().st_size
             for p in model_dir.rglob("*") if p.is_file()}
    assert {f.path: f.size for f in files} == local
    assert sum(1 for f in files if f.path.endswith(".safetensors")) >= 2  # really sharded
    (model_dir / ".cache" / "huggingface").mkdir(parents=True)
    (model_dir / ".cache" / "huggingface" / "x.lock").write_text("")
    try:  # what upload_folder ignores is not listed either
        assert {f.path for f in check_model_dir(model_dir)} == set(local)
    finally:
        import shutil
        shutil.rmtree(model_dir / ".cache")


def _break(d: Path, how: str) -> str:
    """Damage the model directory `d` one way; return a word the refusal must name."""
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    if how == "no_readme":
        (d / "README.md").unlink()
        return "README.md"
    if how == "no_config":
        (d / "config.json").unlink()
        return "config.json"
    if how == "no_tokenizer":
        (d / "tokenizer.json").unlink()
        return "tokenizer.json"
    if how == "no_tokenizer_config":
        (d / "tokenizer_config.json").unlink()
        return "tokenizer_config.json"
    if how == "missing_shard":
        (d / shards[-1]).unlink()
        return shards[-1]
    if how == "truncated_shard":
        data = (d / shards[0]).read_bytes()
        (d / shards[0]).write_bytes(data[:-7])
        return shards[0]
    if how == "unlisted_shard":
        (d / "model-extra.safetensors").write_bytes((d / shards[0]).read_bytes())
        return "model-extra.safetensors"
    if how == "index_mismatch":
        name = next(k for k, v in idx["weight_map"].items() if v == shards[0])
        idx["weight_map"][name] = shards[1]
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        return shards[0]
    if how == "manifest":
        (d / ".safepatch_manifest.json").write_text("{}")
        return ".safepatch_manifest.json"
    if how == "inprogress":
        (d / (shards[0] + ".inprogress")).write_bytes(b"x")
        return ".inprogress"
    if how == "no_weights":
        for s in shards:
            (d / s).unlink()
        (d / "model.safetensors.index.json").unlink()
        return "weights"
    raise AssertionError(how)


BREAKS = ["no_readme", "no_config", "no_tokenizer", "no_tokenizer_config", "missing_shard",
          "truncated_shard", "unlisted_shard", "index_mismatch", "manifest", "inprogress",
          "no_weights"]


@pytest.mark.parametrize("how", BREAKS)
def test_incomplete_dir_is_refused(tmp_path, how):
    d = _model_dir(tmp_path / "m")
    word = _break(d, how)
    with pytest.raises(CheckpointError) as ei:
        check_model_dir(d)
    msg = str(ei.value)
    assert word in msg and "\n" not in msg, msg
    with pytest.raises(CheckpointError):  # dry runs refuse too
        push_model(d, "me/model", dry_run=True)


def test_partial_dir_and_missing_dir_are_refused(tmp_path, model_dir):
    import shutil

    p = tmp_path / "out.partial"
    shutil.copytree(model_dir, p)
    with pytest.raises(CheckpointError, match=r"unfinished output"):
        check_model_dir(p)
    with pytest.raises(CheckpointError, match="not found"):
        check_model_dir(tmp_path / "nope")


def test_single_file_model_is_complete(tmp_path):
    d = _model_dir(tmp_path / "single", shard="10GB")
    assert not (d / "model.safetensors.index.json").exists()
    assert "model.safetensors" in {f.path for f in check_model_dir(d)}


def test_bad_repo_id_and_no_token(model_dir, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="repository id"):
        push_model(model_dir, "not a/valid/id", dry_run=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"), raising=False)
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"),
                        raising=False)
    with pytest.raises(SafepatchError, match="no Hugging Face token"):
        push_model(model_dir, "me/model", endpoint="http://127.0.0.1:9")


def test_large_threshold(model_dir):
    files = check_model_dir(model_dir)
    assert not is_large(files)
    from safepatch_merge.push.check import UploadFile
    assert is_large([UploadFile("a", 5 * 10**9 + 1)])
    assert is_large([UploadFile(str(i), 1) for i in range(101)])
    assert choose_method(files, large=False) == "upload_folder"


def test_cli_push_uploads_every_file(model_dir, tmp_path):
    with FakeHub(token=TOKEN) as hub:
        r = _cli([model_dir, "me/tiny-patched", "--private", "--revision", "exp-1",
                  "--commit-message", "SafePatching a=0.1"], hub, home=tmp_path / "hf")
        assert r.returncode == 0, r.stderr[-3000:]
        assert TOKEN not in r.stdout + r.stderr
        assert not hub.unhandled, hub.unhandled
        repo = hub.repos["me/tiny-patched"]
        assert repo.private
        assert [s for _, s in repo.commits["exp-1"]] == ["SafePatching a=0.1"]
        assert repo.branches["main"] == {}  # committed to the branch only
        remote = {p: _sha(b) for p, b in hub.files("me/tiny-patched", "exp-1").items()}
        assert remote == _local_files(model_dir)
        # Weights went through LFS (upload, verify), with the token on every API call.
        assert any(m == "PUT" and p.startswith("/lfs-objects/") for m, p, _ in hub.requests)
        assert all(auth for m, p, auth in hub.requests if p.startswith("/api/") and m == "POST")
        assert "pushed" in r.stdout and "exp-1" in r.stdout


def test_api_push_to_main_twice(model_dir, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)  # already imported: patch the constant
    with FakeHub(token=TOKEN) as hub:
        res = push_model(model_dir, "org/m", token=TOKEN, endpoint=hub.endpoint)
        assert res.method == "upload_folder" and res.revision == "main"
        assert res.url and "/org/m/commit/" in res.url
        assert {p: _sha(b) for p, b in hub.files("org/m").items()} == _local_files(model_dir)
        assert not hub.repos["org/m"].private
        n_put = sum(1 for m, *_ in hub.requests if m == "PUT")
        # A second push of the same files uploads no LFS object again.
        push_model(model_dir, "org/m", token=TOKEN, endpoint=hub.endpoint,
                   commit_message="again")
        assert sum(1 for m, *_ in hub.requests if m == "PUT") == n_put
        assert not hub.unhandled, hub.unhandled


def test_cli_wrong_token_is_one_line_error(model_dir, tmp_path):
    with FakeHub(token=TOKEN) as hub:
        r = _cli([model_dir, "me/x"], hub, token="hf_wrong_token_abc", home=tmp_path / "hf")
        assert r.returncode == 1
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("safepatch push: error:")]
        assert len(err) == 1 and "me/x" in err[0], r.stderr[-2000:]
        assert "hf_wrong_token_abc" not in r.stdout + r.stderr
        assert "me/x" not in hub.repos


def test_cli_dry_run_uploads_nothing(model_dir, capsys, monkeypatch):
    # In-process, with huggingface_hub's default endpoint pointed at the fake Hub.
    from safepatch_merge.cli import main

    import huggingface_hub.constants as c

    monkeypatch.delenv("HF_TOKEN", raising=False)
    capsys.readouterr()
    with FakeHub(token=TOKEN) as hub:
        monkeypatch.setattr(c, "ENDPOINT", hub.endpoint)  # HfApi's default endpoint
        rc = main(["push", str(model_dir), "me/tiny", "--dry-run"])
        assert rc == 0
        assert hub.requests == [] and hub.repos == {} and hub.lfs == {}
    lines = capsys.readouterr().out.strip().splitlines()
    local = {p.relative_to(model_dir).as_posix(): p.stat().st_size
             for p in model_dir.rglob("*") if p.is_file()}
    listed = {ln.split()[-1]: int(ln.split()[0]) for ln in lines[:-1]}
    assert listed == local
    total = sum(local.values())
    assert f"{len(local)} files, {total} bytes" in lines[-1] and "nothing uploaded" in lines[-1]


def test_cli_incomplete_dir_uploads_nothing(tmp_path, capsys):
    from safepatch_merge.cli import main

    d = _model_dir(tmp_path / "m")
    (d / "README.md").unlink()
    capsys.readouterr()  # drop save_pretrained's progress output
    assert main(["push", str(d), "me/tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("safepatch push: error:") and "README.md" in err


def test_cli_large_folder_path(model_dir, tmp_path):
    """--large-folder yes: upload_large_folder where huggingface_hub still has it and Xet is
    off (1.x), else upload_folder (2.x); either way every file arrives intact on the branch."""
    import shutil

    d = tmp_path / "big"
    shutil.copytree(model_dir, d)  # upload_large_folder keeps state in d/.cache/huggingface
    with FakeHub(token=TOKEN) as hub:
        r = _cli([d, "me/big", "--large-folder", "yes", "--revision", "b1"], hub,
                 home=tmp_path / "hf")
        assert r.returncode == 0, r.stderr[-3000:]
        assert not hub.unhandled, hub.unhandled
        remote = {p: _sha(b) for p, b in hub.files("me/big", "b1").items()}
        assert remote == _local_files(model_dir)
        assert len(hub.repos["me/big"].commits["b1"]) >= 1
    from huggingface_hub import HfApi  # the subprocess imports this same version

    expected = "upload_large_folder" if hasattr(HfApi, "upload_large_folder") else "upload_folder"
    assert f"with {expected}" in r.stderr, r.stderr[-2000:]
    assert (d / ".cache" / "huggingface").is_dir() == (expected == "upload_large_folder")
    # Its state directory is ignored by a later check and push, not mistaken for the model.
    assert {f.path for f in check_model_dir(d)} == set(_local_files(model_dir))
