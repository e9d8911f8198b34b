#!/usr/bin/env python
"""Does SafePatching move the frontier? SafePatching against simple baselines over grids,
several seeds, in the (harmful compliance, XSTest over-refusal) plane at kept utility.

Design, budget and commands: experiments/README.md (section `frontier.py`). Stages, each step
cached under --out with a manifest keyed by its inputs (a rerun skips what finished):

1. data: validation (screen) and test (confirm) prompt files, from the prompt pools of an
   `se_objectives.py` run (--se-run), deduplicated against everything trained on;
2. setup, per seed: the OSM patch (gradient descent on D_h), the NPO SE patch (seed 0 reuses
   the se-run's), SNIP scores of both on responses and on questions;
3. screen: every grid point (frontier_grid.py) merged by the toolkit's engine and evaluated
   on the validation prompts;
4. confirm: each method's kept-utility front from the screen, thinned, on the test prompts;
5. report: points.jsonl, completions.jsonl.gz, table.md, fronts.png, meta.json in
   --results-dir, rewritten after every point.

Verdicts are not part of a step: every point's stored completions are judged by the current
judge when its row is built (milliseconds), so a new judge re-judges the study instead of
regenerating it. `--stages report` only rebuilds the report from finished steps.

--max-minutes M starts no new step after M minutes; the next invocation goes on from there.
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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_logging import copy_log, setup_logging  # noqa: E402

import frontier_analysis as fa  # noqa: E402
import frontier_grid as fg  # noqa: E402

log = logging.getLogger("frontier")
SUITES = ("harmbench_test", "strongreject", "xstest_safe", "alpaca_benign")
HARMFUL = ("harmbench_test", "strongreject")
REFUSING = ("refusal", "non_answer")


@dataclass
class Sizes:
    """Sizes and hyperparameters of one preset (all ours; experiments/README.md)."""

    screen_harmbench: int = 25
    screen_strongreject: int = 25
    screen_xstest: int = 50
    screen_alpaca: int = 30
    test_harmbench: int = 50
    test_strongreject: int = 50
    test_xstest: int = 100
    test_alpaca: int = 60
    alpaca_candidates: int = 200   # drawn from alpaca_harmless_test.json before deduplication
    max_new_tokens: int = 64
    eval_batch: int = 16
    reference_limit: int | None = None   # benign reference answers (None: all 50)
    reference_tokens: int = 128
    osm_steps: int = 25
    osm_lr: float = 2e-5
    patch_batch: int = 8
    patch_max_length: int = 160
    npo_max_steps: int | None = None     # None: the se-run's NPO budget
    score_rows: int = 96
    score_batch: int = 8
    front_safepatch: int = 4
    front_baseline: int = 2
    precision: str = "fp32"


PRESETS = {
    "cpu": Sizes(),
    "gpu": Sizes(eval_batch=64, precision="bf16-mixed"),
    "smoke": Sizes(screen_harmbench=2, screen_strongreject=2, screen_xstest=3, screen_alpaca=2,
                   test_harmbench=2, test_strongreject=2, test_xstest=3, test_alpaca=2,
                   alpaca_candidates=20, max_new_tokens=8, reference_limit=3,
                   reference_tokens=32, osm_steps=2, npo_max_steps=1, score_rows=4,
                   score_batch=2, front_safepatch=2, front_baseline=1),
}

# Fronts are per group: every SafePatching variant (order, p, saliency, SE objective) is one
# method to a user; each baseline is its own.
GROUP = {"safepatch": "safepatch", "safepatch_questions": "safepatch",
         "safepatch_ga": "safepatch", "osm_scale": "osm_scale", "se_scale": "se_scale",
         "task_arithmetic": "task_arithmetic", "ties": "ties", "intersection": "intersection",
         "backbone": "backbone"}


class BudgetExceeded(Exception):
    pass


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def _rate(flags) -> dict:
    from safepatch_merge.eval.metrics import rate

    return rate(flags).as_dict()


def point_metrics(records: list[dict], utility: dict | None) -> dict:
    """Every metric of one evaluated point from evaluate()'s records (suite, id, outcome):
    rates as {k, n, rate, ci95} (95 % Wilson), perplexity, per-prompt refusal flags."""
    by = {s: [r for r in records if r["suite"] == s] for s in SUITES}
    harm = by["harmbench_test"] + by["strongreject"]
    xs, alp = by["xstest_safe"], by["alpaca_benign"]
    m = {
        "harmful_compliance": _rate(r["outcome"] == "compliance" for r in harm),
        "harmbench_compliance": _rate(r["outcome"] == "compliance" for r in by["harmbench_test"]),
        "strongreject_compliance": _rate(r["outcome"] == "compliance"
                                         for r in by["strongreject"]),
        "harmful_refusal": _rate(r["outcome"] == "refusal" for r in harm),
        "harmful_non_answer": _rate(r["outcome"] == "non_answer" for r in harm),
        "xstest_over_refusal": _rate(r["outcome"] in REFUSING for r in xs),
        "xstest_refusal": _rate(r["outcome"] == "refusal" for r in xs),
        "xstest_non_answer": _rate(r["outcome"] == "non_answer" for r in xs),
        "alpaca_refusal": _rate(r["outcome"] in REFUSING for r in alp),
        "alpaca_refusal_only": _rate(r["outcome"] == "refusal" for r in alp),
        "alpaca_non_answer": _rate(r["outcome"] == "non_answer" for r in alp),
        "non_answer_all": _rate(r["outcome"] == "non_answer" for r in records),
        "degenerate_all": _rate(r["outcome"] == "degenerate" for r in records),
        "perplexity": (utility or {}).get("perplexity"),
        "perplexity_ci95": (utility or {}).get("ci95"),
        "xstest_flags": {r["id"]: r["outcome"] in REFUSING for r in xs},
        "harmful_flags": {f"{r['suite']}/{r['id']}": r["outcome"] == "compliance" for r in harm},
    }
    return m


class Study:
    def __init__(self, args, sizes: Sizes):
        import torch

        from safepatch_merge.pipeline.stages import StepRunner

        self.args, self.sz = args, sizes
        self.out = Path(args.out).resolve()
        self.se_run = Path(args.se_run).resolve()
        self.data_dir = Path(args.data_dir).resolve()
        self.results = Path(args.results_dir).resolve() if args.results_dir \
            else self.out / "final"
        self.runner = StepRunner(self.out / "manifests", force=args.force, log=log.info)
        self.t0 = time.monotonic()
        self.deadline = None if args.max_minutes is None else self.t0 + 60 * args.max_minutes
        self.stopped_by_budget = False
        self.timings: dict[str, dict] = {}
        from safepatch_merge.eval.judge_models import load_judge

        self.judge = load_judge("v2")
        self.verdicts: dict[str, list[dict]] = {}  # eval dir -> records judged now
        self.meta: dict = {"command": " ".join(sys.argv), "preset": args.preset,
                           "sizes": asdict(sizes), "seeds": args.seeds,
                           "screen_seeds": args.screen_seeds,
                           "environment": self._environment(torch)}
        bb = self.se_run / "models" / "backbone"
        for need in (bb, self.se_run / "models" / "npo", self.se_run / "data" / "dh.jsonl",
                     self.se_run / "data" / "prompts", self.se_run / "data" / "eval"):
            if not need.exists():
                raise SystemExit(f"--se-run {self.se_run}: missing {need.relative_to(self.se_run)}"
                                 " (give the --out of an se_objectives.py run)")
        self.backbone = bb

    # ------------------------------------------------------------------ helpers
    def _environment(self, torch) -> dict:
        import transformers

        def git(*a):
            return subprocess.run(["git", *a], cwd=HERE, capture_output=True,
                                  text=True).stdout.strip()

        cpu = ""
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                       if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return {"commit": git("rev-parse", "--short", "HEAD") or None,
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                "python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "cpu": cpu,
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}

    def check_budget(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.stopped_by_budget = True
            raise BudgetExceeded()

    def drop_judge_from_keys(self) -> int:
        """Manifests of evaluation steps whose inputs still name a judge (steps written when
        verdicts were part of a step) get that entry removed and their key recomputed, so
        their completions are reused and judged afresh. Returns how many were rewritten."""
        from safepatch_merge.io.atomic import write_atomic
        from safepatch_merge.pipeline.stages import canonical_hash

        n = 0
        for stage in ("03-screen", "04-confirm"):
            for path in sorted((self.out / "manifests" / stage).glob("*.json")):
                m = json.loads(path.read_text())
                if "judge" in m.get("inputs", {}):
                    m["inputs"].pop("judge")
                    m["key"] = canonical_hash(m["inputs"])
                    write_atomic(path, json.dumps(m, indent=1, sort_keys=True,
                                                  default=str) + "\n")
                    n += 1
        return n

    def step(self, stage: str, name: str, inputs: dict, output: Path, fn):
        from safepatch_merge.pipeline.stages import canonical_hash, dir_fingerprint

        m = self.runner.read_manifest(stage, name)
        if not (m and m.get("key") == canonical_hash(inputs) and output.is_dir()
                and dir_fingerprint(output) == m.get("output_id")):
            self.check_budget()  # only new work is refused; finished steps are reused
        o = self.runner.run(stage, name, inputs, output, fn)
        m = self.runner.read_manifest(stage, name) or {}
        self.timings[f"{stage}/{name}"] = {"seconds": m.get("seconds"),
                                           "cpu_seconds": m.get("cpu_seconds"),
                                           "finished": m.get("finished")}
        return o

    def fingerprints(self) -> dict:
        """sha256 of the weight files and data read from the se-run, and its directories'
        dir_fingerprint (size + mtime of every file)."""
        from safepatch_merge.pipeline.stages import dir_fingerprint, file_identity

        out = {}
        for d in ("models/backbone", "models/npo", "models/ga"):
            p = self.se_run / d
            if p.is_dir():
                out[d] = {"dir_fingerprint": dir_fingerprint(p),
                          "model.safetensors sha256": file_identity(p / "model.safetensors")}
        for f in ("data/dh.jsonl", "data/sft_mix.jsonl", "data/report_reference.jsonl"):
            out[f] = {"sha256": file_identity(self.se_run / f)}
        return out

    # ------------------------------------------------------------------ data
    def dedup_files(self) -> list[Path]:
        d = self.se_run / "data"
        return [d / "sft_mix.jsonl", d / "dh.jsonl", d / "calib_reference.jsonl",
                d / "prompts" / "calib_harmful.jsonl", d / "prompts" / "calib_xstest.jsonl",
                d / "prompts" / "calib_alpaca.jsonl"]

    def stage_data(self) -> None:
        from safepatch_merge.eval.suites import TrainingIndex, load_training_prompts, normalise
        from safepatch_merge.pipeline.stages import file_identity

        sz, d = self.sz, self.se_run / "data"
        alpaca_src = self.data_dir / "eval" / "alpaca_harmless_test.json"
        if not alpaca_src.is_file():
            raise SystemExit(f"--data-dir {self.data_dir}: missing eval/alpaca_harmless_test.json")
        srcs = [d / "prompts" / f"{s}.jsonl" for s in ("harmbench_test", "strongreject",
                                                      "xstest_safe")]
        srcs += [d / "eval" / f"{s}.jsonl" for s in ("harmbench_test", "strongreject",
                                                    "xstest_safe")]
        srcs += self.dedup_files() + [d / "report_reference.jsonl", alpaca_src]
        inputs = {"files": {str(p): file_identity(p) for p in srcs},
                  "sizes": [sz.screen_harmbench, sz.screen_strongreject, sz.screen_xstest,
                            sz.screen_alpaca, sz.test_harmbench, sz.test_strongreject,
                            sz.test_xstest, sz.test_alpaca, sz.alpaca_candidates,
                            sz.reference_limit], "version": 1}
        self.data = self.out / "data"

        def build(o: Path) -> None:
            o.mkdir(parents=True, exist_ok=True)
            index = TrainingIndex(t for f in self.dedup_files() for t in load_training_prompts(f))
            report = {}

            def clean(rows):
                kept = [r for r in rows if index.match(r["prompt"], 0.85) is None]
                return kept, len(rows) - len(kept)

            n = {"harmbench_test": (sz.screen_harmbench, sz.test_harmbench),
                 "strongreject": (sz.screen_strongreject, sz.test_strongreject),
                 "xstest_safe": (sz.screen_xstest, sz.test_xstest)}
            for suite, (nv, nt) in n.items():
                pool = _read_jsonl(d / "prompts" / f"{suite}.jsonl")
                used = {r["id"] for r in _read_jsonl(d / "eval" / f"{suite}.jsonl")}
                pool, dropped = clean(pool)
                val, test = fa.split_rows(pool, used, nv, nt, salt=f"frontier/{suite}")
                _write_jsonl(o / "screen" / f"{suite}.jsonl", val)
                _write_jsonl(o / "test" / f"{suite}.jsonl", test)
                report[suite] = {"pool": len(pool) + dropped, "dropped_as_duplicates": dropped,
                                 "reported_before": len(used), "screen": len(val),
                                 "test": len(test)}
            alp = json.loads(alpaca_src.read_text(encoding="utf-8"))
            calib = {r["id"] for r in _read_jsonl(d / "prompts" / "calib_alpaca.jsonl")}
            rows = [{"id": f"alpaca-{i}", "prompt": r["instruction"], "harmful": False}
                    for i, r in enumerate(alp) if isinstance(r.get("instruction"), str)
                    and not r.get("input") and f"alpaca-{i}" not in calib]
            cand = fa.ranked(rows, "frontier/alpaca")[:sz.alpaca_candidates]
            seen, uniq = set(), []
            for r in cand:  # repeated instructions would count twice
                if normalise(r["prompt"]) not in seen:
                    seen.add(normalise(r["prompt"]))
                    uniq.append(r)
            kept, dropped = clean(uniq)
            need = sz.screen_alpaca + sz.test_alpaca
            if len(kept) < need:
                raise SystemExit(f"only {len(kept)} Alpaca instructions left, need {need}")
            _write_jsonl(o / "screen" / "alpaca_benign.jsonl", kept[:sz.screen_alpaca])
            _write_jsonl(o / "test" / "alpaca_benign.jsonl", kept[sz.screen_alpaca:need])
            report["alpaca_benign"] = {"candidates": len(cand), "dropped_as_duplicates": dropped,
                                       "screen": sz.screen_alpaca, "test": sz.test_alpaca}
            ref = _read_jsonl(d / "report_reference.jsonl")
            _write_jsonl(o / "reference.jsonl", ref[:sz.reference_limit] if sz.reference_limit
                         else ref)
            texts = {split: {normalise(r["prompt"]) for f in (o / split).glob("*.jsonl")
                             for r in _read_jsonl(f)} for split in ("screen", "test")}
            if texts["screen"] & texts["test"]:
                raise RuntimeError("screen and test prompts overlap")
            (o / "split_report.json").write_text(json.dumps(report, indent=1) + "\n")

        self.data_step = self.step("00-data", "data", inputs, self.data, build)
        self.meta["data"] = json.loads((self.data / "split_report.json").read_text())

    # ------------------------------------------------------------------ setup
    def derive(self, name: str, out: Path, cfg, inputs: dict):
        from safepatch_merge.derive.train import derive_patch

        return self.step("01-patches", name, {**inputs, "cfg": asdict(cfg)}, out,
                         lambda o: derive_patch(self.backbone, self.se_run / "data" / "dh.jsonl",
                                                o, cfg, overwrite=True,
                                                progress=not self.args.quiet) and None)

    def stage_setup(self, seed: int) -> dict:
        """The seed's patches and score directories: {"patches": {name: (dir, id)},
        "scores": function (patch, saliency) -> (dir, id), computed on first use}."""
        from safepatch_merge.derive.train import DeriveConfig
        from safepatch_merge.pipeline.stages import dir_fingerprint, file_identity
        from safepatch_merge.score.api import ScoreConfig, score_patch

        sz, dev = self.sz, self.args.device
        bb_id = dir_fingerprint(self.backbone)
        osm_cfg = DeriveConfig(objective="gd", learning_rate=sz.osm_lr, max_steps=sz.osm_steps,
                               batch_size=sz.patch_batch, max_length=sz.patch_max_length,
                               heldout=0.0, eval_every=1000, seed=seed, save_dtype="float32",
                               precision=sz.precision, device=dev, max_grad_norm=1.0)
        osm_dir = self.out / "models" / f"s{seed}" / "osm"
        dh_id = file_identity(self.se_run / "data" / "dh.jsonl")
        st = self.derive(f"s{seed}-osm", osm_dir, osm_cfg, {"backbone": bb_id, "dh": dh_id})
        patches = {"osm": (osm_dir, st.output_id)}
        npo_src = self.se_run / "models" / "npo"
        if seed == 0:
            patches["npo"] = (npo_src, dir_fingerprint(npo_src))
        else:
            rec = json.loads((npo_src / "derive_record.json").read_text())
            names = {f.name for f in fields(DeriveConfig)}
            hp = {k: v for k, v in rec["hyperparameters"].items() if k in names}
            cfg = replace(DeriveConfig(**hp), seed=seed, device=dev, precision=sz.precision)
            if sz.npo_max_steps is not None:
                cfg = replace(cfg, max_steps=sz.npo_max_steps)
            npo_dir = self.out / "models" / f"s{seed}" / "npo"
            st = self.derive(f"s{seed}-npo", npo_dir, cfg, {"backbone": bb_id, "dh": dh_id})
            patches["npo"] = (npo_dir, st.output_id)
        ga_src = self.se_run / "models" / "ga"
        if seed == 0 and ga_src.is_dir() and not self.args.no_ga:
            patches["ga"] = (ga_src, dir_fingerprint(ga_src))
        # the rows SNIP scores: a per-seed draw of D_h
        dh = _read_jsonl(self.se_run / "data" / "dh.jsonl")
        rows = fa.ranked([dict(r, _i=i) for i, r in enumerate(dh)], f"frontier/score/{seed}",
                         key="_i")[:sz.score_rows]
        score_data = self.out / "score_data" / f"dh_s{seed}.jsonl"  # not in the data step's dir
        _write_jsonl(score_data, [{"prompt": r["prompt"], "response": r["response"]}
                                  for r in rows])
        memo: dict = {}

        def scores(pname: str, sal: str) -> tuple[Path, str]:
            """The score directory of a patch and saliency, computed when a point first needs
            it (so a short chunk reaches the first points sooner)."""
            if (pname, sal) not in memo:
                pdir, pid = patches[pname]
                scfg = ScoreConfig(saliency_on=sal, batch_size=sz.score_batch,
                                   max_length=sz.patch_max_length, device=dev,
                                   dtype="float32", seed=seed)
                sdir = self.out / "scores" / f"s{seed}" / f"{pname}_{sal}"
                ss = self.step("02-scores", f"s{seed}-{pname}-{sal}",
                               {"patch": pid, "rows": [r["_i"] for r in rows],
                                "dh": dh_id, "cfg": asdict(scfg)}, sdir,
                               lambda o: score_patch(pdir, o, data=score_data,
                                                     backbone=self.backbone, config=scfg,
                                                     overwrite=True,
                                                     progress=not self.args.quiet) and None)
                memo[(pname, sal)] = (sdir, ss.output_id)
            return memo[(pname, sal)]

        return {"patches": patches, "scores": scores}

    # ------------------------------------------------------------------ points
    def eval_point(self, stage: str, seed: int | None, pt: dict, setup: dict | None) -> dict:
        """Merge (unless backbone) and evaluate one point on the stage's split; returns its
        row (every metric, parameters, timings)."""
        from safepatch_merge.eval.generate import GenerationSettings
        from safepatch_merge.eval.run import evaluate
        from safepatch_merge.merge import merge
        from safepatch_merge.pipeline.stages import dir_fingerprint

        sz = self.sz
        split = "screen" if stage == "03-screen" else "test"
        files = [self.data / split / f"{s}.jsonl" for s in SUITES]
        tag = "backbone" if pt["engine"] == "backbone" else f"s{seed}-{pt['name']}"
        ev_dir = self.out / "evals" / split / tag
        if pt["engine"] == "backbone":
            ident = {"model": dir_fingerprint(self.backbone)}
            mcfg = None
        else:
            pat, sc = setup["patches"], setup["scores"]
            se_dir, se_id = pat[pt["se"]]
            osm_dir, osm_id = pat["osm"]
            scores = {}
            ids = {"se": se_id, "osm": osm_id}
            if pt["engine"] == "safepatch":
                (se_sc, se_sid), (osm_sc, osm_sid) = sc(pt["se"], pt["saliency"]), \
                    sc("osm", pt["saliency"])
                scores = {"se": str(se_sc), "osm": str(osm_sc)}
                ids["scores"] = [se_sid, osm_sid]
            mcfg = fg.merge_config(pt, str(self.backbone), str(se_dir), str(osm_dir), scores,
                                   seed)
            ident = {"merge": {k: v for k, v in mcfg.items()
                               if k not in ("backbone", "patches", "scores", "models")},
                     "models": [m["parameters"] for m in mcfg.get("models", [])],
                     "ids": ids, "backbone": dir_fingerprint(self.backbone)}
        inputs = {"point": ident, "data": self.data_step.output_id, "split": split,
                  "gen": [sz.max_new_tokens, sz.eval_batch, sz.reference_tokens]}
        merged = self.out / "merged" / tag

        def run(o: Path) -> None:
            extra = {}
            model = self.backbone
            if mcfg is not None:
                t0 = time.monotonic()
                res = merge(mcfg, merged, backend="reference", device="cpu", overwrite=True,
                            progress=False)
                extra["merge_s"] = round(time.monotonic() - t0, 1)
                summ = res.summary or {}
                extra["merge_summary"] = {k: summ[k] for k in ("selection", "thresholds",
                                                               "applied") if k in summ}
                model = merged
            try:
                t0 = time.monotonic()
                res = evaluate(model, o, [str(f) for f in files], limit=None, user_harmful=None,
                               settings=GenerationSettings(max_new_tokens=sz.max_new_tokens),
                               batch_size=sz.eval_batch, device=self.args.device,
                               dtype="float32", utility=True,
                               utility_file=self.data / "reference.jsonl",
                               utility_max_tokens=sz.reference_tokens, label=tag,
                               progress=not self.args.quiet)
                extra["eval_s"] = round(time.monotonic() - t0, 1)
            finally:
                shutil.rmtree(merged, ignore_errors=True)
            (o / "point.json").write_text(json.dumps(extra, indent=1, default=str) + "\n")

        self.step(stage, tag, inputs, ev_dir, run)
        p = json.loads((ev_dir / "point.json").read_text())
        ev = json.loads((ev_dir / "results.json").read_text())
        records = self.rejudge(ev["records"])
        self.verdicts[str(ev_dir)] = records
        p["metrics"] = point_metrics(records, ev.get("utility"))
        p["judge"] = f"{self.judge.name} {self.judge.version}"
        m = self.runner.read_manifest(stage, tag) or {}
        return {"stage": split, "seed": None if pt["engine"] == "backbone" else seed,
                "point": pt["name"], "method": pt["method"], "group": GROUP[pt["method"]],
                "se_patch": pt["se"], "saliency": pt["saliency"], "params": pt["params"],
                **{k: v for k, v in p["metrics"].items()}, "judge": p["judge"],
                "merge_s": p.get("merge_s"), "eval_s": p.get("eval_s"),
                "step_s": m.get("seconds"), "step_cpu_s": m.get("cpu_seconds"),
                "finished": m.get("finished"), "eval_dir": str(ev_dir)}

    def rejudge(self, records: list[dict]) -> list[dict]:
        """The records with `outcome` from the current judge (prompt kind given)."""
        verdicts = self.judge.judge_batch([r["prompt"] for r in records],
                                          [r["completion"] for r in records],
                                          [r["harmful"] for r in records])
        return [{**r, "outcome": v.outcome, "refusal_kind": v.refusal_kind}
                for r, v in zip(records, verdicts)]

    # ------------------------------------------------------------------ run
    def run(self) -> None:
        self.rows: list[dict] = []
        if (n := self.drop_judge_from_keys()):
            log.info("%d evaluation manifests keyed on a judge: key recomputed without it", n)
        self.meta["fingerprints"] = self.fingerprints()
        self.meta["judge"] = f"{self.judge.name} {self.judge.version}"
        self.stage_data()
        stages = set(self.args.stages)
        if "report" in stages:  # collect every finished step, start none
            stages, self.deadline = {"screen", "confirm"}, self.t0
        grid = fg.grid(with_ga=not self.args.no_ga)
        if self.args.points:
            want = set(self.args.points)
            unknown = want - {p["name"] for p in grid}
            if unknown:
                raise SystemExit(f"unknown points: {', '.join(sorted(unknown))}")
            grid = [p for p in grid if p["name"] in want or p["engine"] == "backbone"]
        setups: dict[int, dict] = {}
        if "screen" in stages:
            for seed in [s for s in self.args.seeds if s in self.args.screen_seeds]:
                try:
                    setups[seed] = self.stage_setup(seed)
                except BudgetExceeded:
                    continue
                for pt in grid:
                    if pt["se"] == "ga" and "ga" not in setups[seed]["patches"]:
                        continue
                    self._point("03-screen", seed, pt, setups[seed])
        if "confirm" in stages:
            self.stage_confirm(grid, setups)
        if self.stopped_by_budget and "report" in self.args.stages:
            log.info("report only: unfinished steps were left for a later run")
        elif self.stopped_by_budget:
            log.info("--max-minutes %s reached: no new step was started after it; rerun the "
                     "same command to go on", self.args.max_minutes)
        self.write_outputs()

    def _point(self, stage: str, seed: int, pt: dict, setup: dict) -> None:
        key = ("screen" if stage == "03-screen" else "test",
               None if pt["engine"] == "backbone" else seed, pt["name"])
        if any((r["stage"], r["seed"], r["point"]) == key for r in self.rows):
            return
        try:
            self.rows.append(self.eval_point(stage, seed, pt, setup))
        except BudgetExceeded:
            return  # finished points after this one are still collected
        except Exception as e:  # one failed point must not cost the others
            log.exception("point %s (seed %s) failed", pt["name"], seed)
            self.meta.setdefault("failed", {})[f"{stage}/s{seed}/{pt['name']}"] = \
                f"{type(e).__name__}: {e}"
        self.write_outputs()

    def stage_confirm(self, grid: list[dict], setups: dict) -> None:
        by_name = {p["name"]: p for p in grid}
        chosen_from = {}
        for seed in self.args.seeds:
            src = seed if seed in self.args.screen_seeds else self.args.screen_seeds[0]
            rows = [r for r in self.rows if r["stage"] == "screen" and r["seed"] in (src, None)]
            done = {r["point"] for r in rows}
            todo = [p["name"] for p in grid if p["name"] not in done
                    and not (p["se"] == "ga" and src != 0)]
            if todo:
                log.info("confirm seed %d: the screen of seed %d is incomplete (%d points "
                         "left); not confirming", seed, src, len(todo))
                continue
            names = select_confirm(rows, self.sz.front_safepatch, self.sz.front_baseline)
            chosen_from[seed] = {"screen_seed": src, "points": names}
            if seed not in setups:
                try:
                    setups[seed] = self.stage_setup(seed)
                except BudgetExceeded:
                    continue
            for n in ["backbone"] + names:
                pt = by_name[n]
                if pt["se"] == "ga" and "ga" not in setups[seed]["patches"]:
                    continue
                self._point("04-confirm", seed, pt, setups[seed])
        self.meta["confirm_selection"] = chosen_from

    # ------------------------------------------------------------------ outputs
    def write_outputs(self) -> None:
        from frontier_report import write_report

        res = self.results
        res.mkdir(parents=True, exist_ok=True)
        rows = sorted(self.rows, key=lambda r: (r["stage"], -1 if r["seed"] is None
                                                else r["seed"]))
        tmp = res / "points.jsonl.partial"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if k != "eval_dir"},
                                   ensure_ascii=False) + "\n")
        tmp.replace(res / "points.jsonl")
        tmp = res / "completions.jsonl.gz.partial"
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            for r in rows:
                for c in self.verdicts[r["eval_dir"]]:
                    f.write(json.dumps({"stage": r["stage"], "seed": r["seed"],
                                        "point": r["point"], **{k: c.get(k) for k in (
                                            "suite", "id", "harmful", "prompt", "completion",
                                            "n_new_tokens", "hit_eos", "outcome")}},
                                       ensure_ascii=False) + "\n")
        tmp.replace(res / "completions.jsonl.gz")
        self.meta["timings"] = self.timings
        self.meta["wall_time_s"] = round(time.monotonic() - self.t0, 1)
        self.meta["stopped_by_budget"] = self.stopped_by_budget
        (res / "meta.json").write_text(json.dumps(self.meta, indent=1, default=str) + "\n")
        write_report(rows, self.meta, res)


def select_confirm(rows: list[dict], k_sp: int, k_base: int) -> list[str]:
    """The point names a seed confirms: per group, the kept-utility Pareto front of the
    screened rows (harmful compliance, XSTest over-refusal), thinned to k_sp points for
    SafePatching and k_base for each baseline; then the toolkit's default configuration if it
    was screened and is not among them (what a user gets unconfigured is always reported)."""
    base = next((r for r in rows if r["group"] == "backbone"), None)
    if base is None:
        return []
    bu = {"perplexity": base["perplexity"], "alpaca_refusal": base["alpaca_refusal"]["rate"]}
    names = []
    for group in dict.fromkeys(GROUP.values()):
        if group == "backbone":
            continue
        pts = [{"name": r["point"], "harm": r["harmful_compliance"]["rate"],
                "over": r["xstest_over_refusal"]["rate"]} for r in rows
               if r["group"] == group and fa.kept_utility(
                   {"perplexity": r["perplexity"], "alpaca_refusal": r["alpaca_refusal"]["rate"]},
                   bu)]
        k = k_sp if group == "safepatch" else k_base
        names += [p["name"] for p in fa.thin(fa.front(pts), k)]
    default = fg.default_point()["name"]
    if default not in names and any(r["point"] == default for r in rows):
        names.append(default)
    return names


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--se-run", required=True,
                    help="the --out of an se_objectives.py run (backbone, NPO/GA patches, data); "
                         "only read")
    ap.add_argument("--data-dir", required=True,
                    help="the public data folder (eval/alpaca_harmless_test.json)")
    ap.add_argument("--out", default="experiments/runs/frontier",
                    help="work directory (cached, resumable steps; ~3 GB of patches and scores "
                         "a seed)")
    ap.add_argument("--results-dir", help="points, completions, table, plot (default OUT/final)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--screen-seeds", type=int, nargs="+", default=[0],
                    help="seeds whose whole grid is screened (default 0: the budget mode)")
    ap.add_argument("--stages", nargs="+", choices=("screen", "confirm", "report"),
                    default=["screen", "confirm"],
                    help="report: start no step, rebuild the report from finished ones")
    ap.add_argument("--points", nargs="+", help="only these grid points (and the backbone)")
    ap.add_argument("--no-ga", action="store_true", help="leave out the GA SE patch's points")
    ap.add_argument("--max-minutes", type=float,
                    help="start no new step after this many minutes (a step takes <= ~12 min)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--force", action="store_true", help="redo every step")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    if not set(a.screen_seeds) <= set(a.seeds):
        ap.error("--screen-seeds must be among --seeds")
    return a


def main(argv=None) -> int:
    # no JIT extension build inside a timed run (set here, not at import: tests import this)
    os.environ.setdefault("SAFEPATCH_NO_EXT", "1")
    os.environ.setdefault("SAFEPATCH_CLASSIC_COMPILE", "0")
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("SAFEPATCH_MERGE_THREADS", str(args.threads))
    out = Path(args.out).resolve()
    if Path(args.se_run).resolve() in (out, *out.parents):
        raise SystemExit("--out must not lie inside --se-run (it is only read)")
    setup_logging(out / "run.log")
    study = Study(args, PRESETS[args.preset])
    try:
        study.run()
    finally:
        copy_log(out / "run.log", study.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
