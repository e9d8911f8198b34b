"""Draw a blind labelling sample from stored pattern-run completions (development prompts only).

Rows are drawn per (run, variant) with a fixed seed, only where the prompt falls in the
development part of the judge split (`safepatch_merge.eval.judge_split`), never duplicating a
row of the shared labelled file. Two files come out:

- `blind.jsonl`: item, prompt, completion — in shuffled order, nothing else (no model, no
  variant, no suite, no stored verdict). The labeller sees only this file.
- `key.jsonl`: item -> run, variant, suite, id, harmful (joined back after labelling).

    python experiments/judge_label_sample.py --data-dir DATA --out /tmp/blind

`--heldout` draws the held-out set instead (experiments/judge_labels/
smollm2_heldout_labelled.jsonl): prompts of both parts of the split, every variant of the three
runs, 8 rows per (run, variant) and 16 for the most compliant variants (`shipped`,
`osm_only`), seed 2026, skipping every row already labelled (the shared file, whole, and the
development labels); items are named y000, y001, ...

    python experiments/judge_label_sample.py --data-dir DATA --heldout --out /tmp/held

`--other-models` draws texts written by other chat models, none from XSTest (experiments/
judge_labels/other_models_labelled.jsonl): the safe answers and refusals of the Safety-Tuned
LLaMAs training set (`train/safety_refusals.json`), the harmful responses of D_h
(`train/harmful_pairs.jsonl`, stratified by source model), Llama-3's benign reference answers,
Alpaca answers (half of them shorter than 120 characters), and SmolLM2 answers to benign
Alpaca instructions from the frontier screen (60 % of them shorter than 120 characters:
one-line answers are where a judge mistakes an answer for a non-answer); seed 7, items o000,
o001, ...

    python experiments/judge_label_sample.py --data-dir DATA --other-models --out /tmp/om
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

from safepatch_merge.eval.judge_split import DEVELOPMENT, row_id, split_of

HERE = Path(__file__).resolve().parent
# (run name, completions file, variants to draw from, rows per variant). Run 1's variants all
# differ from the labelled file's (a 50-step backbone); from run 2 and CPU run 1 only the
# variants the labelled file does not hold.
PLAN = (
    ("run1", "results/completions.jsonl.gz", None, 10),
    ("run2", "results/run2/completions.jsonl.gz",
     ("osm_only", "ties", "shipped", "sp_a0.05_b0.05_al1_be1_p1", "sp_a0.3_b0.3_al1_be1_p1",
      "sp_a0.05_b0.3_al1_be1_p1", "sp_a0.1_b0.1_al0.5_be1_p1", "sp_a0.1_b0.1_al1_be2_p1",
      "sp_a0.1_b0.1_al1_be1_p0.5"), 5),
    ("cpu_run1", "results/cpu_run1/completions.jsonl.gz",
     ("backbone", "osm_only", "safepatch", "ties", "intersection", "sp_a0.05_b0.05_al1_be1_p1",
      "sp_a0.3_b0.3_al1_be1_p1"), 5),
)


def draw(data_dir: Path, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(blind rows, key rows) of the sample, see module doc."""
    with open(data_dir / "judge" / "smollm2_completions_labelled.jsonl", encoding="utf-8") as f:
        seen = {row_id(r["prompt"], r["completion"])
                for r in map(json.loads, f) if split_of(r["prompt"]) == DEVELOPMENT}
    rng = random.Random(seed)
    picked = []
    for run, path, variants, k in PLAN:
        with gzip.open(HERE / path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        for v in variants or sorted({r["variant"] for r in rows}):
            pool = [r for r in rows if r["variant"] == v and split_of(r["prompt"]) == DEVELOPMENT
                    and row_id(r["prompt"], r["completion"]) not in seen]
            for r in rng.sample(pool, min(k, len(pool))):
                rid = row_id(r["prompt"], r["completion"])
                if rid in seen:  # the same text from another variant
                    continue
                seen.add(rid)
                picked.append((run, r))
    rng.shuffle(picked)
    blind, key = [], []
    for i, (run, r) in enumerate(picked):
        item = f"x{i:03d}"
        blind.append({"item": item, "prompt": r["prompt"], "completion": r["completion"]})
        key.append({"item": item, "run": run, "variant": r["variant"], "suite": r["suite"],
                    "id": r["id"], "harmful": r["harmful"]})
    return blind, key


HELDOUT_RUNS = (("run1", "results/completions.jsonl.gz"),
                ("run2", "results/run2/completions.jsonl.gz"),
                ("cpu_run1", "results/cpu_run1/completions.jsonl.gz"))
HELDOUT_ROWS = {"shipped": 16, "osm_only": 16}  # default 8 per (run, variant)


def draw_heldout(data_dir: Path, seed: int = 2026) -> tuple[list[dict], list[dict]]:
    """(blind rows, key rows) of the held-out sample (module doc)."""
    with open(data_dir / "judge" / "smollm2_completions_labelled.jsonl", encoding="utf-8") as f:
        seen = {row_id(r["prompt"], r["completion"]) for r in map(json.loads, f)}
    with open(HERE / "judge_labels" / "smollm2_extra_labelled.jsonl", encoding="utf-8") as f:
        seen |= {row_id(r["prompt"], r["completion"]) for r in map(json.loads, f)}
    rng = random.Random(seed)
    picked: dict[str, tuple[str, dict]] = {}  # one row per distinct text, first drawn wins
    for run, path in HELDOUT_RUNS:
        with gzip.open(HERE / path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        by_variant: dict[str, list[dict]] = {}
        for r in rows:
            if r["completion"].strip() and row_id(r["prompt"], r["completion"]) not in seen:
                by_variant.setdefault(r["variant"], []).append(r)
        for v, pool in sorted(by_variant.items()):
            for r in rng.sample(pool, min(HELDOUT_ROWS.get(v, 8), len(pool))):
                picked.setdefault(row_id(r["prompt"], r["completion"]), (run, r))
    order = list(picked.values())
    rng.shuffle(order)
    blind, key = [], []
    for i, (run, r) in enumerate(order):
        item = f"y{i:03d}"
        blind.append({"item": item, "prompt": r["prompt"], "completion": r["completion"]})
        key.append({"item": item, "run": run, "variant": r["variant"], "suite": r["suite"],
                    "id": r["id"], "harmful": r["harmful"]})
    return blind, key


SHORT = 120  # characters: a one-line answer


def _stratified(rng: random.Random, pool: list, k: int, short_share: float, text) -> list:
    """k rows of pool, a share of them with text(row) shorter than SHORT characters."""
    short = [r for r in pool if len(text(r).strip()) < SHORT]
    long_ = [r for r in pool if len(text(r).strip()) >= SHORT]
    n_short = min(len(short), round(k * short_share))
    return rng.sample(short, n_short) + rng.sample(long_, min(len(long_), k - n_short))


def draw_other_models(data_dir: Path, seed: int = 7) -> tuple[list[dict], list[dict]]:
    """(blind rows, key rows) of the other-models sample (module doc)."""
    rng = random.Random(seed)
    picked: dict[str, tuple[str, str, dict]] = {}  # row id -> (source, model, row)

    def add(source: str, model: str, prompt: str, completion: str, extra: dict) -> None:
        if completion.strip():
            picked.setdefault(row_id(prompt, completion),
                              (source, model, {"prompt": prompt, "completion": completion,
                                               **extra}))

    def indexed(rows: list[dict]) -> list[dict]:  # the row's index in its file, as `ref`
        return [dict(r, ref=i) for i, r in enumerate(rows)]

    refusals = indexed(json.loads((data_dir / "train" / "safety_refusals.json")
                                  .read_text("utf-8")))
    for r in rng.sample(refusals, 140):
        prompt = r["instruction"] + (("\n\n" + r["input"]) if r["input"] else "")
        add("safety_refusals", "safety-tuned-llamas (gpt-3.5-turbo answers)", prompt,
            r["output"], {"harmful": True, "ref": r["ref"]})
    with open(data_dir / "train" / "harmful_pairs.jsonl", encoding="utf-8") as f:
        pairs = indexed([json.loads(line) for line in f])
    by_source: dict[str, list[dict]] = {}
    for r in pairs:
        by_source.setdefault(r["source"], []).append(r)
    sources = sorted(by_source)
    for i in range(70):  # round-robin over source models, one random row each
        r = rng.choice(by_source[sources[i % len(sources)]])
        add("harmful_pairs", r["source"], r["prompt"], r["response"],
            {"harmful": True, "ref": r["ref"]})
    with open(data_dir / "eval" / "benign_reference_completions.jsonl", encoding="utf-8") as f:
        refs = indexed([json.loads(line) for line in f])
    for r in rng.sample(refs, 40):
        add("benign_reference", "llama-3-8b-instruct", r["prompt"], r["response"],
            {"harmful": False, "ref": r["ref"]})
    alpaca = indexed(json.loads((data_dir / "train" / "alpaca_en_demo.json").read_text("utf-8")))
    for r in _stratified(rng, alpaca, 50, 0.5, lambda r: r["output"]):
        prompt = r["instruction"] + (("\n\n" + r["input"]) if r["input"] else "")
        add("alpaca_demo", "alpaca (text-davinci-003 answers)", prompt, r["output"],
            {"harmful": False, "ref": r["ref"]})
    with gzip.open(HERE / "results" / "frontier" / "completions.jsonl.gz", "rt",
                   encoding="utf-8") as f:
        smol = [r for r in map(json.loads, f) if r["suite"] == "alpaca_benign"]
    for r in _stratified(rng, smol, 50, 0.6, lambda r: r["completion"]):
        add("frontier_alpaca", f"smollm2-135m {r['point']} seed {r['seed']}", r["prompt"],
            r["completion"], {"harmful": False})
    order = list(picked.values())
    rng.shuffle(order)
    blind, key = [], []
    for i, (source, model, r) in enumerate(order):
        item = f"o{i:03d}"
        blind.append({"item": item, "prompt": r["prompt"], "completion": r["completion"]})
        key.append({"item": item, "source": source, "model": model, "harmful": r["harmful"],
                     "part": split_of(r["prompt"]),
                     **({"ref": r["ref"]} if "ref" in r else {})})
    return blind, key


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="the shared data folder")
    ap.add_argument("--out", required=True, help="folder for blind.jsonl and key.jsonl")
    ap.add_argument("--heldout", action="store_true", help="draw the held-out set (module doc)")
    ap.add_argument("--other-models", action="store_true",
                    help="draw other chat models' texts (module doc)")
    ap.add_argument("--seed", type=int, default=None,
                    help="default 0, 2026 with --heldout, 7 with --other-models")
    a = ap.parse_args(argv)
    if a.other_models:
        blind, key = draw_other_models(Path(a.data_dir), 7 if a.seed is None else a.seed)
    elif a.heldout:
        blind, key = draw_heldout(Path(a.data_dir), 2026 if a.seed is None else a.seed)
    else:
        blind, key = draw(Path(a.data_dir), 0 if a.seed is None else a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("blind.jsonl", blind), ("key.jsonl", key)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                encoding="utf-8")
    print(f"{len(blind)} items -> {out}/blind.jsonl (labeller) and key.jsonl (join)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
