"""DeriveConfig: the options of one patch derivation and their validation."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..models.loading import parse_dtype
from .behaviour import RATE_METRICS, StopRule
from .objectives import OBJECTIVES

PRECISIONS = ("fp32", "bf16-mixed", "bf16")
STOP_ON = ("train", "heldout")


@dataclass
class DeriveConfig:
    """Hyperparameters of one patch derivation. Defaults are ours, not the paper's (it
    publishes none): a short, clipped run that a step budget always ends.

    objective: 'ga' (the paper's SE patch: gradient ascent on D_h), 'npo', 'graddiff',
    'refusal_sft' (SE patches of ours, objectives.py) or 'gd' (the OSM patch).
    precision: 'fp32' (fp32 weights and math), 'bf16-mixed' (fp32 weights, bf16 autocast on
    CPU or GPU), 'bf16' (bf16 weights; least memory, coarsest updates).
    save_dtype: dtype of the written checkpoint; 'auto' = the dtype the weights were trained
    in (float32 unless precision is 'bf16'), because rounding a patch to bfloat16 erases the
    updates smaller than its resolution (~0.4% of a weight); 'bfloat16' halves the disk.
    nll_ceiling (ascent objectives) / nll_floor (descent): stop once the NLL of the training
    pairs' responses on `stop_on` reaches it (nats/token).
    input_field: a data column appended to the prompt after a newline (Alpaca's `input`).
    npo_beta: NPO's inverse temperature β (not the merge's OSM scale β).
    retain_*: graddiff's retain set (a file of benign prompt/answer pairs; Alpaca fields by
    default), its weight λ, size and batch size (default: batch_size).
    train_include / train_exclude: glob patterns over tensor names confining what trains
    (confine.py), for every objective.
    on_policy: replace the data's responses by the starting model's own greedy answers to
    its prompts (on_policy_max_new_tokens long), kept where judged compliance (ga, npo,
    graddiff); fewer than on_policy_min_pairs kept is an error.
    stop_when: behavioural stop rules, e.g. ["refusal_rate>=0.8", "perplexity>=9"]
    (behaviour.py): checked at step 0 and every calib_every steps on calib_prompts (harmful
    prompts, the first calib_limit; greedy, calib_max_new_tokens) and calib_reference (benign
    prompt/response pairs, the first calib_reference_limit, responses cut to
    calib_reference_tokens, for perplexity); the first rule
    that holds stops the run with the weights it measured (a target reached).
    guard_when: rules of the same form for damage, e.g. ["perplexity>=9",
    "non_answer_rate>=0.25"]: the first that holds stops the run and restores the weights of
    the last check where no guard held (kept in host memory: one copy of the trainable
    parameters). The calibration files are measured (every calib_every steps) whenever
    given, even without rules.
    calib_batch_size: generation batch of the calibration checks and of on_policy.
    """

    objective: str = "ga"
    learning_rate: float = 1e-5
    max_steps: int = 100
    epochs: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    nll_ceiling: float | None = None
    nll_floor: float | None = None
    stop_on: str = "train"
    heldout: float = 0.1
    eval_every: int = 10
    max_length: int = 512
    limit: int | None = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    input_field: str | None = None
    hf_split: str = "train"
    system_prompt: str | None = None
    chat_template: str | None = None
    precision: str = "fp32"
    save_dtype: str = "auto"
    seed: int = 0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target: list = field(default_factory=lambda: ["all-linear"])
    save_merged: bool = True
    gradient_checkpointing: bool = False
    device: str = "auto"
    max_shard_size: str = "5GB"
    npo_beta: float = 0.1
    retain_data: str | None = None
    retain_weight: float = 1.0
    retain_prompt_field: str = "instruction"
    retain_response_field: str = "output"
    retain_input_field: str | None = "input"
    retain_limit: int | None = None
    retain_batch_size: int | None = None
    train_include: list = field(default_factory=list)
    train_exclude: list = field(default_factory=list)
    on_policy: bool = False
    on_policy_max_new_tokens: int = 64
    on_policy_min_pairs: int = 8
    stop_when: list = field(default_factory=list)
    guard_when: list = field(default_factory=list)
    calib_prompts: str | None = None
    calib_reference: str | None = None
    calib_every: int = 10
    calib_limit: int | None = None
    calib_reference_limit: int | None = None
    calib_max_new_tokens: int = 48
    calib_reference_tokens: int = 256
    calib_batch_size: int = 16

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
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
        if self.device not in ("auto", "cpu", "cuda"):
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
            if isinstance(v, str):
                setattr(self, name, [v])
            elif not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{name} must be a list of strings, got {v!r}")
        rules = self.stop_rules() + self.guard_rules()
        if any(r.metric in RATE_METRICS for r in rules) and not self.calib_prompts:
            raise ConfigError("a rate stop rule needs calibration prompts (calib_prompts)")
        if any(r.metric == "perplexity" for r in rules) and not self.calib_reference:
            raise ConfigError("a perplexity stop rule needs benign reference answers "
                              "(calib_reference)")
        parse_dtype(self.save_dtype)  # ConfigError on an unknown name

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
