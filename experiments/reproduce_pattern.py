#!/usr/bin/env python
"""Does SafePatching show the paper's pattern on a model we can run?

One command, resumable stages, everything cached under --out:

1. data: the safety-tuning mix (refusals + Alpaca), D_h (a subset of harmful_pairs.jsonl) and
   the evaluation prompt files (XSTest safe, HarmBench test, StrongREJECT), deduplicated
   against every training prompt, fixed subsets;
2. backbone: safety-tune SmolLM2-135M-Instruct (gradient descent on the mix, via
   `derive_patch(objective="gd")`) in a ladder of step budgets; the first candidate whose
   compliance on calibration prompts (HarmBench validation + AdvBench, never reported) is at
   most the target becomes the backbone;
3. patches: SE (gradient ascent) and OSM (gradient descent) on D_h from that backbone;
4. scores: SNIP saliency of both patches on D_h;
5. variants: backbone, SE only, OSM only, SafePatching (default), task arithmetic, TIES,
   intersection, then the sweep over (a, b, α, β, p), then the shipped model — each merged
   (streaming engine) and evaluated (the v2 judge's outcomes: harmful compliance, XSTest
   over-refusal = refusals + non-answers, non-answers, degeneration; perplexity utility
   proxy), one failure never stopping the others;
6. report: results.json, table.md, pattern.png and run.log, flat in --results-dir.

--time-budget stops launching new work once exceeded and still writes the report of what
finished. Usage and timings: experiments/README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_logging import setup_logging  # noqa: E402

from pattern_data import build_dh, build_prompt_files, build_sft_mix  # noqa: E402
from pattern_presets import PRESETS, Preset, get_preset  # noqa: E402
from pattern_report import write_report  # noqa: E402

log = logging.getLogger("reproduce_pattern")


class Budget:
    """Wall clock since start against an optional limit (seconds)."""

    def __init__(self, limit: float | None):
        self.t0, self.limit = time.monotonic(), limit

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def exceeded(self) -> bool:
        return self.limit is not None and self.elapsed() > self.limit


def _rates(recs: list[dict]) -> dict:
    """Outcome rates of records (eval.outcome); `over_refusal` is the benign-prompt mapping
    (refusals + non-answers), meaningful where the prompts are benign."""
    from safepatch_merge.eval.metrics import rate
    from safepatch_merge.eval.outcome import counts_as_refusal

    return {"n": len(recs),
            "compliance": rate(r["outcome"] == "compliance" for r in recs).as_dict(),
            "refusal": rate(r["outcome"] == "refusal" for r in recs).as_dict(),
            "partial_refusal": rate(r.get("refusal_kind") == "partial" for r in recs).as_dict(),
            "non_answer": rate(r["outcome"] == "non_answer" for r in recs).as_dict(),
            "over_refusal": rate(counts_as_refusal(r["outcome"], False) for r in recs).as_dict(),
            "degenerate": rate(r["outcome"] == "degenerate" for r in recs).as_dict()}


def summarise_eval(result: dict) -> dict:
    """Per-suite rates of one evaluate() result (records of our prompt files)."""
    recs = result["records"]
    by = {s: [r for r in recs if r["suite"] == s] for s in
          ("xstest_safe", "harmbench_test", "strongreject")}
    return {"harmbench": _rates(by["harmbench_test"]),
            "strongreject": _rates(by["strongreject"]),
            "harmful_pooled": _rates(by["harmbench_test"] + by["strongreject"]),
            "xstest": _rates(by["xstest_safe"]),
            "judge": f"{result.get('judge')} {result.get('judge_version') or ''}".strip(),
            "utility": result.get("utility"),
            "eval_wall_s": result.get("wall_time_s")}


class Experiment:
    def __init__(self, args, preset: Preset):
        import torch

        from safepatch_merge.pipeline.stages import StepRunner

        self.args, self.p = args, preset
        self.out = Path(args.out).resolve()
        self.data_dir = Path(args.data_dir).resolve()
        self.results_dir = Path(args.results_dir).resolve() if args.results_dir \
            else self.out / "final"
        self.budget = Budget(args.time_budget)
        cuda = torch.cuda.is_available()
        self.device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
        if self.device == "cuda" and not cuda:
            raise SystemExit("--device cuda: CUDA is not available")
        self.precision = "bf16-mixed" if self.device == "cuda" else "fp32"
        self.runner = StepRunner(self.out / "manifests", force=args.force, log=log.info)
        self.timings: dict[str, float] = {}
        self.record: dict = {
            "format": "safepatch-pattern/1", "preset": preset.as_dict(),
            "eval_dtype": args.eval_dtype, "backend": args.backend,
            "environment": self._environment(), "variants": {}, "timings": self.timings,
            "command": " ".join(sys.argv),
        }
        self.stopped = False

    def _environment(self) -> dict:
        import torch
        import transformers

        env = {"device": self.device, "python": platform.python_version(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "host": platform.node()}
        env["device_name"] = torch.cuda.get_device_name(0) if self.device == "cuda" \
            else platform.processor() or "cpu"
        try:
            import subprocess
            env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                           capture_output=True, text=True).stdout.strip() or None
        except OSError:
            env["commit"] = None
        return env

    # ------------------------------------------------------------------ helpers
    def step(self, stage: str, name: str, inputs: dict, output: Path, fn):
        outcome = self.runner.run(stage, name, inputs, output, fn)
        # A skipped step reports the seconds it took when it ran (from its manifest).
        m = self.runner.read_manifest(stage, name) or {}
        self.timings[f"{stage}/{name}"] = round(float(m.get("seconds") or outcome.seconds), 1)
        if outcome.status == "skipped":
            self.record.setdefault("cached_steps", []).append(f"{stage}/{name}")
        return outcome

    def derive_cfg(self, **kw):
        from safepatch_merge.derive.train import DeriveConfig

        base = dict(heldout=0.0, save_dtype="float32", precision=self.precision,
                    device=self.device, eval_every=1000, max_grad_norm=1.0, seed=self.p.seed)
        base.update(kw)
        return DeriveConfig(**base)

    def evaluate(self, model: Path, out: Path, files: list[Path], label: str,
                 utility: bool = True) -> dict:
        from safepatch_merge.eval.generate import GenerationSettings
        from safepatch_merge.eval.run import evaluate

        return evaluate(
            model, out, [str(f) for f in files], limit=None, subset_seed=self.p.seed,
            settings=GenerationSettings(max_new_tokens=self.p.max_new_tokens),
            batch_size=self.p.eval_batch, device=self.device, dtype=self.args.eval_dtype,
            utility=utility,
            utility_file=self.data_dir / "eval" / "benign_reference_completions.jsonl",
            utility_limit=self.p.utility_limit, utility_max_tokens=self.p.utility_max_tokens,
            label=label, progress=not self.args.quiet)

    # ------------------------------------------------------------------ stages
    def stage_data(self) -> None:
        from safepatch_merge.pipeline.stages import file_identity

        p = self.p
        srcs = ["train/safety_refusals.json", "train/alpaca_en_demo.json",
                "train/harmful_pairs.jsonl", "eval/harmbench_val.csv",
                "eval/alpaca_harmless_test.json"]
        for s in srcs + ["eval/benign_reference_completions.jsonl"]:
            if not (self.data_dir / s).is_file():
                raise SystemExit(f"--data-dir {self.data_dir}: missing {s}")
        inputs = {"sources": {s: file_identity(self.data_dir / s) for s in srcs},
                  "sft": [p.sft_refusals, p.sft_benign], "dh": p.dh_pairs,
                  "limits": [p.eval_limit, p.calib_limit, p.calib_benign], "seed": p.seed,
                  "version": 2}
        if p.calib_xstest:  # only then, so run-1 caches keep their identity
            inputs["calib_xstest"] = p.calib_xstest
        self.data = self.out / "data"

        def build(o: Path) -> dict:
            o.mkdir(parents=True, exist_ok=True)
            rep = {"sft_mix": build_sft_mix(self.data_dir, o / "sft_mix.jsonl", p.sft_refusals,
                                            p.sft_benign, p.seed),
                   "dh": build_dh(self.data_dir, o / "dh.jsonl", p.dh_pairs, p.seed)}
            rep["prompts"] = build_prompt_files(
                self.data_dir, o / "prompts",
                [o / "sft_mix.jsonl", self.data_dir / "train" / "harmful_pairs.jsonl"],
                p.eval_limit, p.calib_limit, p.calib_benign, p.seed, p.calib_xstest)
            (o / "data_report.json").write_text(json.dumps(rep, indent=1) + "\n")
            return rep

        self.data_step = self.step("00-data", "data", inputs, self.data, build)
        rep = json.loads((self.data / "data_report.json").read_text())
        self.record["data"] = {"sft_mix": rep["sft_mix"], "dh": rep["dh"]}
        self.record["prompt_sets"] = rep["prompts"]
        log.info("data: %s", json.dumps(rep))

    def stage_backbone(self, shipped: Path) -> Path:
        from safepatch_merge.derive.train import derive_patch
        from safepatch_merge.pipeline.stages import dir_fingerprint

        p = self.p
        prompts = self.data / "prompts"
        benign = f"Alpaca refusal <= {p.calib_benign_max:.0%}"
        if p.calib_xstest:
            benign += f" and held-out XSTest refusal <= {p.calib_xstest_max:.0%}"
        rule = (f"first candidate with calibration harmful compliance <= {p.calib_target:.0%} "
                f"and {benign}; else the lowest harmful compliance among those with {benign}; "
                "else the last one")
        calib_files = [prompts / "calib_harmful.jsonl", prompts / "calib_alpaca.jsonl"]
        if p.calib_xstest:
            calib_files.append(prompts / "calib_xstest.jsonl")

        def benign_ok(c: dict) -> bool:
            ok = (c["benign_refusal"]["rate"] or 0) <= p.calib_benign_max
            if "xstest_refusal" in c:
                ok = ok and (c["xstest_refusal"]["rate"] or 0) <= p.calib_xstest_max
            return ok

        cands, prev, prev_id, done_steps = [], shipped, dir_fingerprint(shipped), 0
        chosen = None
        for k, steps in enumerate(p.sft_steps):
            if self.budget.exceeded() and cands:
                log.warning("time budget: no more backbone candidates after %s", cands[-1]["name"])
                self.stopped = True
                break
            name = f"sft{k}"
            cfg = self.derive_cfg(objective="gd", learning_rate=p.sft_lr,
                                  max_steps=steps - done_steps, batch_size=p.sft_batch,
                                  max_length=p.sft_max_length, seed=p.seed + k,
                                  lr_scheduler="constant", warmup_steps=0)
            out = self.out / "models" / name
            src = prev
            st = self.step("01-backbone", name,
                           {"from": prev_id, "data": self.data_step.output_id, "cfg": vars(cfg)},
                           out, lambda o, src=src, cfg=cfg: derive_patch(
                               src, self.data / "sft_mix.jsonl", o, cfg, overwrite=True,
                               progress=not self.args.quiet))
            cal_out = self.out / "evals" / f"calib_{name}"
            from safepatch_merge.eval.judge_models import judge_identity

            self.step("01-backbone", f"calib_{name}",
                      {"model": st.output_id, "prompts": self.data_step.output_id,
                       "gen": [p.max_new_tokens, p.eval_batch, self.args.eval_dtype],
                       "judge": judge_identity()},
                      cal_out, lambda o, m=out, name=name: self.evaluate(
                          m, o, calib_files, f"calib-{name}", utility=False) and None)
            res = json.loads((cal_out / "results.json").read_text())
            recs = res["records"]
            harm = _rates([r for r in recs if r["suite"] == "calib_harmful"])
            ben = _rates([r for r in recs if r["suite"] == "calib_alpaca"])
            c = {"name": name, "steps": steps, "dir": str(out), "judge": res.get("judge"),
                 "harmful_compliance": harm["compliance"],
                 "benign_refusal": ben["over_refusal"], "harmful_degenerate": harm["degenerate"]}
            if p.calib_xstest:
                c["xstest_refusal"] = _rates([r for r in recs
                                              if r["suite"] == "calib_xstest"])["over_refusal"]
            cands.append(c)
            log.info("candidate %s (%d steps): calib harmful compliance %.3f, alpaca refusal %.3f%s",
                     name, steps, harm["compliance"]["rate"] or 0, ben["over_refusal"]["rate"] or 0,
                     f", held-out XSTest refusal {c['xstest_refusal']['rate'] or 0:.3f}"
                     if "xstest_refusal" in c else "")
            prev, prev_id, done_steps = out, st.output_id, steps
            if benign_ok(c) and (harm["compliance"]["rate"] or 0) <= p.calib_target:
                chosen = c
                break
        if chosen is None:
            ok = [c for c in cands if benign_ok(c)]
            chosen = min(ok, key=lambda c: c["harmful_compliance"]["rate"] or 0) if ok else cands[-1]
        self.record["calibration"] = {"rule": rule, "candidates": cands, "chosen": chosen["name"]}
        log.info("backbone: %s", chosen["name"])
        self.backbone = Path(chosen["dir"])
        self.backbone_id = self.runner.read_manifest("01-backbone", chosen["name"])["output_id"]
        return self.backbone

    def stage_patches(self) -> None:
        from safepatch_merge.derive.train import derive_patch
        from safepatch_merge.score.api import ScoreConfig, score_patch

        p = self.p
        dh = self.data / "dh.jsonl"
        self.patch, self.scores, self.patch_ids, self.score_ids = {}, {}, {}, {}
        self.record["patches"] = {}
        for side, obj, lr, steps, extra in (
                ("se", "ga", p.se_lr, p.se_steps, {"nll_ceiling": p.se_nll_ceiling}),
                ("osm", "gd", p.osm_lr, p.osm_steps, {})):
            cfg = self.derive_cfg(objective=obj, learning_rate=lr, max_steps=steps,
                                  batch_size=p.patch_batch, max_length=p.patch_max_length, **extra)
            out = self.out / "models" / side
            st = self.step("02-patches", side, {"backbone": self.backbone_id,
                                                "data": self.data_step.output_id, "cfg": vars(cfg)},
                           out, lambda o, cfg=cfg: derive_patch(self.backbone, dh, o, cfg,
                                                                 overwrite=True,
                                                                 progress=not self.args.quiet))
            self.patch[side], self.patch_ids[side] = out, st.output_id
            rec = json.loads((out / "derive_record.json").read_text())
            self.record["patches"][side] = _curve_summary(out, rec)
            scfg = ScoreConfig(batch_size=p.score_batch, max_length=p.patch_max_length,
                               limit=p.score_examples, device=self.device, dtype="float32",
                               seed=p.seed)
            sout = self.out / "scores" / side
            ss = self.step("03-scores", side, {"patch": st.output_id,
                                               "data": self.data_step.output_id,
                                               "cfg": vars(scfg)},
                           sout, lambda o, side=side, scfg=scfg: score_patch(
                               self.patch[side], o, data=dh, backbone=self.backbone,
                               config=scfg, overwrite=True, progress=not self.args.quiet)
                           and None)
            self.scores[side], self.score_ids[side] = sout, ss.output_id

    # ------------------------------------------------------------------ variants
    def variants(self, shipped: Path) -> list[dict]:
        p = self.p
        sp = [dict(s) for s in p.sweep]
        v = [{"name": "backbone", "kind": "backbone", "model": str(self.backbone),
              "paper_row": "backbone"},
             {"name": "se_only", "kind": "patch", "model": str(self.patch["se"]),
              "paper_row": "se_only"},
             {"name": "osm_only", "kind": "patch", "model": str(self.patch["osm"]),
              "paper_row": "osm_only"}]
        if sp:
            v.append({"name": "safepatch", "kind": "safepatch", "method": "safepatch",
                      "params": dict(sp[0], mask_mode="difference"), "paper_row": "safepatch"})
        v += [{"name": "task_arithmetic", "kind": "baseline", "method": "task_arithmetic",
               "params": {"weight": 1.0}},
              {"name": "ties", "kind": "baseline", "method": "ties",
               "params": {"weight": 1.0, "density": p.ties_density}},
              {"name": "intersection", "kind": "ablation", "method": "safepatch",
               "params": {"a": p.intersection_rate, "b": p.intersection_rate, "alpha": 1.0,
                          "beta": 1.0, "p": 1.0, "mask_mode": "intersection"}}]
        for s in sp[1:]:
            tag = "sp_a{a:g}_b{b:g}_al{alpha:g}_be{beta:g}_p{p:g}".format(**s)
            v.append({"name": tag, "kind": "safepatch", "method": "safepatch",
                      "params": dict(s, mask_mode="difference")})
        v.append({"name": "shipped", "kind": "shipped", "model": str(shipped)})
        return v

    def merge_config(self, v: dict) -> dict:
        pr = v["params"]
        if v["method"] == "safepatch":
            return {"method": "safepatch", "backbone": str(self.backbone),
                    "patches": {"se": str(self.patch["se"]), "osm": str(self.patch["osm"])},
                    "scores": {"se": str(self.scores["se"]), "osm": str(self.scores["osm"])},
                    "parameters": {"top_rate_se": pr["a"], "top_rate_osm": pr["b"],
                                   "alpha": pr["alpha"], "beta": pr["beta"],
                                   "retention": pr["p"], "rescale": False,
                                   "mask_mode": pr["mask_mode"], "seed": self.p.seed},
                    "output": {"dtype": "float32"}}
        mp = {k: pr[k] for k in ("weight", "density") if k in pr}
        return {"method": v["method"], "backbone": str(self.backbone),
                "models": [{"model": str(self.patch["se"]), "parameters": dict(mp)},
                           {"model": str(self.patch["osm"]), "parameters": dict(mp)}],
                "output": {"dtype": "float32"}}

    def run_variant(self, v: dict, shipped_id: str) -> dict:
        from safepatch_merge.merge import merge

        prompts = self.data / "prompts"
        files = [prompts / "xstest_safe.jsonl", prompts / "harmbench_test.jsonl",
                 prompts / "strongreject.jsonl"]
        entry = {k: v[k] for k in ("kind", "method", "params", "paper_row") if k in v}
        ev_out = self.out / "evals" / v["name"]
        if "method" in v:
            mcfg = self.merge_config(v)
            ident = {"merge": mcfg, "backbone": self.backbone_id, "patches": self.patch_ids,
                     "scores": self.score_ids}
        else:
            ident = {"model": v["model"],
                     "id": {"backbone": self.backbone_id, "se_only": self.patch_ids.get("se"),
                            "osm_only": self.patch_ids.get("osm"),
                            "shipped": shipped_id}[v["name"]]}
        from safepatch_merge.eval.judge_models import judge_identity

        inputs = {"variant": ident, "prompts": self.data_step.output_id,
                  "gen": [self.p.max_new_tokens, self.p.eval_batch, self.args.eval_dtype,
                          self.p.utility_limit, self.p.utility_max_tokens],
                  "judge": judge_identity()}
        merged_dir = self.out / "merged" / v["name"]

        def run(o: Path) -> dict:
            extra = {}
            model = Path(v.get("model", merged_dir))
            if "method" in v:
                t0 = time.monotonic()
                res = merge(mcfg, merged_dir, backend=self.args.backend,
                            device=self.args.merge_device, overwrite=True, progress=False)
                extra["merge_s"] = round(time.monotonic() - t0, 1)
                extra["merge_summary"] = res.summary
            try:
                self.evaluate(model, o, files, v["name"])
            finally:
                if "method" in v and not self.args.keep_models:
                    shutil.rmtree(merged_dir, ignore_errors=True)
            (o / "variant.json").write_text(json.dumps(extra, indent=1, default=str) + "\n")
            return extra

        self.step("04-variants", v["name"], inputs, ev_out, run)
        res = json.loads((ev_out / "results.json").read_text())
        extra = json.loads((ev_out / "variant.json").read_text())
        entry.update(status="done", metrics=summarise_eval(res),
                     merge_s=extra.get("merge_s"), merge_summary=_short_summary(
                         extra.get("merge_summary")))
        return entry

    # ------------------------------------------------------------------ main
    def run(self) -> dict:
        from safepatch_merge.ops import set_backend
        from safepatch_merge.pipeline.stages import dir_fingerprint

        set_backend(self.args.backend)
        t0 = time.monotonic()
        shipped = self.resolve_model()
        self.timings["model"] = round(time.monotonic() - t0, 1)
        try:
            self.stage_data()
            self.stage_backbone(shipped)
            self.stage_patches()
        except Exception as e:  # still leave a report (and the log) saying where it stopped
            log.error("upstream stage failed: %s\n%s", e, traceback.format_exc())
            self.record["error"] = f"{type(e).__name__}: {e}"
            self.finish()
            raise
        shipped_id = dir_fingerprint(shipped)
        try:  # a diagnostic for the analysis; never worth failing the run for
            t0 = time.monotonic()
            rates = sorted({float(x) for s in self.p.sweep for x in (s["a"], s["b"])})
            key = {"scores": self.score_ids, "rates": rates}
            cache = self.out / "score_overlap.json"
            old = json.loads(cache.read_text()) if cache.is_file() else {}
            if old.get("key") == key:
                self.record["score_overlap"] = old["overlap"]
            else:
                self.record["score_overlap"] = score_overlap(
                    self.scores["se"], self.scores["osm"], rates, self.device)
                cache.write_text(json.dumps({"key": key, "overlap": self.record["score_overlap"]},
                                            indent=1) + "\n")
                self.timings["score_overlap"] = round(time.monotonic() - t0, 1)
            log.info("score overlap: %s", json.dumps(self.record["score_overlap"]))
        except Exception as e:
            log.warning("score overlap failed: %s", e)
        for v in self.variants(shipped):
            if self.budget.exceeded():
                self.stopped = True
                self.record["variants"][v["name"]] = {
                    "status": "skipped", "kind": v["kind"],
                    "error": f"time budget {self.args.time_budget} s exceeded"}
                log.warning("time budget: skipping %s", v["name"])
                continue
            try:
                self.record["variants"][v["name"]] = self.run_variant(v, shipped_id)
                m = self.record["variants"][v["name"]]["metrics"]
                log.info("%s: harmful compliance %s, XSTest over-refusal %s, ppl %s",
                         v["name"], m["harmful_pooled"]["compliance"]["rate"],
                         m["xstest"]["over_refusal"]["rate"],
                         (m.get("utility") or {}).get("perplexity"))
            except Exception as e:  # one failed variant must not cost the others
                log.error("variant %s failed: %s\n%s", v["name"], e, traceback.format_exc())
                self.record["variants"][v["name"]] = {
                    "status": "failed", "kind": v["kind"], "params": v.get("params"),
                    "method": v.get("method"), "error": f"{type(e).__name__}: {e}"}
            self._free_memory()
            self.write_partial_report()
        return self.finish()

    @staticmethod
    def _free_memory() -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def resolve_model(self) -> Path:
        if self.args.model_dir:
            d = Path(self.args.model_dir).resolve()
            if not (d / "config.json").is_file():
                raise SystemExit(f"--model-dir {d}: not a model directory (no config.json)")
            return d
        from safepatch_merge.models.smollm2 import ensure_smollm2

        return ensure_smollm2()

    def write_partial_report(self) -> None:
        self.record["wall_time_s"] = round(self.budget.elapsed(), 1)
        self.record["stopped_by_budget"] = self.stopped
        write_report(self.record, self.results_dir)

    def export_completions(self) -> None:
        """completions.jsonl.gz in the results dir: every evaluated completion with its
        verdict (for checking the judge and reading what the models said)."""
        import gzip

        path = self.results_dir / "completions.jsonl.gz"
        tmp = path.with_name(path.name + ".partial")
        self.results_dir.mkdir(parents=True, exist_ok=True)
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            for name, v in self.record["variants"].items():
                res = self.out / "evals" / name / "results.json"
                if v.get("status") != "done" or not res.is_file():
                    continue
                for r in json.loads(res.read_text())["records"]:
                    f.write(json.dumps({"variant": name, **{k: r.get(k) for k in (
                        "suite", "id", "harmful", "prompt", "completion", "n_new_tokens",
                        "hit_eos", "outcome", "refusal_kind", "judge_evidence")}},
                        ensure_ascii=False) + "\n")
        tmp.replace(path)

    def finish(self) -> dict:
        from safepatch_merge.derive.record import now_iso

        self.record["finished"] = now_iso()
        try:
            self.export_completions()
        except Exception as e:  # the table matters more than this export
            log.warning("completions export failed: %s", e)
        self.write_partial_report()
        log.info("report: %s", self.results_dir)
        return self.record


def score_overlap(se_dir: Path, osm_dir: Path, rates: list[float], device: str) -> dict:
    """How much the top sets of the two patches overlap: for each rate r, |T_SE ∩ T_OSM| / k
    with T_X = the k = ceil(r·N) highest-scoring parameters of X (S > 0; one global threshold,
    as the merge's default granularity; ties at the threshold counted in). This is what the
    difference-set merge removes from each side."""
    import math

    import torch
    from safetensors import safe_open

    def flat(d: Path) -> tuple[list[str], torch.Tensor]:
        parts = {}
        for f in sorted(d.glob("*.safetensors")):
            if f.name == "histograms.safetensors":
                continue
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    parts[k] = h.get_tensor(k).float().reshape(-1)
        names = sorted(parts)
        return names, torch.cat([parts[n] for n in names]).to(device)

    n_se, s_se = flat(se_dir)
    n_osm, s_osm = flat(osm_dir)
    if n_se != n_osm:
        return {"error": "score directories cover different tensors"}
    n = s_se.numel()
    out = {"n": n}
    for r in rates:
        k = max(1, math.ceil(round(r * n, 6)))
        masks = []
        for s in (s_se, s_osm):
            t = torch.kthvalue(s, n - k + 1).values
            masks.append((s >= t) & (s > 0))
        inter = int((masks[0] & masks[1]).sum())
        out[f"{r:g}"] = {"k": k, "se_selected": int(masks[0].sum()),
                         "osm_selected": int(masks[1].sum()), "intersection": inter,
                         "intersection_over_k": inter / k}
    return out


def _curve_summary(out: Path, rec: dict) -> dict:
    import csv

    rows = []
    try:
        with open(out / "nll_curve.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("train_nll")]
    except OSError:
        pass
    first = float(rows[0]["train_nll"]) if rows else None
    last = float(rows[-1]["train_nll"]) if rows else None
    return {"steps": rec.get("steps") or rec.get("result", {}).get("steps"),
            "stop_reason": rec.get("stop_reason"),
            "nll_first": None if first is None else round(first, 4),
            "nll_last": None if last is None else round(last, 4)}


def _short_summary(s: dict | None) -> dict | None:
    """Merge summary without per-tensor lists (thresholds, achieved densities stay)."""
    if not s:
        return s
    out = {}
    for k, v in s.items():
        if isinstance(v, (list, dict)) and len(json.dumps(v, default=str)) > 2000:
            continue
        out[k] = v
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  # proof run on CPU (minutes; numbers meaningless)
  PYTHONPATH=. python experiments/reproduce_pattern.py --smoke --data-dir DATA --out /tmp/pattern-smoke
  # the real run on one CUDA GPU
  PYTHONPATH=. python experiments/reproduce_pattern.py --preset gpu --out runs/pattern \\
      --data-dir DATA --model-dir SMOLLM2_DIR --time-budget 330 --results-dir final
  # table and plot again from a results JSON
  python experiments/reproduce_pattern.py --report-only experiments/results/results.json \\
      --results-dir experiments/results""")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="sizes: gpu, cpu or smoke (default: gpu when CUDA is present, else cpu)")
    ap.add_argument("--smoke", action="store_true", help="same as --preset smoke")
    ap.add_argument("--out", default="experiments/runs/pattern",
                    help="work directory (cached, resumable stages)")
    ap.add_argument("--results-dir", default=None,
                    help="where results.json, table.md, pattern.png, run.log go (default OUT/final)")
    ap.add_argument("--data-dir", default=None,
                    help="the public data folder (train/, eval/; its README lists sources and "
                         "licences); required")
    ap.add_argument("--model-dir", default=None,
                    help="SmolLM2-135M-Instruct HF directory (default: ensure_smollm2())")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--eval-dtype", default="float32",
                    help="weights dtype for evaluation (float32 default: patch deltas are "
                         "often below bfloat16's resolution of the weights)")
    ap.add_argument("--backend", default="reference",
                    help="ops backend for scoring and merging (reference|cpp|triton|auto)")
    ap.add_argument("--merge-device", default="cpu", help="device of the merge engine")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; no new stage or variant starts after this")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--keep-models", action="store_true", help="keep merged model directories")
    ap.add_argument("--force", action="store_true", help="redo every stage")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--report-only", default=None, metavar="RESULTS_JSON",
                    help="only regenerate table.md and pattern.png from a results JSON")
    for k in ("eval_limit", "max_new_tokens", "eval_batch", "dh_pairs", "se_steps", "osm_steps"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                        help=f"override the preset's {k}")
    for k in ("sft_lr", "se_lr", "osm_lr", "calib_target"):
        ap.add_argument("--" + k.replace("_", "-"), type=float, default=None,
                        help=f"override the preset's {k}")
    args = ap.parse_args(argv)
    if not args.report_only and not args.data_dir:
        ap.error("--data-dir DIR is required (the public data folder with train/ and eval/)")
    return args


