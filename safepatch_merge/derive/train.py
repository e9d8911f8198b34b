"""Derive a patch (DESIGN §1): an SE objective (`ga`, the paper's gradient ascent; `npo`;
`graddiff`; `refusal_sft`) or the OSM patch's gradient descent (`gd`) — objectives.py.

A plain PyTorch loop driven by 🤗 Accelerate on the collator of dataset.py, so
`accelerate launch -m safepatch_merge derive ...` runs it on several GPUs (DDP, FSDP or
DeepSpeed, chosen by the accelerate config) unchanged. Full-parameter or LoRA (PEFT); either
can be confined to some parameters (confine.py).

Guards for the ascent objectives, which are unbounded: gradient-norm clipping, a step budget,
an NLL ceiling (ascent) or floor (descent) checked on the train batch before each update or on
the held-out set after each evaluation, a behavioural stop (a metric of greedy completions of
calibration prompts, or the perplexity of benign reference answers, crossing a target,
behaviour.py), and a stop on a non-finite loss (the last finite weights are kept).
The curve (train NLL every step, held-out NLL every `eval_every` steps, calibration metrics
every `calib_every` steps) is written next to the patch.

Python API: :func:`derive_patch`. CLI: `safepatch derive`.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..dist import collective_errors
from ..errors import ConfigError, DataError
from ..models.loading import (check_model_dir, load_causal_lm, load_tokenizer, merge_adapter,
                              parse_dtype)
from .behaviour import METRICS, RATE_METRICS, StopRule, append_probe_log
from .confine import confine
from .dataset import (Pair, PairCollator, data_identity, load_pairs, render_pairs,
                      split_by_prompt)
from .loss import per_example_nll, sequence_logprob
from .objectives import OBJECTIVES, SE_OBJECTIVES, batch_loss
from .record import now_iso, versions, write_json

log = logging.getLogger("safepatch_merge.derive")

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
    that holds stops the run with the weights it measured. The calibration files are
    measured (every calib_every steps) whenever given, even without rules.
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
        for name in ("train_include", "train_exclude", "stop_when", "lora_target"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [v])
            elif not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{name} must be a list of strings, got {v!r}")
        rules = self.stop_rules()
        if any(r.metric in RATE_METRICS for r in rules) and not self.calib_prompts:
            raise ConfigError("a rate stop rule needs calibration prompts (calib_prompts)")
        if any(r.metric == "perplexity" for r in rules) and not self.calib_reference:
            raise ConfigError("a perplexity stop rule needs benign reference answers "
                              "(calib_reference)")
        parse_dtype(self.save_dtype)  # ConfigError on an unknown name

    def stop_rules(self) -> list[StopRule]:
        """The parsed behavioural stop rules."""
        return [StopRule.parse(r) for r in self.stop_when]


def _crossed(nll: float, cfg: DeriveConfig) -> bool:
    if OBJECTIVES[cfg.objective].ascent:
        return cfg.nll_ceiling is not None and nll >= cfg.nll_ceiling
    return cfg.nll_floor is not None and nll <= cfg.nll_floor


def _evaluate(model, loader, accelerator) -> float:
    """Mean over the loader's examples of per-example mean response NLL (all processes)."""
    model.eval()
    parts = []
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast():
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
            parts.append(accelerator.gather_for_metrics(per_example_nll(logits, batch["labels"])))
    model.train()
    return float(torch.cat(parts).double().mean()) if parts else float("nan")


CURVE_COLS = ["step", "train_nll", "train_loss", "retain_nll", "heldout_nll", "grad_norm", "lr",
              "examples", "tokens"] + [f"calib_{m}" for m in METRICS]


