"""Derive a patch: gradient ascent (SE) or descent (OSM) on harmful responses (docs/design.md §1.2).

A plain PyTorch loop driven by 🤗 Accelerate on the collator of dataset.py, so
`accelerate launch -m safepatch_merge derive ...` runs it on several GPUs (DDP, FSDP or
DeepSpeed, chosen by the accelerate config) unchanged. Full-parameter or LoRA (PEFT).

Guards for gradient ascent, which is unbounded: gradient-norm clipping, a step budget, an NLL
ceiling (GA) or floor (GD) checked on the train batch before each update or on the held-out set
after each evaluation, and a stop on a non-finite loss (the last finite weights are kept).
The NLL curve (train every step, held-out every `eval_every` steps) is written next to the patch.

Python API: :func:`derive_patch`. CLI: `safepatch derive`.
"""
from __future__ import annotations

import csv
import json
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
from .dataset import PairCollator, data_identity, load_pairs, render_pairs, split_by_prompt
from .loss import OBJECTIVE_SIGN, per_example_nll
from .record import now_iso, versions, write_json

log = logging.getLogger("safepatch_merge.derive")

PRECISIONS = ("fp32", "bf16-mixed", "bf16")
STOP_ON = ("train", "heldout")


@dataclass
class DeriveConfig:
    """Hyperparameters of one patch derivation. Defaults are ours, not the paper's (it
    publishes none): a short, clipped run that a step budget always ends.

    objective: 'ga' (safety-enhancement patch) or 'gd' (over-safety-mitigation patch).
    precision: 'fp32' (fp32 weights and math), 'bf16-mixed' (fp32 weights, bf16 autocast on
    CPU or GPU), 'bf16' (bf16 weights; least memory, coarsest updates).
    save_dtype: dtype of the written checkpoint; 'auto' = the dtype the weights were trained
    in (float32 unless precision is 'bf16'), because rounding a patch to bfloat16 erases the
    updates smaller than its resolution (~0.4% of a weight); 'bfloat16' halves the disk.
    nll_ceiling (GA) / nll_floor (GD): stop once the NLL on `stop_on` reaches it (nats/token).
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

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        if self.objective not in OBJECTIVE_SIGN:
            raise ConfigError(f"objective must be ga or gd, got {self.objective!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.stop_on not in STOP_ON:
            raise ConfigError(f"stop_on must be train or heldout, got {self.stop_on!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not (self.max_grad_norm > 0):
            raise ConfigError("max_grad_norm must be positive: gradient ascent needs clipping")
        if self.objective == "ga" and self.nll_floor is not None:
            raise ConfigError("nll_floor applies to gd; gradient ascent stops at nll_ceiling")
        if self.objective == "gd" and self.nll_ceiling is not None:
            raise ConfigError("nll_ceiling applies to ga; gradient descent stops at nll_floor")
        if self.stop_on == "heldout" and self.heldout == 0:
            raise ConfigError("stop_on heldout needs a held-out split (heldout > 0)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        parse_dtype(self.save_dtype)  # ConfigError on an unknown name


def _crossed(nll: float, cfg: DeriveConfig) -> bool:
    if cfg.objective == "ga" and cfg.nll_ceiling is not None:
        return nll >= cfg.nll_ceiling
    if cfg.objective == "gd" and cfg.nll_floor is not None:
        return nll <= cfg.nll_floor
    return False


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


def _write_curve(out: Path, rows: list[dict], objective: str) -> None:
    cols = ["step", "train_nll", "heldout_nll", "grad_norm", "lr", "examples", "tokens"]
    with open(out / "nll_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; the CSV is the record
        return
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    tr = [(r["step"], r["train_nll"]) for r in rows if r.get("train_nll") is not None]
    he = [(r["step"], r["heldout_nll"]) for r in rows if r.get("heldout_nll") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train (batch)", lw=1)
    if he:
        ax.plot(*zip(*he), "o-", label="held-out", lw=1.5, ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response NLL (nats/token)")
    ax.set_title("gradient ascent (SE patch)" if objective == "ga" else "gradient descent (OSM patch)")
    ax.legend()
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


def derive_patch(backbone: str | Path, data: str | Path, out: str | Path,
                 config: DeriveConfig | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Train a patch from `backbone` on harmful pairs in `data`; write it to `out`.

    Writes (atomically, via OUT.partial): a Hugging Face model directory of the patched model
    (safetensors, config, generation config, tokenizer with chat template) — for LoRA the
    merged model there (unless config.save_merged is False) and the adapter in OUT/adapter
    (or at OUT itself without the merged model) — plus derive_record.json, nll_curve.csv and
    nll_curve.png. Returns the record (a dict; see derive_record.json).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cfg = config or DeriveConfig()
    cfg.validate()
    backbone = check_model_dir(Path(backbone).resolve(), "backbone")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} exists; pass --overwrite to replace it")
    tok = load_tokenizer(backbone, chat_template=cfg.chat_template)
    pairs = load_pairs(data, cfg.prompt_field, cfg.response_field, cfg.hf_split, cfg.limit)
    train_pairs, held_pairs = split_by_prompt(pairs, cfg.heldout, cfg.seed)
    train_ex, dropped_tr = render_pairs(train_pairs, tok, cfg.max_length, cfg.system_prompt)
    held_ex, dropped_he = render_pairs(held_pairs, tok, cfg.max_length, cfg.system_prompt)
    if not train_ex:
        raise DataError(f"{data}: no training example fits max_length={cfg.max_length}")
    if held_pairs and not held_ex:
        raise DataError(f"{data}: no held-out example fits max_length={cfg.max_length}")

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
    partial = _prepare_out(out, overwrite) if accelerator.is_main_process else None

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
        train_ex, batch_size=cfg.batch_size, shuffle=True, generator=gen, collate_fn=collate,
        drop_last=len(train_ex) >= cfg.batch_size)
    held_loader = torch.utils.data.DataLoader(held_ex, batch_size=cfg.batch_size, collate_fn=collate)
    model, optimizer, train_loader, held_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, held_loader, scheduler)

    sign = OBJECTIVE_SIGN[cfg.objective]
    # One row per weight state: `step` = optimizer updates applied before the measurement.
    # train_nll of row k is the NLL of update k+1's batch (measured before that update).
    curve: dict[int, dict] = {}

    def note(k: int, **kv) -> None:
        curve.setdefault(k, {"step": k}).update(kv)

    held0 = _evaluate(model, held_loader, accelerator) if held_ex else None
    note(0, heldout_nll=held0)
    step, epoch, examples, tokens, train_time, cpu_time = 0, 0, 0, 0, 0.0, 0.0
    stop_reason = None
    acc_nll, acc_n = torch.zeros((), device=accelerator.device), 0
    bar = _progress(cfg.max_steps, progress and accelerator.is_main_process, cfg.objective)
    t0, c0 = time.perf_counter(), time.process_time()
    while stop_reason is None:
        if cfg.epochs is not None and epoch >= cfg.epochs:
            stop_reason = "epochs"
            break
        epoch += 1
        for batch in train_loader:
            with accelerator.accumulate(model):
                # an error in one rank's forward reaches every rank before the backward's
                # collectives, so none waits for the rank that failed
                with collective_errors(accelerator.device):
                    with accelerator.autocast():
                        logits = model(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).logits
                    nll = per_example_nll(logits, batch["labels"]).mean()
                accelerator.backward(sign * nll)
                acc_nll += nll.detach()
                acc_n += 1
                examples += batch["input_ids"].shape[0] * accelerator.num_processes
                tokens += int(accelerator.reduce(batch["attention_mask"].sum(), "sum"))
                if not accelerator.sync_gradients:
                    continue
                step_nll = float(accelerator.reduce(acc_nll / acc_n, "mean"))
                acc_nll, acc_n = torch.zeros((), device=accelerator.device), 0
                note(step, train_nll=step_nll)
                if not math.isfinite(step_nll):
                    stop_reason = "non_finite_loss"
                elif cfg.stop_on == "train" and _crossed(step_nll, cfg):
                    stop_reason = "nll_ceiling" if cfg.objective == "ga" else "nll_floor"
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
            if held_ex and step % cfg.eval_every == 0:
                train_time += time.perf_counter() - t0
                cpu_time += time.process_time() - c0
                note(step, heldout_nll=_evaluate(model, held_loader, accelerator))
                t0, c0 = time.perf_counter(), time.process_time()
                if cfg.stop_on == "heldout" and _crossed(curve[step]["heldout_nll"], cfg):
                    stop_reason = "nll_ceiling" if cfg.objective == "ga" else "nll_floor"
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
    rows = [curve[k] for k in sorted(curve)]
    if stop_reason != "max_steps" and accelerator.is_main_process:
        log.info("derive stopped after %d steps: %s", step, stop_reason)

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model) if accelerator.num_processes > 1 else None
    sdt = train_dtype if cfg.save_dtype == "auto" else parse_dtype(cfg.save_dtype)
    record = None
    if accelerator.is_main_process:
        held_nlls = [r["heldout_nll"] for r in rows if r.get("heldout_nll") is not None]
        record = {
            "format": "safepatch-derive", "version": 1, "created": now_iso(),
            "objective": cfg.objective,
            "patch": "safety_enhancement" if cfg.objective == "ga" else "over_safety_mitigation",
            "backbone": str(backbone),
            "data": {**data_identity(data), "num_pairs": len(pairs),
                     "train_examples": len(train_ex), "heldout_examples": len(held_ex),
                     "train_prompts": len({p.prompt for p in train_pairs}),
                     "heldout_prompts": len({p.prompt for p in held_pairs}),
                     "dropped_too_long": dropped_tr + dropped_he},
            "hyperparameters": asdict(cfg),
            "kind": "lora" if cfg.lora else "full",
            "trainable_parameters": n_trainable,
            "seed": cfg.seed, "steps": step, "epochs_started": epoch, "stop_reason": stop_reason,
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
        _save_outputs(unwrapped, state, tok, backbone, partial, cfg, sdt)
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


__all__ = ["DeriveConfig", "derive_patch", "PRECISIONS", "STOP_ON"]
