"""The `shared_data` fixture (tests/conftest.py): absent public data skips the tests that need
it, except under CI=true, where it fails them (a missing data folder must not turn CI green)."""
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
# a fast test that takes the fixture
NEEDS_DATA = "tests/test_judge_split.py::test_smollm2_split_sizes_are_pinned"


def _run(tmp_path, ci: str | None):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["SAFEPATCH_SHARED_DATA"] = str(tmp_path / "absent")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           NEEDS_DATA], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_absent_data_skips_with_the_reason(tmp_path):
    res = _run(tmp_path, None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 skipped" in res.stdout
    assert f"public data not found at {tmp_path / 'absent'}" in res.stdout


def test_absent_data_fails_under_ci(tmp_path):
    res = _run(tmp_path, "true")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 error" in res.stdout or "1 failed" in res.stdout
    assert "CI=true requires it" in res.stdout


def test_present_data_is_found(shared_data):
    assert (shared_data / "train" / "harmful_pairs.jsonl").is_file()
