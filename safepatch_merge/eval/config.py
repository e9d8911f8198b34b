"""EvalConfig: the options of one evaluation, declared once (default, help, choices), and
their validation. `safepatch eval` and the `eval:` section of a run config are derived from it
(config_fields.py); `evaluate_kwargs` turns it into eval.run.evaluate's arguments. Torch-free,
so `safepatch eval --help` stays fast."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config_fields import FieldError, option
from ..errors import ConfigError

DEFAULT_SUITES = ("xstest", "harmbench", "strongreject", "advbench")
# difflib ratio at or above which an eval prompt counts as a training prompt (suites.deduplicate)
DEFAULT_FUZZY_THRESHOLD = 0.85
FILE_PROMPTS = {"harmful": True, "benign": False, "labelled": None}
GUARD_KINDS = ("auto", "causal-lm", "classifier")
# argparse group titles of `safepatch eval --help`
GENERATION, JUDGING = "generation", "judging and utility"


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. Greedy unless `temperature` > 0 (then sampling with `top_p`, seeded
    per batch from `seed`; sampled runs are reproducible only with the same batch size).
    `chat_template=False` feeds the raw prompt (base models without a template)."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    system_prompt: str | None = None
    chat_template: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def key_fields(self) -> dict:
        """The settings that change a completion (batch size and device do not, up to
        floating-point noise)."""
        d = asdict(self)
        if self.greedy:
            d.pop("seed"), d.pop("top_p")
        return d


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate a model (each field's help says what it does). Validated on
    construction: an invalid value raises ConfigError naming it. `enabled`, `backbone` and
    `dedup` are run-config keys (the pipeline's own); the command-line-only options (device,
    threads, cache, ...) are not YAML keys: the pipeline sets them itself. Read access by key
    (`cfg["limit"]`) is the same as by attribute."""

    enabled: bool = option(True, cli=False)
    backbone: bool = option(True, cli=False)
    suites: list[str] = option(
        list(DEFAULT_SUITES), append=True, flag="--suite", metavar="NAME|FILE",
        help="suite name or prompt file (repeatable; default: {default})")
    limit: int | None = option(None, help="fixed subset: at most N prompts per suite")
    subset_seed: int = option(0, help="seed of the fixed subset")
    file_prompts: str = option(
        "harmful", choices=tuple(FILE_PROMPTS), yaml=False,
        help="what rows of a user prompt file are when they carry no harmful/label field "
             "(labelled: they must; default {default})")
    dedup: bool = option(True, cli=False)
    dedup_against: list[str] = option(
        [], append=True, yaml=False, metavar="TRAIN_FILE",
        help="training prompts to exclude (normalised exact + fuzzy match)")
    fuzzy_threshold: float = option(
        DEFAULT_FUZZY_THRESHOLD,
        help="difflib similarity ratio at or above which a prompt counts as a duplicate "
             "(default {default})")
    max_new_tokens: int = option(256, group=GENERATION)
    batch_size: int = option(8, group=GENERATION)
    temperature: float = option(0.0, group=GENERATION, help="0 = greedy (default)")
    top_p: float = option(1.0, group=GENERATION)
    seed: int = option(0, group=GENERATION, help="sampling seed")
    system_prompt: str | None = option(None, group=GENERATION,
                                       help="system message put before every prompt")
    chat_template: bool = option(True, group=GENERATION, flag="--no-chat-template",
                                 yaml=False,
                                 help="feed raw prompts (models without a chat template)")
    device: str = option("auto", group=GENERATION, yaml=False,
                         help="auto, cpu, cuda, cuda:1, ...")
    dtype: str = option("auto", group=GENERATION,
                        help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    threads: int | None = option(None, group=GENERATION, yaml=False,
                                 help="torch CPU threads (default: torch's choice; 1 avoids "
                                      "thrashing on a busy shared host)")
    cache: str | None = option(None, group=GENERATION, yaml=False,
                               help="generation cache file (default OUT/generations.jsonl)")
    guard: str | None = option(
        None, group=JUDGING, help="local guard model dir (Llama-Guard-style causal LM or a "
                                  "sequence classifier): adds a harmful rate")
    guard_kind: str = option("auto", group=JUDGING, choices=GUARD_KINDS)
    utility: bool = option(True, group=JUDGING, flag="--no-utility",
                           help="skip the perplexity check")
    utility_file: str | None = option(
        None, group=JUDGING, help="reference answers JSONL (prompt, response); default the "
                                  "shared data folder's benign_reference_completions")
    utility_limit: int | None = option(None, group=JUDGING,
                                       help="use the first N reference answers")
    utility_max_tokens: int = option(256, group=JUDGING)
    allow_pickle: bool = option(
        False, yaml=False, help="load pickle weights (pytorch_model.bin) with torch.load("
                                "weights_only=True); refused by default")
    label: str | None = option(None, yaml=False, help="name of this model in tables and plots")

    def __post_init__(self) -> None:
        if isinstance(self.suites, (str, tuple)):
            object.__setattr__(self, "suites",
                               [self.suites] if isinstance(self.suites, str) else list(self.suites))
        for k in ("enabled", "backbone", "dedup", "utility", "chat_template", "allow_pickle"):
            if not isinstance(getattr(self, k), bool):
                raise FieldError(k, f"expected true or false, got {getattr(self, k)!r}")
        if not isinstance(self.suites, list) or not self.suites or \
                not all(isinstance(s, str) and s for s in self.suites):
            raise FieldError("suites", "expected a non-empty list of suite names or files")
        for k in ("limit", "utility_limit", "threads"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise FieldError(k, f"expected a positive integer or null, got {v!r}")
        for k in ("max_new_tokens", "batch_size", "utility_max_tokens"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FieldError(k, f"expected a positive integer, got {v!r}")
        for k in ("temperature", "top_p", "fuzzy_threshold"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise FieldError(k, f"expected a number, got {v!r}")
        if self.file_prompts not in FILE_PROMPTS:
            raise FieldError("file_prompts", f"expected one of {', '.join(FILE_PROMPTS)}, "
                                             f"got {self.file_prompts!r}")
        if self.guard_kind not in GUARD_KINDS:
            raise FieldError("guard_kind", f"expected one of {', '.join(GUARD_KINDS)}, "
                                           f"got {self.guard_kind!r}")
        self.generation()  # GenerationSettings checks temperature and top_p

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def generation(self):
        """The decoding settings (a generate.GenerationSettings)."""
        return GenerationSettings(max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_p=self.top_p,
                                  seed=self.seed, system_prompt=self.system_prompt,
                                  chat_template=self.chat_template)

    def evaluate_kwargs(self) -> dict:
        """The keyword arguments of eval.run.evaluate (after model_path and out_dir) but
        judge, judge_model and progress."""
        return dict(suites=list(self.suites), limit=self.limit, subset_seed=self.subset_seed,
                    user_harmful=FILE_PROMPTS[self.file_prompts],
                    dedup_against=list(self.dedup_against),
                    fuzzy_threshold=self.fuzzy_threshold, settings=self.generation(),
                    batch_size=self.batch_size, device=self.device, dtype=self.dtype,
                    guard=self.guard, guard_kind=self.guard_kind, utility=self.utility,
                    utility_file=self.utility_file, utility_limit=self.utility_limit,
                    utility_max_tokens=self.utility_max_tokens, cache_path=self.cache,
                    label=self.label, threads=self.threads, allow_pickle=self.allow_pickle)
