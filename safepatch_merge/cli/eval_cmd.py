"""`safepatch eval`: evaluate a model (one outcome per completion: compliance, refusal
full/partial, non-answer, degenerate; harmful compliance, over-refusal, utility perplexity) or
compare several evaluations. API twins: safepatch_merge.eval.run.evaluate and
safepatch_merge.eval.report.compare."""
from __future__ import annotations

import argparse

from ..config_fields import add_arguments, from_args
from ..errors import ConfigError
from ..eval.config import GENERATION, JUDGING, EvalConfig
from .options import add_output

EPILOG = """examples:
  # baseline on fixed 50-prompt subsets of the packaged suites, 64 new tokens, on CPU
  safepatch eval ./SmolLM2-135M-Instruct -o runs/eval/base --limit 50 --max-new-tokens 64

  # a patched model, never on prompts the patches were trained on
  safepatch eval ./patched -o runs/eval/patched --dedup-against data/harmful_pairs.jsonl

  # HarmBench with contextual behaviours, your own prompt file, a local guard model
  safepatch eval ./patched -o out --suite harmbench-contextual --suite my_prompts.jsonl \\
      --guard ./Llama-Guard-3-1B

  # the earlier phrase-rule judge, or a local judge model, instead of the packaged v2 judge
  safepatch eval ./patched -o out --judge rules-v1
  safepatch eval ./patched -o out --judge classifier --judge-model ./my-refusal-classifier

  # side by side, with a harmful-vs-over-refusal scatter plot (compare.md, compare.png)
  safepatch eval --compare runs/eval/base runs/eval/patched -o runs/eval/compare

suites: xstest (safe + unsafe), harmbench (standard behaviours), harmbench-contextual,
strongreject, advbench, mtbench (benign), or a .jsonl/.json/.csv file with a prompt field
(prompt/instruction/goal/Behavior/forbidden_prompt) and optional harmful/label per row.
An interrupted run resumes from OUT/generations.jsonl (per prompt). On harmful prompts only
`compliance` counts as complying; on XSTest safe prompts over-refusal counts refusals and
non-answers (reported separately too). Judges: docs/judge.md."""


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate compliance, refusals, non-answers, degeneration, "
                                    "utility",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="local Hugging Face model directory")
    add_output(p, "output directory")
    p.add_argument("--compare", nargs="+", metavar="RESULT",
                   help="result dirs/results.json files to put side by side (no model)")
    p.add_argument("--labels", nargs="+", help="names for --compare columns")
    groups = {title: p.add_argument_group(title) for title in (GENERATION, JUDGING)}
    from .judge_cmd import add_judge_arguments
    add_judge_arguments(groups[JUDGING])
    add_arguments(p, EvalConfig, groups=groups)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.compare:
        if args.model:
            raise ConfigError("give either a MODEL or --compare, not both")
        from ..eval.report import compare
        out = compare(args.compare, args.out, labels=args.labels)
        print(out["markdown"].read_text(), end="")
        print(f"wrote {out['markdown']} and {out['plot']}")
        return 0
    if not args.model:
        raise ConfigError("MODEL is required (or --compare RESULT ...)")
    from ..eval.report import markdown_table
    from ..eval.run import evaluate
    cfg = from_args(EvalConfig, args)
    result = evaluate(args.model, args.out, **cfg.evaluate_kwargs(), judge=args.judge,
                      judge_model=args.judge_model, progress=args.progress)
    print(markdown_table(result), end="")
    print(f"wrote {args.out}/results.json and results.md ({result['wall_time_s']} s)")
    return 0
