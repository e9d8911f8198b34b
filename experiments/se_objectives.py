#!/usr/bin/env python
"""SE patches alone: which safety-enhancement objective makes the safety-tuned SmolLM2 refuse
harmful prompts without breaking it?

One command, resumable stages, everything cached under --out (a finished stage is skipped on a
rerun when its inputs match):

1. data: the pattern experiment's safety-tuning mix, D_h and prompt files (same builders and
   seeds as its `gpu` preset), plus the data of the new objectives: refusal pairs
   (safety_refusals.json rows not in the tuning mix whose answer the refusal judge calls a
   refusal), a retain set (alpaca_en_demo.json), both deduplicated against every evaluation
   and calibration prompt set; the benign reference answers split into a calibration part
   (the behavioural stop's perplexity) and a reported part;
2. backbone: the pattern experiment's run-2 backbone recipe (5 steps of safety tuning of the
   shipped SmolLM2-135M-Instruct, batch 32, lr 5e-5), and its behaviour on the calibration
   prompts, which sets the stop rules;
3. patches: one SE patch per objective (`derive_patch`), each with the same behavioural stop;
4. eval: backbone and every patch alone on the same held-out prompts (XSTest safe, HarmBench
   test, StrongREJECT; deduplicated against every training and calibration file) plus the
   perplexity of the reported reference answers;
5. export: completions.jsonl.gz (every completion, for re-judging) and meta.json (perplexities,
   patch records), then the table via se_objectives_table.py.

Usage and results: experiments/README.md and experiments/results/se_objectives/.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_logging import copy_log, setup_logging  # noqa: E402

from pattern_data import _alpaca_rows, _write_jsonl, build_dh, build_prompt_files, build_sft_mix  # noqa: E402
from pattern_presets import get_preset  # noqa: E402

log = logging.getLogger("se_objectives")
FREEZE = ["model.embed_tokens.*", "lm_head.*", "*norm*"]


@dataclass
class Sizes:
    """Sizes of one run. `full` is the reported run; `smoke` checks the wiring in minutes."""

    eval_xstest: int = 100          # XSTest safe prompts reported (of the 200 not held out)
    eval_harmful: int = 50          # HarmBench test prompts reported, and as many StrongREJECT
    max_new_tokens: int = 64
    eval_batch: int = 16
    report_reference: int = 50      # reference answers whose perplexity is reported (first N)
    calib_reference: int = 20       # the stop's perplexity (the last N of the file)
    reference_tokens: int = 128     # response tokens per reference answer
    calib_prompts: int = 24         # harmful calibration prompts answered at every check
    calib_max_new_tokens: int = 32
    calib_every: int = 5
    refusal_pairs: int = 320        # refusal_sft data (the size of D_h)
    retain_pairs: int = 320         # graddiff retain set
    patch_batch: int = 8
    patch_max_length: int = 160
    max_steps: int = 20
    ga_steps: int = 25              # the pattern experiment's SE budget (cpu preset)
    refusal_target: float = 0.85    # stop: calibration refusal rate reaches this
    ppl_guard: float = 1.5          # stop: calibration perplexity reaches this x the backbone's
    non_answer_guard: float = 0.25  # stop: calibration non-answer rate reaches this
    backbone_steps: int = 5


SIZES = {"full": Sizes(),
         "smoke": Sizes(eval_xstest=4, eval_harmful=2, max_new_tokens=12, report_reference=4,
                        calib_reference=3, reference_tokens=32, calib_prompts=4,
                        calib_max_new_tokens=8, calib_every=1, refusal_pairs=16,
                        retain_pairs=16, patch_batch=2, patch_max_length=96, max_steps=2,
                        ga_steps=2, backbone_steps=1)}


def variants(sz: Sizes) -> list[dict]:
    """The SE patches, in run order (one per objective, then two variants). Learning rate: the
    pattern experiment's SE rate (2e-5) for every objective; budgets: its 25 steps and NLL
    ceiling 4 for ga, `max_steps` for the others; the behavioural stop (the same rules for all)
    picks the stop point on calibration prompts."""
    common = dict(learning_rate=2e-5, max_steps=sz.max_steps)
    return [
        {"name": "ga", "objective": "ga", **common, "max_steps": sz.ga_steps, "nll_ceiling": 4.0,
         "note": "the paper's SE objective, as in the pattern experiment (NLL ceiling 4)"},
        {"name": "npo", "objective": "npo", "npo_beta": 0.1, **common, "note": "NPO, β = 0.1"},
        {"name": "graddiff", "objective": "graddiff", "retain_weight": 1.0, **common,
         "note": "gradient difference, λ = 1, retain = Alpaca"},
        # Tuning on calibration: with λ = 1 the calibration refusal rate rose to 54 % at step
        # 10 and fell to 12 % by step 20 (the retain term won); a smaller λ keeps the ascent.
        {"name": "graddiff_l0.25", "objective": "graddiff", "retain_weight": 0.25, **common,
         "note": "gradient difference, λ = 0.25 (tuned on calibration prompts)"},
        {"name": "refusal_sft", "objective": "refusal_sft", **common,
         "note": "descent on held-out refusal pairs"},
        {"name": "npo_on_policy", "objective": "npo", "npo_beta": 0.1, "on_policy": True,
         **common, "note": "NPO on the backbone's own compliant answers to the D_h prompts"},
        {"name": "ga_confined", "objective": "ga", **common, "max_steps": sz.ga_steps,
         "nll_ceiling": 4.0, "train_exclude": FREEZE,
         "note": "ga with embeddings, output head and norms frozen"},
    ]


def _prompt_texts(path: Path) -> list[str]:
    from safepatch_merge.eval.suites import load_training_prompts

    return load_training_prompts(path)


def _dedup_rows(rows: list[dict], index, threshold: float = 0.85) -> tuple[list[dict], int]:
    """Rows whose prompt matches no indexed prompt (exact or fuzzy), and how many were dropped."""
    kept = [r for r in rows if index.match(r["prompt"], threshold) is None]
    return kept, len(rows) - len(kept)


class Experiment:
    def __init__(self, args, sizes: Sizes):
        import torch

        from safepatch_merge.pipeline.stages import StepRunner

        self.args, self.sz = args, sizes
        self.out = Path(args.out).resolve()
        self.data_dir = Path(args.data_dir).resolve()
        self.results = Path(args.results_dir).resolve() if args.results_dir \
            else self.out / "final"
        self.runner = StepRunner(self.out / "manifests", force=args.force, log=log.info)
        self.preset = get_preset("gpu")  # the pattern experiment's run-2 data and backbone
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}
        self.meta: dict = {"sizes": asdict(sizes), "command": " ".join(sys.argv),
                           "environment": self._environment(torch), "variants": {}}

    def _environment(self, torch) -> dict:
        import transformers

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                capture_output=True, text=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=HERE, capture_output=True, text=True).stdout.strip())
        cpu = ""
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in
                       open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return {"commit": commit, "dirty": dirty, "python": platform.python_version(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}

    def step(self, stage: str, name: str, inputs: dict, output: Path, fn):
        o = self.runner.run(stage, name, inputs, output, fn)
        m = self.runner.read_manifest(stage, name) or {}
        self.timings[f"{stage}/{name}"] = round(float(m.get("seconds") or o.seconds), 1)
        return o

    # ------------------------------------------------------------------ data
    def stage_data(self) -> None:
        from safepatch_merge.eval.suites import TrainingIndex
        from safepatch_merge.eval.judge import RuleRefusalJudge
        from safepatch_merge.pipeline.stages import file_identity

        p, sz, dd = self.preset, self.sz, self.data_dir
        srcs = ["train/safety_refusals.json", "train/alpaca_en_demo.json",
                "train/harmful_pairs.jsonl", "eval/harmbench_val.csv",
                "eval/alpaca_harmless_test.json", "eval/benign_reference_completions.jsonl"]
        for s in srcs:
            if not (dd / s).is_file():
                raise SystemExit(f"--data-dir {dd}: missing {s}")
        inputs = {"sources": {s: file_identity(dd / s) for s in srcs},
                  "preset": [p.sft_refusals, p.sft_benign, p.dh_pairs, p.eval_limit,
                             p.calib_limit, p.calib_benign, p.calib_xstest, p.seed],
                  "sizes": [sz.report_reference, sz.calib_reference, sz.refusal_pairs,
                            sz.retain_pairs, sz.eval_xstest, sz.eval_harmful], "version": 2}
        self.data = self.out / "data"

        def build(o: Path) -> dict:
            o.mkdir(parents=True, exist_ok=True)
            rep = {"sft_mix": build_sft_mix(dd, o / "sft_mix.jsonl", p.sft_refusals,
                                            p.sft_benign, p.seed),
                   "dh": build_dh(dd, o / "dh.jsonl", p.dh_pairs, p.seed)}
            rep["prompts"] = build_prompt_files(
                dd, o / "prompts", [o / "sft_mix.jsonl", dd / "train" / "harmful_pairs.jsonl"],
                p.eval_limit, p.calib_limit, p.calib_benign, p.seed, p.calib_xstest)
            ref = [json.loads(line) for line in
                   (dd / "eval" / "benign_reference_completions.jsonl").read_text().splitlines()
                   if line.strip()]
            if len(ref) < sz.report_reference + sz.calib_reference:
                raise SystemExit("benign_reference_completions.jsonl is too short")
            _write_jsonl(o / "report_reference.jsonl", ref[:sz.report_reference])
            _write_jsonl(o / "calib_reference.jsonl", ref[len(ref) - sz.calib_reference:])
            # every prompt a model is evaluated or calibrated on
            held = [o / "prompts" / f for f in ("xstest_safe.jsonl", "harmbench_test.jsonl",
                                                "strongreject.jsonl", "calib_harmful.jsonl",
                                                "calib_xstest.jsonl", "calib_alpaca.jsonl")]
            texts = [t for f in held for t in _prompt_texts(f)]
            from safepatch_merge.eval.suites import load_suite
            texts += [q.text for q in load_suite("xstest")] + [r["prompt"] for r in ref]
            index = TrainingIndex(texts)
            # refusal pairs: not in the tuning mix, answered with a refusal, never evaluated
            in_mix = {r["prompt"] for r in map(json.loads,
                                               (o / "sft_mix.jsonl").read_text().splitlines())}
            judge = RuleRefusalJudge()
            rows = [r for r in _alpaca_rows(dd / "train" / "safety_refusals.json")
                    if r["prompt"] not in in_mix]
            n_unused = len(rows)
            rows = [r for r in rows if judge(r["response"]).refused]
            n_refusing = len(rows)
            rows, dropped = _dedup_rows(rows, index)
            import random
            random.Random(p.seed).shuffle(rows)
            _write_jsonl(o / "refusal_pairs.jsonl", rows[:sz.refusal_pairs])
            rep["refusal_pairs"] = {"not_in_mix": n_unused, "judged_refusal": n_refusing,
                                    "dropped_as_eval_duplicates": dropped,
                                    "used": min(sz.refusal_pairs, len(rows))}
            alp = json.loads((dd / "train" / "alpaca_en_demo.json").read_text())
            keep = [r for r in alp if index.match(
                r["instruction"] + (f"\n{r['input']}" if r.get("input") else ""), 0.85) is None]
            random.Random(p.seed + 1).shuffle(keep)
            (o / "retain.json").write_text(json.dumps(keep[:sz.retain_pairs], ensure_ascii=False))
            rep["retain"] = {"rows": len(alp), "dropped_as_eval_duplicates": len(alp) - len(keep),
                             "used": min(sz.retain_pairs, len(keep))}
            rep["eval_prompts"] = self._eval_files(o)
            (o / "data_report.json").write_text(json.dumps(rep, indent=1) + "\n")
            return rep

        self.data_step = self.step("00-data", "data", inputs, self.data, build)
        self.meta["data"] = json.loads((self.data / "data_report.json").read_text())

    def _eval_files(self, o: Path) -> dict:
        """o/eval/{xstest_safe,harmbench_test,strongreject}.jsonl: the reported prompts, the
        pattern experiment's prompt files deduplicated against every file a model here was
        trained or calibrated on, then fixed subsets."""
        from safepatch_merge.eval.suites import (TrainingIndex, deduplicate, fixed_subset,
                                                 load_user_file)

        index = TrainingIndex(t for f in self.dedup_files(o) for t in _prompt_texts(f))
        (o / "eval").mkdir(exist_ok=True)
        rep = {}
        for stem, n in (("xstest_safe", self.sz.eval_xstest),
                        ("harmbench_test", self.sz.eval_harmful),
                        ("strongreject", self.sz.eval_harmful)):
            ps = load_user_file(o / "prompts" / f"{stem}.jsonl", harmful=None, name=stem)
            kept, d = deduplicate(ps, index)
            sub = fixed_subset(kept, n, self.preset.seed)
            _write_jsonl(o / "eval" / f"{stem}.jsonl",
                         [{"id": q.id, "prompt": q.text, "harmful": q.harmful} for q in sub])
            rep[stem] = {"before": d.before, "removed_exact": d.removed_exact,
                         "removed_fuzzy": d.removed_fuzzy, "used": len(sub)}
        return rep

    # ------------------------------------------------------------------ backbone
    def stage_backbone(self, shipped: Path) -> None:
        from safepatch_merge.derive.behaviour import BehaviourProbe, load_calibration_prompts
        from safepatch_merge.derive.train import DeriveConfig, derive_patch
        from safepatch_merge.eval.utility import load_reference
        from safepatch_merge.models.loading import load_causal_lm, load_tokenizer
        from safepatch_merge.pipeline.stages import dir_fingerprint

        p = self.preset
        # batch 32 as 4 accumulated micro-batches of 8: the same examples per step (one
        # shuffled order, consecutive chunks) and the same mean loss, in a quarter of the
        # activation memory (one batch of 32 x 256 tokens needs ~20 GB in fp32)
        accum = 4 if p.sft_batch % 4 == 0 else 1
        cfg = DeriveConfig(objective="gd", learning_rate=p.sft_lr, max_steps=self.sz.backbone_steps,
                           batch_size=p.sft_batch // accum, grad_accum=accum,
                           max_length=p.sft_max_length, seed=p.seed,
                           heldout=0.0, save_dtype="float32", precision="fp32", device="cpu",
                           eval_every=1000, max_grad_norm=1.0)
        self.backbone = self.out / "models" / "backbone"
        st = self.step("01-backbone", "sft", {"from": dir_fingerprint(shipped),
                                               "data": self.data_step.output_id,
                                               "cfg": asdict(cfg)},
                       self.backbone, lambda o: derive_patch(
                           shipped, self.data / "sft_mix.jsonl", o, cfg, overwrite=True,
                           progress=not self.args.quiet))
        self.backbone_id = st.output_id
        cal = self.out / "backbone_calibration"

        def calibrate(o: Path) -> dict:
            tok = load_tokenizer(self.backbone)
            probe = BehaviourProbe(tok, load_calibration_prompts(
                self.data / "prompts" / "calib_harmful.jsonl", self.sz.calib_prompts),
                load_reference(self.data / "calib_reference.jsonl"),
                self.sz.calib_max_new_tokens, max_response_tokens=self.sz.reference_tokens)
            values, recs = probe.measure(load_causal_lm(self.backbone, "float32"))
            o.mkdir(parents=True, exist_ok=True)
            (o / "calibration.json").write_text(json.dumps({"values": values, "completions": recs},
                                                           indent=1) + "\n")
            return values

        self.step("01-backbone", "calibration", {"model": st.output_id,
                                                 "data": self.data_step.output_id,
                                                 "sizes": [self.sz.calib_prompts,
                                                           self.sz.calib_max_new_tokens,
                                                           self.sz.reference_tokens]},
                  cal, calibrate)
        self.backbone_calib = json.loads((cal / "calibration.json").read_text())["values"]
        self.rules = [f"refusal_rate>={self.sz.refusal_target:g}"]
        self.guards = [f"perplexity>={self.sz.ppl_guard * self.backbone_calib['perplexity']:.4f}",
                       f"non_answer_rate>={self.sz.non_answer_guard:g}"]
        self.meta["backbone"] = {"recipe": asdict(cfg), "calibration": self.backbone_calib,
                                 "stop_rules": self.rules, "guard_rules": self.guards}
        log.info("backbone calibration %s; stop rules %s, guards %s", self.backbone_calib,
                 self.rules, self.guards)

    # ------------------------------------------------------------------ patches
    def derive_config(self, v: dict):
        from safepatch_merge.derive.train import DeriveConfig

        sz = self.sz
        opts = {k: val for k, val in v.items() if k not in ("name", "note")}
        if opts["objective"] == "graddiff":
            opts["retain_data"] = str(self.data / "retain.json")
        return DeriveConfig(
            **opts, batch_size=sz.patch_batch, max_length=sz.patch_max_length, heldout=0.0,
            save_dtype="float32", precision="fp32", device="cpu", eval_every=1000, seed=0,
            stop_when=list(self.rules), guard_when=list(self.guards), calib_prompts=str(self.data / "prompts" /
                                                          "calib_harmful.jsonl"),
            calib_limit=sz.calib_prompts, calib_reference=str(self.data / "calib_reference.jsonl"),
            calib_every=sz.calib_every, calib_max_new_tokens=sz.calib_max_new_tokens,
            calib_reference_tokens=sz.reference_tokens,
            on_policy_max_new_tokens=sz.max_new_tokens)

    def stage_patch(self, v: dict) -> Path:
        from safepatch_merge.derive.train import derive_patch

        cfg = self.derive_config(v)
        data = self.data / ("refusal_pairs.jsonl" if v["objective"] == "refusal_sft" else "dh.jsonl")
        out = self.out / "models" / v["name"]
        st = self.step("02-patches", v["name"], {"backbone": self.backbone_id,
                                                  "data": self.data_step.output_id,
                                                  "file": str(data.name), "cfg": asdict(cfg)},
                       out, lambda o: derive_patch(self.backbone, data, o, cfg, overwrite=True,
                                                   progress=not self.args.quiet) and None)
        rec = json.loads((out / "derive_record.json").read_text())
        self.meta["variants"][v["name"]] = {
            "note": v["note"], "objective": v["objective"], "hyperparameters": {
                k: val for k, val in v.items() if k not in ("name", "note")},
            "steps": rec["steps"], "steps_trained": rec["steps_trained"],
            "stop_reason": rec["stop_reason"],
            "stop_rule": rec["stop_rule"], "probes": rec["calibration"]["probes"],
            "on_policy": rec["data"]["on_policy"], "train_examples": rec["data"]["train_examples"],
            "confinement": {k: rec["confinement"][k] for k in ("trainable", "frozen")}
            if rec["confinement"] else None,
            "train_seconds": round(rec["throughput"]["seconds"], 1),
            "patch_id": st.output_id}
        for f in ("nll_curve.png", "nll_curve.csv"):
            dst = self.results / "curves" / f"{v['name']}_{f}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / f, dst)
        return out

    # ------------------------------------------------------------------ eval
    def eval_files(self) -> list[Path]:
        return [self.data / "eval" / f"{s}.jsonl"
                for s in ("xstest_safe", "harmbench_test", "strongreject")]

    def dedup_files(self, d: Path | None = None) -> list[Path]:
        """Every file a model of this experiment was trained or calibrated on."""
        d = d or self.data
        return [d / "sft_mix.jsonl", self.data_dir / "train" / "harmful_pairs.jsonl",
                d / "refusal_pairs.jsonl", d / "retain.json", d / "prompts" / "calib_harmful.jsonl",
                d / "prompts" / "calib_xstest.jsonl", d / "prompts" / "calib_alpaca.jsonl",
                d / "calib_reference.jsonl"]

    def stage_eval(self, name: str, model: Path, model_id: str) -> dict:
        from safepatch_merge.eval.generate import GenerationSettings
        from safepatch_merge.eval.run import evaluate

        sz = self.sz
        out = self.out / "evals" / name

        def run(o: Path) -> None:
            evaluate(model, o, [str(f) for f in self.eval_files()], limit=None,
                     user_harmful=None, dedup_against=[str(f) for f in self.dedup_files()],
                     settings=GenerationSettings(max_new_tokens=sz.max_new_tokens),
                     batch_size=sz.eval_batch, device="cpu", dtype="float32", utility=True,
                     utility_file=self.data / "report_reference.jsonl",
                     utility_max_tokens=sz.reference_tokens, label=name,
                     progress=not self.args.quiet)

        self.step("03-eval", name, {"model": model_id, "data": self.data_step.output_id,
                                    "sizes": [sz.max_new_tokens, sz.eval_batch,
                                              sz.reference_tokens]},
                  out, run)
        return json.loads((out / "results.json").read_text())

    # ------------------------------------------------------------------ main
    def run(self) -> None:
        import torch

        torch.manual_seed(0)
        shipped = Path(self.args.model_dir).resolve() if self.args.model_dir else None
        if shipped is None:
            from safepatch_merge.models.smollm2 import ensure_smollm2
            shipped = ensure_smollm2()
        self.stage_data()
        self.stage_backbone(shipped)
        evals = {"backbone": self.stage_eval("backbone", self.backbone, self.backbone_id)}
        self.write_outputs(evals)
        only = set(self.args.only or [])
        for v in variants(self.sz):
            if only and v["name"] not in only:
                continue
            try:
                out = self.stage_patch(v)
                evals[v["name"]] = self.stage_eval(v["name"], out,
                                                   self.meta["variants"][v["name"]]["patch_id"])
            except Exception as e:  # one failed objective must not cost the others
                log.exception("variant %s failed", v["name"])
                self.meta["variants"].setdefault(v["name"], {})["error"] = \
                    f"{type(e).__name__}: {e}"
            self.write_outputs(evals)

    def write_outputs(self, evals: dict) -> None:
        """completions.jsonl.gz + meta.json in the results dir, then the table."""
        self.results.mkdir(parents=True, exist_ok=True)
        tmp = self.results / "completions.jsonl.gz.partial"
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            for name, res in evals.items():
                for r in res["records"]:
                    f.write(json.dumps({"variant": name, **{k: r.get(k) for k in (
                        "suite", "id", "harmful", "prompt", "completion", "n_new_tokens",
                        "hit_eos", "outcome", "refusal_rule", "degeneration_reason")}},
                        ensure_ascii=False) + "\n")
        tmp.replace(self.results / "completions.jsonl.gz")
        self.meta["perplexity"] = {n: {k: r["utility"][k] for k in
                                       ("perplexity", "ci95", "n_docs", "n_tokens", "mean_nll")}
                                   for n, r in evals.items()}
        self.meta["eval"] = {"suites": [f.name for f in self.eval_files()],
                             "dedup_against": [f.name for f in self.dedup_files()],
                             "dedup": evals["backbone"]["dedup"],
                             "judge_at_generation": evals["backbone"]["judge"],
                             "eval_seconds": {n: r["wall_time_s"] for n, r in evals.items()}}
        self.meta["timings"] = self.timings
        self.meta["wall_time_s"] = round(time.monotonic() - self.t0, 1)
        (self.results / "meta.json").write_text(json.dumps(self.meta, indent=1, default=str) + "\n")
        from se_objectives_table import main as table_main
        table_main([str(self.results)])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/runs/se_objectives",
                    help="work directory (cached, resumable stages)")
    ap.add_argument("--results-dir", help="where completions, meta, table go (default OUT/final)")
    ap.add_argument("--data-dir", required=True,
                    help="the public data folder (train/, eval/; its README lists sources and "
                         "licences)")
    ap.add_argument("--model-dir", help="SmolLM2-135M-Instruct directory (default: ensure_smollm2())")
    ap.add_argument("--sizes", choices=sorted(SIZES), default="full")
    ap.add_argument("--only", nargs="+", help="run only these variants (after the backbone); "
                    "the outputs then hold only them: rerun without --only to collect all "
                    "(finished stages are skipped)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared VM two threads ran several "
                         "times slower than one)")
    ap.add_argument("--force", action="store_true", help="redo every stage")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # no JIT extension build inside a timed run; set here, not at import, so that importing
    # this module (tests) leaves the extension on for the rest of the process
    os.environ.setdefault("SAFEPATCH_NO_EXT", "1")
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    setup_logging(out / "run.log")
    sizes = SIZES[args.sizes]
    log.info("sizes %s: %s", args.sizes, json.dumps(asdict(sizes)))
    exp = Experiment(args, sizes)
    try:
        exp.run()
    finally:
        copy_log(out / "run.log", exp.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
