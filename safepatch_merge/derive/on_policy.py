"""On-policy harmful data: a model's own greedy answers to harmful prompts, kept where the
judge calls them compliance.

`derive --on-policy` builds D_h this way from the prompts of its data file and the starting
model, so an SE objective pushes down what that model actually says, not text written by
other models; the demo builds its D_h the same way from an unaligned model's answers. The
judge is the toolkit's four-way judge (derive.behaviour.CompletionJudge): degenerate, refused
and non-answer completions are dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from ..io.atomic import write_atomic

PAIRS_FILE = "on_policy_pairs.jsonl"


def generate_compliant_pairs(model_dir: str | Path, prompts: list, out: str | Path, *,
                             max_new_tokens: int = 64, batch_size: int = 8, device: str = "auto",
                             system_prompt: str | None = None, min_pairs: int = 1,
                             pairs_name: str = PAIRS_FILE, report_name: str = "on_policy.json",
                             progress: bool = True, what: str = "answers",
                             hint: str = "this model refuses them") -> dict:
    """Answer `prompts` (eval.suites.Prompt) greedily with the model in `model_dir`; write the
    compliant (prompt, response) pairs to OUT/`pairs_name` (JSONL: prompt, response, source
    "SUITE:ID", judge) and a report to OUT/`report_name`; generations are cached in
    OUT/generations.jsonl (a rerun resumes).

    Returns the report: {prompts, kept, outcomes {compliance, refusal, non_answer,
    degenerate}, max_new_tokens, model}. Raises DataError, writing no pairs file, when fewer
    than `min_pairs` answers are kept (an aligned model refuses most harmful prompts).
    """
    from ..eval import generate
    from .behaviour import OUTCOMES, CompletionJudge

    out = Path(out)
    model, tok = generate.load_model(model_dir, device=device, dtype="auto")
    settings = generate.GenerationSettings(max_new_tokens=max_new_tokens,
                                           system_prompt=system_prompt)
    out.mkdir(parents=True, exist_ok=True)
    gens = generate.generate_completions(model, tok, prompts, settings,
                                         generate.model_fingerprint(model_dir),
                                         generate.GenerationCache(out / "generations.jsonl"),
                                         batch_size=batch_size, progress=progress)
    del model
    judge = CompletionJudge()
    kept, counts = [], dict.fromkeys(OUTCOMES, 0)
    for p, g in zip(prompts, gens):
        text = g["completion"].strip()
        verdict = judge(p.text, text)
        counts[verdict] += 1
        if verdict == "compliance":
            kept.append({"prompt": p.text, "response": text, "source": f"{p.suite}:{p.id}",
                         "judge": judge.name})
    if len(kept) < min_pairs:
        raise DataError(f"{model_dir}: only {len(kept)} of {len(prompts)} {what} were "
                        f"compliant (need {min_pairs}); {hint}")
    write_atomic(out / pairs_name, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                           for r in kept))
    report = {"prompts": len(prompts), "kept": len(kept), "outcomes": counts,
              "max_new_tokens": max_new_tokens, "model": str(model_dir), "judge": judge.name}
    write_atomic(out / report_name, json.dumps(report, indent=1) + "\n")
    return report
