"""experiments/pattern_data.py: held-out XSTest calibration prompts never reach the test file."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from pattern_data import build_prompt_files  # noqa: E402
from pattern_presets import PRESETS  # noqa: E402


def _ids(path: Path) -> set[str]:
    return {json.loads(line)["id"] for line in path.read_text().splitlines()}


def test_calib_xstest_is_held_out(shared_data, tmp_path):
    train = shared_data / "train" / "harmful_pairs.jsonl"
    rep = build_prompt_files(shared_data, tmp_path / "a", [train], limit=300, calib_limit=4,
                             calib_benign=4, seed=0, calib_xstest=50)
    cal, test = _ids(tmp_path / "a" / "calib_xstest.jsonl"), _ids(tmp_path / "a" / "xstest_safe.jsonl")
    assert len(cal) == 50 and not cal & test
    assert len(test) == 200 and rep["xstest_safe"]["before"] == 200
    # without the split the test file has all 250 safe prompts and no calibration file
    rep0 = build_prompt_files(shared_data, tmp_path / "b", [train], limit=300, calib_limit=4,
                              calib_benign=4, seed=0)
    assert rep0["xstest_safe"]["used"] == 250 and "calib_xstest" not in rep0
    assert not (tmp_path / "b" / "calib_xstest.jsonl").exists()


def test_run1_preset_is_frozen():
    r1 = PRESETS["gpu-run1"]
    assert r1.sft_steps == (50, 100, 200, 400) and r1.se_nll_ceiling == 8.0
    assert r1.calib_xstest == 0 and r1.calib_benign_max == 0.5 and len(r1.sweep) == 6
    assert PRESETS["gpu"].calib_xstest == 50 and PRESETS["gpu"].sft_steps[0] == 5
