"""DeriveConfig: the options of one patch derivation, declared once (default, help, choices),
and their validation. `safepatch derive` and the `derive:` section of a run config are derived
from it (config_fields.py). Torch-free, so `safepatch derive --help` stays fast."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config_fields import option
from ..errors import ConfigError
from .behaviour import METRICS, RATE_METRICS, StopRule
from .objective_table import OBJECTIVES

PRECISIONS = ("fp32", "bf16-mixed", "bf16")
STOP_ON = ("train", "heldout")
DEVICES = ("auto", "cpu", "cuda")
# The names models.loading.parse_dtype reads (case-insensitive), spelled here without torch.
SAVE_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
# argparse group titles of `safepatch derive --help`, in the order shown
GROUPS = ("data", "training", "objectives", "confinement (every objective)",
          "behavioural stop (every objective)", "LoRA")
_DATA, _TRAIN, _OBJ, _CONFINE, _STOP, _LORA = GROUPS


@dataclass(frozen=True)
class DeriveConfig:
    """Hyperparameters of one patch derivation (each field's help says what it does). Defaults
    are ours, not the paper's (it publishes none): a short, clipped run that a step budget
    always ends. Validated on construction: an invalid value raises ConfigError naming it.

    Behavioural stop (behaviour.py): `stop_when` rules are targets, checked at step 0 and every
    calib_every steps on calib_prompts (harmful prompts, the first calib_limit; greedy,
    calib_max_new_tokens) and calib_reference (benign prompt/response pairs, the first
    calib_reference_limit, responses cut to calib_reference_tokens, for perplexity); the first
    rule that holds stops the run with the weights it measured. `guard_when` rules have the
    same form and mark damage: the first that holds stops the run and restores the weights of
    the last check where no guard held (kept in host memory: one copy of the trainable
    parameters). The calibration files are measured whenever given, even without rules.
    """

    objective: str = option(
        "ga", required=True, choices=tuple(OBJECTIVES),
        help="SE: ga (the paper's gradient ascent), npo, graddiff, refusal_sft; "
             "OSM: gd (gradient descent)")
    # data
    prompt_field: str = option("prompt", group=_DATA)
    response_field: str = option("response", group=_DATA)
    input_field: str | None = option(
        None, group=_DATA, help="a column appended to the prompt after a newline when "
                                "non-empty (Alpaca's input)")
    hf_split: str = option("train", group=_DATA, help="split of a dataset name")
    limit: int | None = option(None, group=_DATA, help="use the first N pairs")
    heldout: float = option(0.1, group=_DATA, help="fraction of distinct prompts held out "
                                                   "(default {default}; 0 = none)")
    max_length: int = option(512, group=_DATA, help="tokens per example (default {default})")
    system_prompt: str | None = option(None, group=_DATA,
                                       help="system message before every prompt")
    chat_template: str | None = option(
        None, group=_DATA, help="Jinja chat template (file or string) if the tokenizer has "
                                "none or another is wanted")
    # training
    learning_rate: float = option(1e-5, group=_TRAIN, flag="--lr",
                                  help="learning rate (default {default})")
    max_steps: int = option(100, group=_TRAIN, help="step budget (default {default})")
    epochs: int | None = option(None, group=_TRAIN,
                                help="stop after this many passes over the data")
    batch_size: int = option(4, group=_TRAIN, help="per device (default {default})")
    grad_accum: int = option(1, group=_TRAIN)
    max_grad_norm: float = option(1.0, group=_TRAIN, help="clip (default {default})")
    weight_decay: float = option(0.0, group=_TRAIN)
    lr_scheduler: str = option("constant", group=_TRAIN,
                               help="transformers scheduler name: constant, linear, cosine, ...")
    warmup_steps: int = option(0, group=_TRAIN)
    nll_ceiling: float | None = option(
        None, group=_TRAIN, help="ga/npo/graddiff: stop when the training pairs' NLL "
                                 "(nats/token) reaches this")
    nll_floor: float | None = option(None, group=_TRAIN,
                                     help="gd/refusal_sft: stop when the NLL falls to this")
    stop_on: str = option("train", group=_TRAIN, choices=STOP_ON,
                          help="which NLL the ceiling/floor watches (default: the train batch)")
    eval_every: int = option(10, group=_TRAIN, help="held-out NLL every N steps")
    precision: str = option(
        "fp32", group=_TRAIN, choices=PRECISIONS,
        help="fp32 (default) | bf16-mixed (fp32 weights, bf16 autocast, CPU too) | "
             "bf16 (bf16 weights)")
    save_dtype: str = option(
        "auto", group=_TRAIN,
        help="dtype of the written weights (default auto: the training dtype, float32 unless "
             "--precision bf16; bfloat16 rounds small updates away)")
    seed: int = option(0, group=_TRAIN)
    gradient_checkpointing: bool = option(False, group=_TRAIN)
    device: str = option("auto", group=_TRAIN, choices=DEVICES)
    max_shard_size: str = option("5GB", group=_TRAIN)
    # objectives
    npo_beta: float = option(0.1, group=_OBJ, help="npo: inverse temperature β of NPO "
                                                   "(default {default}; not the merge's β)")
    retain_data: str | None = option(
        None, group=_OBJ, help="graddiff: retain set file (benign prompt/answer pairs)")
    retain_weight: float = option(1.0, group=_OBJ, help="graddiff: λ (default {default})")
    retain_prompt_field: str = option("instruction", group=_OBJ)
    retain_response_field: str = option("output", group=_OBJ)
    retain_input_field: str | None = option(
        "input", group=_OBJ, help="appended to the retain prompt when non-empty "
                                  "(default: input)")
    retain_limit: int | None = option(None, group=_OBJ, help="use the first N retain pairs")
    retain_batch_size: int | None = option(None, group=_OBJ, help="default: --batch-size")
    on_policy: bool = option(
        False, group=_OBJ,
        help="ga/npo/graddiff: train on the backbone's own greedy answers to the data's "
             "prompts, kept where judged compliance (responses in --data are not needed)")
    on_policy_max_new_tokens: int = option(64, group=_OBJ)
    on_policy_min_pairs: int = option(
        8, group=_OBJ, help="fewer compliant answers than this is an error (default {default})")
    # confinement (confine.py)
    train_include: list[str] = option(
        [], group=_CONFINE, metavar="GLOB",
        help="train only parameters whose tensor name matches one of these")
    train_exclude: list[str] = option(
        [], group=_CONFINE, metavar="GLOB",
        help="freeze parameters matching any of these, e.g. 'model.embed_tokens.*' "
             "'lm_head.*' '*norm*' (frozen tensors are saved byte-identical)")
    # behavioural stop (behaviour.py)
    stop_when: list[str] = option(
        [], group=_STOP, metavar="RULE",
        help=f"targets: METRIC>=X or METRIC<=X, METRIC in {', '.join(METRICS)}; the first "
             "rule that holds at a calibration check stops the run with the weights it "
             "measured")
    guard_when: list[str] = option(
        [], group=_STOP, metavar="RULE",
        help="guards, same form (e.g. 'perplexity>=9'): the first that holds stops the run "
             "and restores the weights of the last check where none held")
    calib_prompts: str | None = option(
        None, group=_STOP, help="harmful calibration prompts (JSONL/JSON/CSV), answered "
                                "greedily at every check")
    calib_reference: str | None = option(
        None, group=_STOP, help="benign prompt/response pairs (JSONL) whose perplexity is "
                                "measured at every check")
    calib_every: int = option(10, group=_STOP, help="check every N steps (default {default})")
    calib_limit: int | None = option(None, group=_STOP, help="first N calibration prompts")
    calib_reference_limit: int | None = option(None, group=_STOP,
                                               help="first N reference pairs")
    calib_max_new_tokens: int = option(48, group=_STOP)
    calib_reference_tokens: int = option(
        256, group=_STOP, help="response tokens per reference answer (default {default})")
    calib_batch_size: int = option(
        16, group=_STOP, help="generation batch of the calibration checks and of --on-policy")
    # LoRA
    lora: bool = option(False, group=_LORA, help="train a LoRA adapter (PEFT)")
    lora_r: int = option(16, group=_LORA)
    lora_alpha: float = option(32.0, group=_LORA)
    lora_dropout: float = option(0.0, group=_LORA)
    lora_target: list[str] = option(
        ["all-linear"], group=_LORA,
        help="module names (default {default}: every linear layer but the head)")
    save_merged: bool = option(
        True, group=_LORA, flag="--no-merged",
        help="write only the adapter (scoring then merges it in memory)")

    def __post_init__(self) -> None:
        # a single string where a list of strings belongs is that one string
        for name in ("train_include", "train_exclude", "stop_when", "guard_when",
                     "lora_target"):
            v = getattr(self, name)
            if isinstance(v, str):
                object.__setattr__(self, name, [v])
            elif isinstance(v, tuple):
                object.__setattr__(self, name, list(v))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value (run on construction)."""
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got "
                              f"{self.objective!r}")
        obj = OBJECTIVES[self.objective]
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.stop_on not in STOP_ON:
            raise ConfigError(f"stop_on must be train or heldout, got {self.stop_on!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "max_length",
                     "calib_every", "calib_max_new_tokens", "calib_reference_tokens",
                     "calib_batch_size",
                     "on_policy_max_new_tokens", "on_policy_min_pairs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name} must be an integer, got {v!r}")
            if v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        for name in ("epochs", "limit", "retain_limit", "retain_batch_size", "calib_limit",
                     "calib_reference_limit"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be >= 1 (an integer) or unset, got {v!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not (self.max_grad_norm > 0):
            raise ConfigError("max_grad_norm must be positive: gradient ascent needs clipping")
        if obj.ascent and self.nll_floor is not None:
            raise ConfigError(f"nll_floor applies to descent objectives; {self.objective} "
                              "stops at nll_ceiling")
        if not obj.ascent and self.nll_ceiling is not None:
            raise ConfigError(f"nll_ceiling applies to ascent objectives; {self.objective} "
                              "stops at nll_floor")
        if self.stop_on == "heldout" and self.heldout == 0:
            raise ConfigError("stop_on heldout needs a held-out split (heldout > 0)")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not (isinstance(self.npo_beta, (int, float)) and self.npo_beta > 0
                and math.isfinite(self.npo_beta)):
            raise ConfigError(f"npo_beta must be positive, got {self.npo_beta!r}")
        if obj.needs_retain and not self.retain_data:
            raise ConfigError("objective graddiff needs a retain set: pass --retain-data FILE "
                              "(benign prompts with answers, e.g. an Alpaca JSON)")
        if self.retain_data and not obj.needs_retain:
            raise ConfigError(f"retain_data is only used by graddiff, not {self.objective}")
        if not (isinstance(self.retain_weight, (int, float)) and self.retain_weight >= 0
                and math.isfinite(self.retain_weight)):
            raise ConfigError(f"retain_weight must be >= 0, got {self.retain_weight!r}")
        if self.on_policy and self.objective not in ("ga", "npo", "graddiff"):
            raise ConfigError(f"on_policy applies to ga, npo and graddiff, not {self.objective}")
        for name in ("train_include", "train_exclude", "stop_when", "guard_when", "lora_target"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{name} must be a list of strings, got {v!r}")
        rules = self.stop_rules() + self.guard_rules()
        if any(r.metric in RATE_METRICS for r in rules) and not self.calib_prompts:
            raise ConfigError("a rate stop rule needs calibration prompts (calib_prompts)")
        if any(r.metric == "perplexity" for r in rules) and not self.calib_reference:
            raise ConfigError("a perplexity stop rule needs benign reference answers "
                              "(calib_reference)")
        if not isinstance(self.save_dtype, str) or self.save_dtype.lower() not in SAVE_DTYPES:
            raise ConfigError(f"unknown dtype {self.save_dtype!r}; choose auto, float32, "
                              "bfloat16 or float16")

    def stop_rules(self) -> list[StopRule]:
        """The parsed behavioural stop rules (targets: the run ends with the weights that
        reached one)."""
        return [StopRule.parse(r) for r in self.stop_when]

    def guard_rules(self) -> list[StopRule]:
        """The parsed guard rules (damage: the run ends with the last weights before one
        held)."""
        return [StopRule.parse(r) for r in self.guard_when]


def crossed(nll: float, cfg: DeriveConfig) -> bool:
    """Whether the training pairs' NLL has reached the objective's ceiling (ascent) or floor."""
    if OBJECTIVES[cfg.objective].ascent:
        return cfg.nll_ceiling is not None and nll >= cfg.nll_ceiling
    return cfg.nll_floor is not None and nll <= cfg.nll_floor
