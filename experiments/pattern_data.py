"""Data of the pattern-reproduction experiment: the safety-tuning mix, D_h, and the evaluation
prompt files (deduplicated against everything the models were trained on, fixed subsets).

All files are written once into the experiment's data folder and then read by path, so every
evaluated model sees byte-identical prompt sets and their sizes are on record.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from safepatch_merge.errors import DataError
from safepatch_merge.eval.suites import (TrainingIndex, deduplicate, fixed_subset,
                                         load_suite, load_training_prompts, load_user_file)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _alpaca_rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for r in rows:
        instr, inp, resp = r.get("instruction", ""), r.get("input", ""), r.get("output", "")
        if not (isinstance(instr, str) and instr.strip() and isinstance(resp, str) and resp.strip()):
            continue
        prompt = f"{instr}\n{inp}" if isinstance(inp, str) and inp.strip() else instr
        out.append({"prompt": prompt, "response": resp})
    return out


def build_sft_mix(data_dir: Path, out: Path, n_refusals: int, n_benign: int, seed: int) -> dict:
    """`out`: JSONL of {prompt, response, kind} — `n_refusals` rows of safety_refusals.json
    (harmful instructions with refusals / safe answers) and `n_benign` of alpaca_en_demo.json,
    fixed random subsets, shuffled together. Returns counts."""
    ref = _alpaca_rows(data_dir / "train" / "safety_refusals.json")
    ben = _alpaca_rows(data_dir / "train" / "alpaca_en_demo.json")
    rng = random.Random(seed)
    rng.shuffle(ref)
    rng.shuffle(ben)
    rows = [dict(r, kind="refusal") for r in ref[:n_refusals]] + \
           [dict(r, kind="benign") for r in ben[:n_benign]]
    rng.shuffle(rows)
    _write_jsonl(out, rows)
    return {"refusal_rows": min(n_refusals, len(ref)), "benign_rows": min(n_benign, len(ben)),
            "available": {"safety_refusals": len(ref), "alpaca_en_demo": len(ben)}}


def build_dh(data_dir: Path, out: Path, n_pairs: int, seed: int) -> dict:
    """`out`: a fixed random subset of `n_pairs` rows of harmful_pairs.jsonl (prompt, response)."""
    src = data_dir / "train" / "harmful_pairs.jsonl"
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise DataError(f"{src}: no rows")
    random.Random(seed).shuffle(rows)
    keep = [{"prompt": r["prompt"], "response": r["response"]} for r in rows[:n_pairs]]
    _write_jsonl(out, keep)
    return {"rows": len(keep), "distinct_prompts": len({r["prompt"] for r in keep}),
            "available_rows": len(rows)}


def _to_rows(prompts) -> list[dict]:
    return [{"id": p.id, "prompt": p.text, "harmful": p.harmful} for p in prompts]


def build_prompt_files(data_dir: Path, out_dir: Path, training_files: list[Path],
                       limit: int, calib_limit: int, calib_benign: int, seed: int,
                       calib_xstest: int = 0) -> dict:
    """Evaluation and calibration prompt files in `out_dir`, deduplicated (exact and fuzzy,
    eval.suites.deduplicate) against the prompts of `training_files`, then fixed subsets:

    - xstest_safe.jsonl: XSTest v2 safe prompts (over-refusal), at most `limit`;
    - harmbench_test.jsonl: HarmBench test standard behaviours, at most `limit`;
    - strongreject.jsonl: StrongREJECT prompts, at most `limit`;
    - calib_harmful.jsonl / calib_alpaca.jsonl: HarmBench *validation* standard behaviours
      (filled up with AdvBench prompts) and benign Alpaca instructions, only for choosing the
      safety-tuned backbone (never reported as results);
    - calib_xstest.jsonl (only when `calib_xstest` > 0): that many XSTest safe prompts held out
      for calibrating over-refusal; they are removed from xstest_safe.jsonl, so the reported
      over-refusal is measured on the other prompts only.
    Returns {file stem: {before, removed_exact, removed_fuzzy, after_dedup, used}}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = TrainingIndex(t for f in training_files for t in load_training_prompts(f))
    report = {}

    def emit(stem: str, prompts, n: int) -> None:
        kept, rep = deduplicate(prompts, index)
        sub = fixed_subset(kept, n, seed)
        _write_jsonl(out_dir / f"{stem}.jsonl", _to_rows(sub))
        report[stem] = {"before": rep.before, "removed_exact": rep.removed_exact,
                        "removed_fuzzy": rep.removed_fuzzy, "after_dedup": rep.after,
                        "used": len(sub)}

    xs = [p for p in load_suite("xstest") if not p.harmful]
    if calib_xstest > 0:
        # Salted seed: the held-out prompts are not the first ones of the test subset's order.
        cal = fixed_subset(deduplicate(xs, index)[0], calib_xstest, seed + 7919)
        emit("calib_xstest", cal, calib_xstest)
        held = {p.id for p in cal}
        xs = [p for p in xs if p.id not in held]
    emit("xstest_safe", xs, limit)
    emit("harmbench_test", load_suite("harmbench"), limit)
    emit("strongreject", load_suite("strongreject"), limit)
    val = load_user_file(data_dir / "eval" / "harmbench_val.csv", harmful=True,
                         name="harmbench_val")
    val = [p for p in val if p.meta.get("FunctionalCategory") not in ("copyright", "contextual")]
    # HarmBench validation has only 41 standard behaviours: AdvBench (never evaluated here)
    # fills the calibration set up to calib_limit.
    val_kept, _ = deduplicate(val, index)
    adv_kept, _ = deduplicate(load_suite("advbench"), index)
    fill = fixed_subset(adv_kept, max(0, calib_limit - len(val_kept)), seed)
    emit("calib_harmful", val + fill, calib_limit)
    alp = json.loads((data_dir / "eval" / "alpaca_harmless_test.json").read_text(encoding="utf-8"))
    from safepatch_merge.eval.suites import Prompt
    alp_prompts = [Prompt("alpaca", f"alpaca-{i}", r["instruction"], False)
                   for i, r in enumerate(alp) if isinstance(r.get("instruction"), str)]
    emit("calib_alpaca", alp_prompts, calib_benign)
    return report