def _write_curve(out: Path, rows: list[dict], objective: str) -> None:
    with open(out / "nll_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_COLS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CURVE_COLS})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; the CSV is the record
        return
    calib = [m for m in METRICS if any(r.get(f"calib_{m}") is not None for r in rows)]
    fig, axes = plt.subplots(1, 2 if calib else 1, figsize=(9.5 if calib else 5, 3.2), dpi=100,
                             squeeze=False)
    ax = axes[0][0]
    for col, label, style in (("train_nll", "train (batch)", "-"), ("heldout_nll", "held-out", "o-"),
                              ("retain_nll", "retain (batch)", "--")):
        pts = [(r["step"], r[col]) for r in rows if r.get(col) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label, lw=1, ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response NLL (nats/token)")
    ax.set_title(OBJECTIVES[objective].title)
    if ax.get_lines():
        ax.legend()
    if calib:
        ax2 = axes[0][1]
        rates = [m for m in calib if m != "perplexity"]
        for m in rates:
            pts = [(r["step"], r[f"calib_{m}"]) for r in rows if r.get(f"calib_{m}") is not None]
            ax2.plot(*zip(*pts), "o-", label=m, lw=1, ms=3)
        if rates:
            ax2.set_ylabel("share of calibration prompts")
            ax2.legend(fontsize=7)
        if "perplexity" in calib:
            tw = ax2.twinx() if rates else ax2
            pts = [(r["step"], r["calib_perplexity"]) for r in rows
                   if r.get("calib_perplexity") is not None]
            tw.plot(*zip(*pts), "k:", lw=1)
            tw.set_ylabel("reference perplexity (dotted)")
        ax2.set_xlabel("optimizer step")
        ax2.set_title("calibration")
    fig.tight_layout()
    fig.savefig(out / "nll_curve.png")
    plt.close(fig)


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} exists; pass --overwrite to replace it")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def _finish_out(partial: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)


class _IndexedCollator:
    """PairCollator over (index, example) items, adding `index` (B,) int64: each example's
    position in the training set (NPO looks its reference log-likelihood up by it)."""

    def __init__(self, inner: PairCollator):
        self.inner = inner

    def __call__(self, items: list) -> dict:
        batch = self.inner([e for _, e in items])
        batch["index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
        return batch


def _cycle(loader):
    while True:
        yield from loader


def _training_pairs(data, cfg: DeriveConfig, backbone: Path, on_policy_dir: Path,
                    accelerator, progress: bool) -> tuple[list[Pair], dict | None]:
    """The pairs to train on: the data file's, or (on_policy) the starting model's own
    compliant answers to its prompts, generated by the main process into on_policy_dir."""
    if not cfg.on_policy:
        return load_pairs(data, cfg.prompt_field, cfg.response_field, cfg.hf_split, cfg.limit,
                          input_field=cfg.input_field), None
    from ..eval.suites import Prompt
    from .on_policy import PAIRS_FILE, generate_compliant_pairs

    rows = load_pairs(data, cfg.prompt_field, cfg.response_field, cfg.hf_split, cfg.limit,
                      input_field=cfg.input_field, require_response=False)
    prompts = [Prompt("data", f"row{i}", t, True) for i, t in
               enumerate(dict.fromkeys(r.prompt for r in rows))]
    report = None
    if accelerator.is_main_process:
        report = generate_compliant_pairs(
            backbone, prompts, on_policy_dir, max_new_tokens=cfg.on_policy_max_new_tokens,
            batch_size=cfg.calib_batch_size, device=str(accelerator.device),
            system_prompt=cfg.system_prompt, min_pairs=cfg.on_policy_min_pairs,
            progress=progress, what="answers to the data's prompts")
    accelerator.wait_for_everyone()
    return load_pairs(on_policy_dir / PAIRS_FILE), report


def _reference_logprobs(model, examples: list, collate, batch_size: int, accelerator
                        ) -> torch.Tensor:
    """(N,) float32 sequence log-likelihoods of `examples` under `model` as it is now (the
    frozen reference of NPO), in the examples' order, on the accelerator's device."""
    was = model.training
    model.eval()
    parts = []
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            b = {k: v.to(accelerator.device) for k, v in collate(examples[s:s + batch_size]).items()}
            with accelerator.autocast():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            parts.append(sequence_logprob(logits, b["labels"]))
    model.train(was)
    return torch.cat(parts).float()


def _probe(cfg: DeriveConfig, tok):
    """The behaviour probe of cfg's calibration files, or None when none is given."""
    if not (cfg.calib_prompts or cfg.calib_reference):
        return None
    from ..eval.utility import load_reference
    from .behaviour import BehaviourProbe, load_calibration_prompts

    prompts = load_calibration_prompts(cfg.calib_prompts, cfg.calib_limit) \
        if cfg.calib_prompts else None
    reference = load_reference(cfg.calib_reference, cfg.calib_reference_limit) \
        if cfg.calib_reference else None
    return BehaviourProbe(tok, prompts, reference, cfg.calib_max_new_tokens,
                          cfg.calib_batch_size, cfg.system_prompt, cfg.calib_reference_tokens)


def derive_patch(backbone: str | Path, data: str | Path, out: str | Path,
                 config: DeriveConfig | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Train a patch from `backbone` on the pairs in `data` (harmful pairs; refusal pairs for
    refusal_sft; with on_policy only its prompts are read); write it to `out`.

    Writes (atomically, via OUT.partial): a Hugging Face model directory of the patched model
    (safetensors, config, generation config, tokenizer with chat template) — for LoRA the
    merged model there (unless config.save_merged is False) and the adapter in OUT/adapter
    (or at OUT itself without the merged model) — plus derive_record.json, nll_curve.csv,
    nll_curve.png, and when used OUT/on_policy/ (generated pairs, their report and
    generations) and calibration.jsonl (every behaviour probe with its completions).
    Returns the record (a dict; see derive_record.json).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = config or DeriveConfig()
    cfg.validate()
    backbone = check_model_dir(Path(backbone).resolve(), "backbone")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} exists; pass --overwrite to replace it")
    for what, path in (("retain data", cfg.retain_data), ("calibration prompts", cfg.calib_prompts),
                       ("calibration reference", cfg.calib_reference)):
        if path and not Path(path).is_file():
            raise DataError(f"{what} file not found: {path}")
    tok = load_tokenizer(backbone, chat_template=cfg.chat_template)
    probe = _probe(cfg, tok)

    # AcceleratorState is a process-wide singleton that refuses a second mixed-precision or
    # device setting, so a second derive in one process (SE then OSM, other precision) would
    # fail; reset it (the process group, PartialState, is kept).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision="bf16" if cfg.precision == "bf16-mixed" else "no",
        gradient_accumulation_steps=cfg.grad_accum, cpu=cfg.device == "cpu")
    if cfg.device == "cuda" and accelerator.device.type != "cuda":
        raise ConfigError("device cuda requested but no CUDA device is available")
    set_seed(cfg.seed)
    partial = out.with_name(out.name + ".partial")
    if accelerator.is_main_process:
        _prepare_out(out, overwrite)
    accelerator.wait_for_everyone()

    try:
        return _derive(cfg, backbone, data, out, partial, tok, probe, accelerator, progress)
    except BaseException:
        if accelerator.is_main_process:  # nothing half-written survives a failed run
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _derive(cfg: DeriveConfig, backbone: Path, data, out: Path, partial: Path, tok, probe,
            accelerator, progress: bool) -> dict | None:
    """derive_patch after set-up: data, model, training loop, outputs (see derive_patch)."""
    from transformers import get_scheduler

    objective = OBJECTIVES[cfg.objective]
    rules = cfg.stop_rules()
    pairs, on_policy_report = _training_pairs(data, cfg, backbone, partial / "on_policy",
                                              accelerator, progress)
    train_pairs, held_pairs = split_by_prompt(pairs, cfg.heldout, cfg.seed)
    train_ex, dropped_tr = render_pairs(train_pairs, tok, cfg.max_length, cfg.system_prompt)
    held_ex, dropped_he = render_pairs(held_pairs, tok, cfg.max_length, cfg.system_prompt)
    if not train_ex:
        raise DataError(f"{data}: no training example fits max_length={cfg.max_length}")
    if held_pairs and not held_ex:
        raise DataError(f"{data}: no held-out example fits max_length={cfg.max_length}")
    retain_ex, retain_info = [], None
    if objective.needs_retain:
        retain_pairs = load_pairs(cfg.retain_data, cfg.retain_prompt_field,
                                  cfg.retain_response_field, limit=cfg.retain_limit,
                                  input_field=cfg.retain_input_field,
                                  field_hint="set --retain-prompt-field/--retain-response-field")
        retain_ex, dropped_re = render_pairs(retain_pairs, tok, cfg.max_length, cfg.system_prompt)
        if not retain_ex:
            raise DataError(f"{cfg.retain_data}: no retain example fits max_length="
                            f"{cfg.max_length}")
        retain_info = {**data_identity(cfg.retain_data), "examples": len(retain_ex),
                       "dropped_too_long": dropped_re}

    train_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model = load_causal_lm(backbone, train_dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        target = cfg.lora_target[0] if list(cfg.lora_target) == ["all-linear"] else list(cfg.lora_target)
        try:
            model = get_peft_model(model, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=target, task_type="CAUSAL_LM"))
        except ValueError as e:
            raise ConfigError(f"LoRA target modules {cfg.lora_target} do not fit {backbone}: "
                              f"{' '.join(str(e).split())[:200]}") from e
    confinement = confine(model, cfg.train_include, cfg.train_exclude) \
        if (cfg.train_include or cfg.train_exclude) else None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.max_steps)
    collate = PairCollator(tok.pad_token_id, "response")
    gen = torch.Generator().manual_seed(cfg.seed)
    # Equal micro-batches make the mean of batch means the mean over the step's examples.
    train_loader = torch.utils.data.DataLoader(
        list(enumerate(train_ex)), batch_size=cfg.batch_size, shuffle=True, generator=gen,
        collate_fn=_IndexedCollator(collate), drop_last=len(train_ex) >= cfg.batch_size)
    held_loader = torch.utils.data.DataLoader(held_ex, batch_size=cfg.batch_size, collate_fn=collate)
    loaders = [train_loader, held_loader]
    if retain_ex:
        rbs = cfg.retain_batch_size or cfg.batch_size
        loaders.append(torch.utils.data.DataLoader(
            retain_ex, batch_size=rbs, shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed + 1), collate_fn=collate,
            drop_last=len(retain_ex) >= rbs))
    model, optimizer, *loaders, scheduler = accelerator.prepare(model, optimizer, *loaders,
                                                                scheduler)
    train_loader, held_loader = loaders[0], loaders[1]
    retain_iter = _cycle(loaders[2]) if retain_ex else None
    unwrapped_model = accelerator.unwrap_model(model)
    ref_logp = _reference_logprobs(unwrapped_model, train_ex, collate, cfg.batch_size,
                                   accelerator) if objective.needs_reference else None

    # One row per weight state: `step` = optimizer updates applied before the measurement.
    # train_nll of row k is the NLL of update k+1's batch (measured before that update).
    curve: dict[int, dict] = {}

    def note(k: int, **kv) -> None:
        curve.setdefault(k, {"step": k}).update(kv)

    probes: list[dict] = []

    def run_probe(k: int) -> StopRule | None:
        values, recs = probe.measure(unwrapped_model)
        note(k, **{f"calib_{m}": values[m] for m in METRICS if m in values})
        probes.append({"step": k, **values})
        if accelerator.is_main_process:
            append_probe_log(partial / "calibration.jsonl", k, values, recs)
        return next((r for r in rules if r.holds(values)), None)

    held0 = _evaluate(model, held_loader, accelerator) if held_ex else None
    note(0, heldout_nll=held0)
    step, epoch, examples, tokens, train_time, cpu_time = 0, 0, 0, 0, 0.0, 0.0
    stop_reason, stopped_by = None, None
    if probe is not None:
        stopped_by = run_probe(0)
        if stopped_by is not None:
            stop_reason = "behaviour"
    zero = lambda: torch.zeros((), device=accelerator.device)  # noqa: E731
    acc = {"nll": zero(), "loss": zero(), "retain_nll": zero()}
    acc_n = 0
    bar = _progress(cfg.max_steps, progress and accelerator.is_main_process, cfg.objective)
    t0, c0 = time.perf_counter(), time.process_time()
    while stop_reason is None:
        if cfg.epochs is not None and epoch >= cfg.epochs:
            stop_reason = "epochs"
            break
        epoch += 1
        for batch in train_loader:
            with accelerator.accumulate(model):
                rb = next(retain_iter) if retain_iter is not None else None
                # an error in one rank's forward reaches every rank before the backward's
                # collectives, so none waits for the rank that failed
                with collective_errors(accelerator.device):
                    sl = batch_loss(objective, model, batch, accelerator.autocast,
                                    ref_logp=ref_logp, npo_beta=cfg.npo_beta, retain_batch=rb,
                                    retain_weight=cfg.retain_weight)
                accelerator.backward(sl.loss)
                acc["nll"] += sl.nll
                acc["loss"] += sl.loss.detach()
                if "retain_nll" in sl.extra:
                    acc["retain_nll"] += sl.extra["retain_nll"]
                acc_n += 1
                examples += batch["input_ids"].shape[0] * accelerator.num_processes
                n_tok = batch["attention_mask"].sum() + (rb["attention_mask"].sum() if rb else 0)
                tokens += int(accelerator.reduce(n_tok, "sum"))
                if not accelerator.sync_gradients:
                    continue
                means = {k: float(accelerator.reduce(v / acc_n, "mean")) for k, v in acc.items()}
                acc, acc_n = {k: zero() for k in acc}, 0
                step_nll = means["nll"]
                note(step, train_nll=step_nll, train_loss=means["loss"],
                     retain_nll=means["retain_nll"] if retain_iter is not None else None)
                if not (math.isfinite(step_nll) and math.isfinite(means["loss"])):
                    stop_reason = "non_finite_loss"
                elif cfg.stop_on == "train" and _crossed(step_nll, cfg):
                    stop_reason = "nll_ceiling" if objective.ascent else "nll_floor"
                if stop_reason is not None:  # the weights that reached the limit are kept
                    optimizer.zero_grad(set_to_none=True)
                    break
                # the prepared model's parameters: FSDP clips through its own wrapper; under
                # DeepSpeed clipping is the engine's (set gradient_clipping in its config) and
                # no norm comes back
                gn = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                grad_norm = float(gn) if gn is not None else None
                note(step, grad_norm=grad_norm, lr=scheduler.get_last_lr()[0])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            note(step, examples=examples, tokens=tokens)
            paused = (held_ex and step % cfg.eval_every == 0) or \
                (probe is not None and step % cfg.calib_every == 0)
            if paused:  # evaluation time is not training time
                train_time += time.perf_counter() - t0
                cpu_time += time.process_time() - c0
            if held_ex and step % cfg.eval_every == 0:
                note(step, heldout_nll=_evaluate(model, held_loader, accelerator))
                if cfg.stop_on == "heldout" and _crossed(curve[step]["heldout_nll"], cfg):
                    stop_reason = "nll_ceiling" if objective.ascent else "nll_floor"
            if probe is not None and step % cfg.calib_every == 0:
                stopped_by = run_probe(step)
                if stopped_by is not None and stop_reason is None:
                    stop_reason = "behaviour"
            if paused:
                t0, c0 = time.perf_counter(), time.process_time()
            bar.update(1)
            bar.set_postfix(nll=f"{step_nll:.3f}")
            if stop_reason is None and step >= cfg.max_steps:
                stop_reason = "max_steps"
            if stop_reason is not None:
                break
    train_time += time.perf_counter() - t0
    cpu_time += time.process_time() - c0
    bar.close()
    if held_ex and curve.get(step, {}).get("heldout_nll") is None:
        note(step, heldout_nll=_evaluate(model, held_loader, accelerator))
    if probe is not None and (not probes or probes[-1]["step"] != step):
        run_probe(step)  # the final weights' behaviour, for the record (the run has ended)
    rows = [curve[k] for k in sorted(curve)]
    if stop_reason != "max_steps" and accelerator.is_main_process:
        log.info("derive stopped after %d steps: %s%s", step, stop_reason,
                 f" ({stopped_by})" if stopped_by else "")

    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model) if accelerator.num_processes > 1 else None
    sdt = train_dtype if cfg.save_dtype == "auto" else parse_dtype(cfg.save_dtype)
    record = None
    if accelerator.is_main_process:
        held_nlls = [r["heldout_nll"] for r in rows if r.get("heldout_nll") is not None]
        record = {
            "format": "safepatch-derive", "version": 1, "created": now_iso(),
            "objective": cfg.objective,
            "patch": objective.patch,
            "backbone": str(backbone),
            "data": {**data_identity(data), "num_pairs": len(pairs),
                     "train_examples": len(train_ex), "heldout_examples": len(held_ex),
                     "train_prompts": len({p.prompt for p in train_pairs}),
                     "heldout_prompts": len({p.prompt for p in held_pairs}),
                     "dropped_too_long": dropped_tr + dropped_he,
                     "on_policy": on_policy_report},
            "retain": retain_info,
            "hyperparameters": asdict(cfg),
            "kind": "lora" if cfg.lora else "full",
            "trainable_parameters": n_trainable,
            "confinement": confinement,
            "seed": cfg.seed, "steps": step, "epochs_started": epoch, "stop_reason": stop_reason,
            "stop_rule": str(stopped_by) if stopped_by else None,
            "calibration": {"rules": [str(r) for r in rules], "probes": probes,
                            "prompts": data_identity(cfg.calib_prompts) if cfg.calib_prompts
                            else None,
                            "reference": data_identity(cfg.calib_reference)
                            if cfg.calib_reference else None} if probe is not None else None,
            "initial_heldout_nll": held0, "final_heldout_nll": held_nlls[-1] if held_nlls else None,
            "final_train_nll": next((r["train_nll"] for r in reversed(rows)
                                     if r.get("train_nll") is not None), None),
            "throughput": {"tokens": tokens, "examples": examples, "seconds": train_time,
                           "tokens_per_s": tokens / train_time if train_time > 0 else None,
                           # this process's CPU seconds: steadier than wall time on a shared host
                           "cpu_seconds": cpu_time,
                           "threads": torch.get_num_threads(),
                           "device": str(accelerator.device),
                           "num_processes": accelerator.num_processes,
                           "mixed_precision": accelerator.mixed_precision,
                           "train_dtype": str(train_dtype).replace("torch.", "")},
            "save_dtype": str(sdt).replace("torch.", ""),
            "versions": versions(),
        }
        _save_outputs(unwrapped_model, state, tok, backbone, partial, cfg, sdt)
        record["outputs"] = sorted(str(p.relative_to(partial)) for p in partial.rglob("*")
                                   if p.is_file())
        _write_curve(partial, rows, cfg.objective)
        write_json(partial / "derive_record.json", record)
        _finish_out(partial, out)
    accelerator.wait_for_everyone()
    return record


