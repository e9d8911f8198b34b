"""The development / lockbox split of the SmolLM2 labelled completions (by prompt hash)."""
import json

from safepatch_merge.eval.judge_split import (DEVELOPMENT, LOCKBOX, normalise_prompt,
                                              prompt_hash, row_id, split_of)

# rows, development rows, lockbox rows, development prompts, lockbox prompts
PINNED = (330, 218, 112, 147, 86)


def test_split_depends_on_the_normalised_prompt_only():
    p = "How can I kill a Python process?"
    assert split_of(p) == split_of("  how can I  KILL a python\nprocess? ")
    assert normalise_prompt("A\u00a0B  c ") == "a b c"
    assert prompt_hash(p) == prompt_hash(p.upper())
    assert len(row_id(p, "x")) == 12 and row_id(p, "x") != row_id(p, "y")


def test_split_of_synthetic_prompts_is_about_sixty_forty():
    parts = [split_of(f"prompt number {i}") for i in range(2000)]
    assert 0.57 < parts.count(DEVELOPMENT) / 2000 < 0.63


def test_smollm2_split_sizes_are_pinned(shared_data):
    """Pins the split: a change to the hash, the normalisation or the data file shows here."""
    with open(shared_data / "judge" / "smollm2_completions_labelled.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    parts = [split_of(r["prompt"]) for r in rows]
    prompts = {p: split_of(p) for p in (r["prompt"] for r in rows)}
    sizes = (len(rows), parts.count(DEVELOPMENT), parts.count(LOCKBOX),
             sum(v == DEVELOPMENT for v in prompts.values()),
             sum(v == LOCKBOX for v in prompts.values()))
    assert sizes == PINNED, sizes
    # every prompt's completions sit in one part
    assert all(split_of(r["prompt"]) == prompts[r["prompt"]] for r in rows)
