"""`safepatch eval`: evaluate a model (one outcome per completion: compliance, refusal
full/partial, non-answer, degenerate; harmful compliance, over-refusal, utility perplexity) or
compare several evaluations. API twins: safepatch_merge.eval.run.evaluate and
safepatch_merge.eval.report.compare."""
from __future__ import annotations

import argparse

from ..errors import ConfigError
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
    p.add_argument("--suite", action="append", dest="suites", metavar="NAME|FILE",
                   help="suite name or prompt file (repeatable; default: xstest harmbench "
                        "strongreject advbench)")
    p.add_argument("--limit", type=int, help="fixed subset: at most N prompts per suite")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the fixed subset")
    p.add_argument("--file-prompts", choices=("harmful", "benign", "labelled"),
                   default="harmful", help="what rows of a user prompt file are when they "
                   "carry no harmful/label field (labelled: they must; default harmful)")
    p.add_argument("--dedup-against", action="append", default=[], metavar="TRAIN_FILE",
                   help="training prompts to exclude (normalised exact + fuzzy match)")
    p.add_argument("--fuzzy-threshold", type=float, default=0.85,
                   help="difflib similarity ratio at or above which a prompt counts as a "
                        "duplicate (default 0.85)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--system-prompt", help="system message put before every prompt")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed raw prompts (models without a chat template)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, "
                                                    "bfloat16, float16")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; "
                                               "1 avoids thrashing on a busy shared host)")
    g.add_argument("--cache", help="generation cache file (default OUT/generations.jsonl)")
    j = p.add_argument_group("judging and utility")
    from .judge_cmd import add_judge_arguments
    add_judge_arguments(j)
    j.add_argument("--guard", help="local guard model dir (Llama-Guard-style causal LM or a "
                                   "sequence classifier): adds a harmful rate")
    j.add_argument("--guard-kind", default="auto", choices=("auto", "causal-lm", "classifier"))
    j.add_argument("--no-utility", action="store_true", help="skip the perplexity check")
    j.add_argument("--utility-file", help="reference answers JSONL (prompt, response); default "
                                          "the shared data folder's benign_reference_completions")
    j.add_argument("--utility-limit", type=int, help="use the first N reference answers")
    j.add_argument("--utility-max-tokens", type=int, default=256)
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickle weights (pytorch_model.bin) with torch.load(weights_only="
                        "True); refused by default")
    p.add_argument("--label", help="name of this model in tables and plots")
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
    from ..eval.generate import GenerationSettings
    from ..eval.report import markdown_table
    from ..eval.run import DEFAULT_SUITES, evaluate
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed, system_prompt=args.system_prompt,
                                  chat_template=not args.no_chat_template)
    user_harmful = {"harmful": True, "benign": False, "labelled": None}[args.file_prompts]
    result = evaluate(args.model, args.out, args.suites or DEFAULT_SUITES, limit=args.limit,
                      subset_seed=args.subset_seed, user_harmful=user_harmful,
                      dedup_against=args.dedup_against, fuzzy_threshold=args.fuzzy_threshold,
                      settings=settings, batch_size=args.batch_size, device=args.device,
                      dtype=args.dtype, judge=args.judge, judge_model=args.judge_model,
                      guard=args.guard, guard_kind=args.guard_kind,
                      utility=not args.no_utility, utility_file=args.utility_file,
                      utility_limit=args.utility_limit,
                      utility_max_tokens=args.utility_max_tokens, cache_path=args.cache,
                      label=args.label, threads=args.threads,
                      progress=args.progress, allow_pickle=args.allow_pickle)
    print(markdown_table(result), end="")
    print(f"wrote {args.out}/results.json and results.md ({result['wall_time_s']} s)")
    return 0