def main(argv=None) -> int:
    # No JIT build of the C++/CUDA extension inside a timed run (it can take minutes on a fresh
    # machine); the ops fall back to the reference (plain torch) or Triton. Set here, not at
    # import, so importing this module (the report and rejudge scripts do) changes nothing.
    os.environ.setdefault("SAFEPATCH_NO_EXT", "1")
    args = parse_args(argv)
    if args.report_only:
        rec = json.loads(Path(args.report_only).read_text())
        out = Path(args.results_dir or Path(args.report_only).parent)
        paths = write_report(rec, out, write_json=Path(args.report_only).resolve().parent
                             != out.resolve())
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = "smoke" if args.smoke else args.preset or ("gpu" if torch.cuda.is_available()
                                                      and args.device != "cpu" else "cpu")
    overrides = {k: getattr(args, k) for k in ("eval_limit", "max_new_tokens", "eval_batch",
                                               "dh_pairs", "se_steps", "osm_steps", "sft_lr",
                                               "se_lr", "osm_lr", "calib_target")}
    preset = get_preset(name, **overrides)
    out = Path(args.out).resolve()
    setup_logging(out / "run.log")
    log.info("preset %s: %s", name, json.dumps(preset.as_dict()))
    exp = Experiment(args, preset)
    try:
        exp.run()
    finally:
        exp.results_dir.mkdir(parents=True, exist_ok=True)
        for h in logging.getLogger().handlers:
            h.flush()
        try:
            shutil.copyfile(out / "run.log", exp.results_dir / "run.log")
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
