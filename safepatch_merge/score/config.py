"""ScoreConfig: the options of one scoring run, declared once (default, help, choices), and
their validation. `safepatch score` and the `score:` section of a run config are derived from
it (config_fields.py). Torch-free, so `safepatch score --help` stays fast."""
from __future__ import annotations

from dataclasses import dataclass

from ..config_fields import option
from ..errors import ConfigError

LOSSES = ("response_nll", "question_nll", "prompt_nll", "magnitude")
SPLITS = ("all", "train", "heldout")
# `saliency_on` names the paper's choice of what SNIP differentiates; it sets `loss`.
SALIENCY_ON = {"responses": "response_nll", "questions": "question_nll"}
ACCUMULATIONS = ("signed", "abs_per_batch")
BUFFERS = ("device", "host")
PARALLEL = ("data", "fsdp")
SCORE_DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ScoreConfig:
    """Options of one scoring run (each field's help says what it does). Validated on
    construction: an invalid value raises ConfigError naming it.

    loss: response_nll (NLL of D_h's response tokens; the default) | question_nll (NLL of the
    user question's own tokens in the rendered chat template — no system prompt, role or turn
    markers, generation prompt; each distinct question once) | prompt_nll (NLL of every token
    of the rendered prompt: system turn, markers, question, generation prompt) | magnitude
    (|θ_X − θ|, needs the backbone). Unset, it follows saliency_on ('responses' |
    'questions', the same choice by what SNIP is computed on); contradicting it with
    prompt_nll or magnitude is an error. After construction both are set.
    split: which part of the data scores — all, or the train / heldout part of derive's split
    by prompt (same `heldout` fraction and `seed` give the same parts).
    """

    saliency_on: str | None = option(
        None, choices=tuple(SALIENCY_ON),
        help="what SNIP differentiates: the responses of D_h (default) or its questions (the "
             "paper's reading); see below")
    loss: str | None = option(
        None, choices=LOSSES, help="the loss by name (default response_nll); prompt_nll and "
                                   "magnitude are only reachable here")
    accumulation: str = option("signed", choices=ACCUMULATIONS)
    batch_size: int = option(8)
    max_length: int = option(512)
    limit: int | None = option(None, help="score on the first N pairs (after --split)")
    split: str = option("all", choices=SPLITS, help="all pairs, or derive's train/heldout "
                                                    "part (same --heldout/--seed)")
    heldout: float = option(0.1)
    seed: int = option(0)
    prompt_field: str = option("prompt")
    response_field: str = option("response")
    hf_split: str = option("train")
    system_prompt: str | None = option(None)
    chat_template: str | None = option(None)
    dtype: str = option("auto", help="load the model as auto|float32|bfloat16|float16")
    score_dtype: str = option("float32", choices=SCORE_DTYPES)
    device: str = option("auto", choices=DEVICES)
    score_buffers: str = option(
        "device", choices=BUFFERS,
        help="where the fp32 score buffers live: beside the model (default) or in host memory "
             "(a GPU then holds none; one gradient copy per batch)")
    parallel: str = option(
        "data", choices=PARALLEL,
        help="under torchrun/accelerate launch with several processes: data (each holds the "
             "model, scores its share of the batches; default) or fsdp (parameters sharded "
             "with FSDP2)")
    dist_timeout: float = option(1800.0, help="seconds a collective waits for a missing "
                                              "process (default {default})")
    exclude: str | None = option(None, help="regex of tensor names not to score (kept "
                                            "unpatched)")
    max_shard_size: str = option("2GB")

    def __post_init__(self) -> None:
        loss = self.loss
        if self.saliency_on is not None:
            if self.saliency_on not in SALIENCY_ON:
                raise ConfigError(f"saliency_on must be responses or questions, got "
                                  f"{self.saliency_on!r}")
            want = SALIENCY_ON[self.saliency_on]
            # response_nll is the default loss, so giving it does not contradict
            if loss not in (None, "response_nll", want):
                raise ConfigError(f"saliency_on {self.saliency_on} contradicts loss {loss}")
            loss = want
        loss = loss or "response_nll"
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "saliency_on",
                           {v: k for k, v in SALIENCY_ON.items()}.get(loss))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value (run on construction)."""
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.accumulation not in ACCUMULATIONS:
            raise ConfigError(f"accumulation must be signed or abs_per_batch, got "
                              f"{self.accumulation!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.score_dtype not in SCORE_DTYPES:
            raise ConfigError(f"score dtype must be one of {', '.join(SCORE_DTYPES)}")
        if self.batch_size < 1 or self.max_length < 2:
            raise ConfigError("batch_size must be >= 1 and max_length >= 2")
        if self.score_buffers not in BUFFERS:
            raise ConfigError(f"score buffers must be device or host, got {self.score_buffers!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"parallel must be data or fsdp, got {self.parallel!r}")
