"""Behaviour of the model being derived, measured on calibration prompts: the outcome of a
completion, stop rules, and a probe that measures them between training steps.

Outcome of one completion (`CompletionJudge`): the toolkit's four-way judge (eval.judge_v2):
`compliance`, `refusal`, `non_answer` or `degenerate`, the prompt taken as harmful.

Stop rules (`StopRule.parse`): `METRIC>=X` or `METRIC<=X` with METRIC one of
refusal_rate, compliance_rate, non_answer_rate, degenerate_rate (shares of the harmful
calibration prompts' greedy completions) or perplexity (of benign reference answers, response
tokens only, as eval.utility computes it).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

OUTCOMES = ("compliance", "refusal", "non_answer", "degenerate")
RATE_METRICS = {"refusal_rate": "refusal", "compliance_rate": "compliance",
                "non_answer_rate": "non_answer", "degenerate_rate": "degenerate"}
METRICS = tuple(RATE_METRICS) + ("perplexity",)

_RULE = re.compile(r"^\s*([a-z_]+)\s*(>=|<=)\s*([0-9.eE+-]+)\s*$")


class CompletionJudge:
    """The v2 judge's outcome of a completion to a harmful prompt; `name` identifies it
    (judge and weights version) in records."""

    def __init__(self):
        from ..eval.judge_v2 import JudgeV2

        self.v2 = JudgeV2()
        self.name = f"{self.v2.name} {self.v2.version}"

    def __call__(self, prompt: str, completion: str) -> str:
        return self.v2.judge(prompt, completion.strip(), True).outcome


@dataclass(frozen=True)
class StopRule:
    """Stop when `metric` `op` `target` holds (op '>=' or '<=')."""

    metric: str
    op: str
    target: float

    @classmethod
    def parse(cls, text: str) -> "StopRule":
        m = _RULE.match(str(text))
        if not m or m.group(1) not in METRICS:
            raise ConfigError(f"stop rule {text!r}: expected METRIC>=X or METRIC<=X with METRIC "
                              f"one of {', '.join(METRICS)}")
        try:
            target = float(m.group(3))
        except ValueError:
            raise ConfigError(f"stop rule {text!r}: {m.group(3)!r} is not a number") from None
        if m.group(1) in RATE_METRICS and not 0 <= target <= 1:
            raise ConfigError(f"stop rule {text!r}: a rate target must be in [0, 1]")
        return cls(m.group(1), m.group(2), target)

    def holds(self, values: dict) -> bool:
        v = values.get(self.metric)
        if v is None or v != v:
            return False
        return v >= self.target if self.op == ">=" else v <= self.target

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.target:g}"


def load_calibration_prompts(path: str | Path, limit: int | None = None) -> list:
    """Harmful calibration prompts (eval.suites.Prompt) from a JSONL/JSON/CSV file; the first
    `limit` of them."""
    from ..eval.suites import load_user_file

    prompts = load_user_file(path, harmful=True, name="calibration")
    return prompts[:limit] if limit else prompts


class BehaviourProbe:
    """Measures the stop metrics of a model: greedy completions of the harmful calibration
    prompts judged by `CompletionJudge`, and/or perplexity of benign reference answers.

    prompts: eval.suites.Prompt list or None; reference: [(prompt, response)] or None.
    Generation: greedy, `max_new_tokens`, chat template with `system_prompt`, left-padded
    batches of `batch_size`. Reference answers are cut to `max_response_tokens`.
    """

    def __init__(self, tokenizer, prompts=None, reference=None, max_new_tokens: int = 48,
                 batch_size: int = 16, system_prompt: str | None = None,
                 max_response_tokens: int = 256):
        import copy

        self.tok = copy.copy(tokenizer)
        self.tok.padding_side = "left"  # batched generation
        self.prompts, self.reference = prompts or [], reference or []
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.system_prompt, self.max_response_tokens = system_prompt, max_response_tokens
        self.judge = CompletionJudge()

    def measure(self, model) -> tuple[dict, list[dict]]:
        """({metric: value, "n_prompts", "n_reference"}, completions [{id, prompt,
        completion, outcome}]). The model is put in eval mode with its KV cache on while
        measuring and restored afterwards."""
        import torch

        from ..eval.generate import GenerationSettings, generate_completions
        from ..eval.utility import reference_perplexity

        was_training, use_cache = model.training, model.config.use_cache
        model.eval()
        model.config.use_cache = True
        values: dict = {"n_prompts": len(self.prompts), "n_reference": len(self.reference)}
        recs: list[dict] = []
        try:
            with torch.no_grad():
                if self.prompts:
                    settings = GenerationSettings(max_new_tokens=self.max_new_tokens,
                                                  system_prompt=self.system_prompt)
                    gens = generate_completions(model, self.tok, self.prompts, settings,
                                                "derive-probe", None, self.batch_size,
                                                progress=False)
                    for p, g in zip(self.prompts, gens):
                        recs.append({"id": p.id, "prompt": p.text, "completion": g["completion"],
                                     "outcome": self.judge(p.text, g["completion"])})
                    for metric, outcome in RATE_METRICS.items():
                        values[metric] = sum(r["outcome"] == outcome for r in recs) / len(recs)
                if self.reference:
                    values["perplexity"] = reference_perplexity(
                        model, self.tok, self.reference, batch_size=self.batch_size,
                        max_response_tokens=self.max_response_tokens, n_boot=1,
                        progress=False)["perplexity"]
        finally:
            model.config.use_cache = use_cache
            model.train(was_training)
        return values, recs


def append_probe_log(path: Path, step: int, values: dict, recs: list[dict]) -> None:
    """One JSON line per probe: step, metric values and every calibration completion."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "values": values, "completions": recs},
                           ensure_ascii=False) + "\n")