def _save_outputs(unwrapped, state, tok, backbone: Path, partial: Path, cfg: DeriveConfig,
                  sdt: torch.dtype) -> None:
    if not cfg.lora:
        if state is None:
            unwrapped.to(sdt)
        else:
            state = {k: v.to(sdt) for k, v in state.items()}
        unwrapped.config.use_cache = True
        unwrapped.save_pretrained(partial, state_dict=state, safe_serialization=True,
                                  max_shard_size=cfg.max_shard_size)
        tok.save_pretrained(partial)
        return
    adapter_dir = partial / "adapter" if cfg.save_merged else partial
    unwrapped.save_pretrained(adapter_dir, state_dict=state, safe_serialization=True)
    tok.save_pretrained(adapter_dir)
    if cfg.save_merged:
        # Merge on a fresh fp32 copy of the backbone: W + B·A·scale in fp32, cast once.
        merged = merge_adapter(load_causal_lm(backbone, torch.float32), adapter_dir).to(sdt)
        merged.config.use_cache = True
        merged.save_pretrained(partial, safe_serialization=True, max_shard_size=cfg.max_shard_size)
        tok.save_pretrained(partial)


def _progress(total: int, enabled: bool, objective: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=f"derive {objective}", unit="step")


__all__ = ["DeriveConfig", "derive_patch", "PRECISIONS", "STOP_ON", "OBJECTIVES", "SE_OBJECTIVES"]
