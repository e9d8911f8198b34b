"""`safepatch judge IN -o OUT`: judge completions in a file (one outcome per row: compliance,
refusal full/partial, non_answer, degenerate). API twin: safepatch_merge.eval.judge_file.judge_file."""
from __future__ import annotations

import argparse

from ..eval.judge_models import JUDGES
from .options import add_output

EPILOG = """examples:
  # the packaged v2 judge over a JSONL file with prompt and completion fields
  safepatch judge completions.jsonl -o judged.jsonl

  # a CSV with other column names, whose "is_harmful" column says which prompts are harmful
  safepatch judge answers.csv -o judged.jsonl --prompt-column question \\
      --completion-column answer --harmful-column is_harmful

  # rules-v1, or a local Hugging Face judge model
  safepatch judge completions.jsonl -o judged.jsonl --judge rules-v1
  safepatch judge completions.jsonl -o judged.jsonl --judge classifier --judge-model ./my-judge

OUT is JSONL: every input field plus outcome, refusal_kind (full/partial for refusals),
judge_evidence (the rule or the score that decided), judge_score, judge, judge_version.
An empty completion is `degenerate`. The harmful column is optional (true/false, 1/0,
yes/no, harmful/safe); v2 reads lectures and bare warnings as refusals more reliably when it
knows which prompts are harmful (docs/judge.md)."""


def add_parser(sub) -> None:
    p = sub.add_parser("judge", help="judge completions in a JSONL/CSV file",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="JSONL or CSV file of prompts and completions")
    add_output(p, "JSONL file to write")
    add_judge_arguments(p)
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--completion-column", default="completion")
    p.add_argument("--harmful-column", default="harmful",
                   help="column saying whether each prompt is harmful, used where present "
                        "(default: harmful)")
    p.add_argument("--device", default="cpu", help="for --judge classifier / causal-lm")
    p.set_defaults(func=run)


def add_judge_arguments(p) -> None:
    """--judge and --judge-model, shared with `safepatch eval`."""
    p.add_argument("--judge", default="v2", choices=JUDGES,
                   help="v2 (default: rules + a small learned part, packaged), rules-v1 (the "
                        "earlier phrase rules), or a local model: classifier / causal-lm")
    p.add_argument("--judge-model", metavar="DIR",
                   help="local model directory for --judge classifier / causal-lm")


def run(args) -> int:
    from ..eval.judge_file import judge_file

    res = judge_file(args.input, args.out, judge=args.judge, judge_model=args.judge_model,
                     prompt_column=args.prompt_column, completion_column=args.completion_column,
                     harmful_column=args.harmful_column, device=args.device)
    counts = ", ".join(f"{k} {v}" for k, v in res["outcomes"].items())
    print(f"{res['rows']} rows judged by {res['judge']} {res['judge_version']}: {counts} "
          f"-> {res['out']}")
    return 0
