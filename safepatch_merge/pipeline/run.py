"""`run_pipeline`: the Python twin of `safepatch run CONFIG.yaml OUT_DIR`.

For every stage (continual patching: stage k+1's backbone is stage k's patched model):
derive the SE patch (gradient ascent) and the OSM patch (gradient descent) on the stage's
harmful data, score both (SNIP), merge them into the backbone (SafePatching), evaluate the
patched model. The first backbone is evaluated once before stage 1. Each step is skipped on a
rerun when its inputs and options are unchanged (see stages.py).

Layout of OUT_DIR::

    run.json                        what this invocation did (per step: ran/skipped, seconds)
    config.resolved.json            the validated config, every default filled in
    backbone_eval/                  eval of the first backbone (results.json, results.md)
    stages/NN-NAME/{patch_se,patch_osm,scores_se,scores_osm,model,eval}/
    stages/NN-NAME/stage.json       the stage's backbone (path + identity) and step keys
    manifests/NN-NAME/<step>.json   one manifest per finished step
    report/compare.{md,png}         backbone and every stage side by side
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from ..config_fields import yaml_values
from ..errors import ConfigError
from ..devices import resolve_device
from ..eval.config import EvalConfig
from ..io.atomic import write_atomic
from .config import RunConfig, load_run_config, merge_config_dict, parse_run_config
from .stages import StepRunner, dir_fingerprint, file_identity

log = logging.getLogger("safepatch_merge.pipeline")
RUN_FORMAT = "safepatch-run"


def _eval_step(runner: StepRunner, stage: str, model: Path, model_id: str, ev: EvalConfig,
               dedup_files: list[str], out: Path, device: str, label: str, progress: bool):
    from ..eval.judge_models import judge_identity
    from ..eval.run import evaluate

    dedup = dedup_files if ev.dedup else []
    # the judge is part of the key: a new judge re-evaluates rather than mixing verdicts
    inputs = {"model": model_id, "eval": yaml_values(ev), "device": device,
              "judge": judge_identity(), "dedup": [[f, file_identity(f)] for f in dedup]}

    def fn(o: Path) -> dict:
        kwargs = replace(ev, device=device, dedup_against=dedup, label=label).evaluate_kwargs()
        res = evaluate(model, o, **kwargs, progress=progress)
        return {"headline": res["headline"],
                "utility_perplexity": (res.get("utility") or {}).get("perplexity")}

    return runner.run(stage, "eval", inputs, out, fn)


def run_pipeline(config: str | Path | dict | RunConfig, out_dir: str | Path, *,
                 force: bool = False, progress: bool = True, log_fn=None) -> dict:
    """Run (or resume) every stage of `config` into `out_dir`; returns the run record (also
    written to OUT_DIR/run.json): {"steps": [...], "stages": [{name, backbone, model, eval}],
    "final_model": PATH, "report": {...}}.

    config: YAML path, mapping, or parsed RunConfig. force: rerun every step even when its
    manifest says it is up to date. Steps are atomic: an interrupted run leaves no manifest
    for the step it was in, and the next invocation redoes only that step and what follows.
    """
    from ..derive.train import derive_patch
    from ..merge import merge
    from ..score.api import score_patch

    cfg = config if isinstance(config, RunConfig) else (
        load_run_config(config) if isinstance(config, (str, Path)) else parse_run_config(config))
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory")
    backbone = Path(cfg.backbone)
    if not (backbone / "config.json").is_file():
        raise ConfigError(f"backbone {backbone}: not a model directory (no config.json)")
    for st in cfg.stages:
        for f in st.training_files():
            if not Path(f).is_file():
                raise ConfigError(f"stage {st.name}: data file not found: {f}")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.resolved.json",
                 json.dumps(cfg.summary(), indent=1, default=str) + "\n")
    say = log_fn or (lambda m: log.info("%s", m))
    runner = StepRunner(out / "manifests", force=force, log=say)
    device = str(resolve_device(cfg.device))
    all_data = list(dict.fromkeys(f for st in cfg.stages for f in st.training_files()))
    record: dict = {"format": RUN_FORMAT, "version": 1, "out": str(out), "stages": []}

    bb_path, bb_id = backbone, dir_fingerprint(backbone)
    first_ev = cfg.stages[0].eval
    if first_ev.enabled and first_ev.backbone:
        o = _eval_step(runner, "00-backbone", bb_path, bb_id, first_ev, all_data,
                       out / "backbone_eval", device, "backbone", progress)
        record["backbone_eval"] = o.output
    for i, st in enumerate(cfg.stages, 1):
        sid = f"{i:02d}-{st.name}"
        sdir = out / "stages" / sid
        data_id = file_identity(st.data)
        patch, scores = {}, {}
        for side in ("se", "osm"):
            dc = st.derive[side]
            train_data = st.train_data(side)
            side_files = {f: file_identity(f) for f in [train_data] + [
                getattr(dc, k) for k in ("retain_data", "calib_prompts", "calib_reference")
                if getattr(dc, k)]}

            def do_derive(o: Path, dc=dc, train_data=train_data) -> dict:
                rec = derive_patch(bb_path, train_data, o, dc, overwrite=True, progress=progress)
                return {k: rec[k] for k in ("steps", "stop_reason", "stop_rule",
                                            "initial_heldout_nll", "final_heldout_nll",
                                            "final_train_nll")}

            patch[side] = runner.run(sid, f"derive_{side}", {
                "backbone": bb_id, "data": data_id,
                "files": side_files, "derive": asdict(dc)},
                sdir / f"patch_{side}", do_derive)
        for side in ("se", "osm"):
            sc = st.score[side]

            # An on-policy patch is scored on the D_h it was derived from (its own answers).
            on_policy = sdir / f"patch_{side}" / "on_policy" / "on_policy_pairs.jsonl"
            score_data = on_policy if st.derive[side].on_policy else st.data

            def do_score(o: Path, sc=sc, side=side, score_data=score_data) -> dict:
                info = score_patch(sdir / f"patch_{side}", o, score_data, bb_path, sc,
                                   overwrite=True, progress=progress)
                return {"num_batches": info.get("num_batches"), "tensors": info.get("tensors")}

            scores[side] = runner.run(sid, f"score_{side}", {
                "patch": patch[side].output_id, "backbone": bb_id, "data": data_id,
                "score": asdict(sc)}, sdir / f"scores_{side}", do_score)
        ms = st.merge
        mcfg = merge_config_dict(ms, str(bb_path),
                                 {s: str(sdir / f"patch_{s}") for s in ("se", "osm")},
                                 {s: str(sdir / f"scores_{s}") for s in ("se", "osm")})
        mdev = ms.get("device") or ("cuda" if device == "cuda" else "cpu")

        def do_merge(o: Path) -> dict:
            res = merge(mcfg, o, backend=ms.get("backend"), device=mdev,
                        max_memory=ms.get("max_memory"), overwrite=True, progress=progress)
            return {"summary": res.summary, "seconds": res.seconds}

        merged = runner.run(sid, "merge", {
            "backbone": bb_id, "patches": {s: patch[s].output_id for s in patch},
            "scores": {s: scores[s].output_id for s in scores},
            "merge": {k: v for k, v in ms.items() if k not in ("device", "backend",
                                                              "max_memory")}},
            sdir / "model", do_merge)
        stage_rec = {"name": st.name, "id": sid, "data": st.data, "data_sha256": data_id,
                     "training_files": st.training_files(),
                     "objectives": {s: st.derive[s].objective for s in st.derive},
                     "backbone": str(bb_path), "backbone_id": bb_id,
                     "backbone_from": "config" if i == 1 else f"stage {cfg.stages[i - 2].name}",
                     "patches": {s: str(sdir / f"patch_{s}") for s in patch},
                     "scores": {s: str(sdir / f"scores_{s}") for s in scores},
                     "model": merged.output, "model_id": merged.output_id,
                     "steps": {o.step: o.key for o in runner.outcomes if o.stage == sid}}
        if st.eval.enabled:
            ev = _eval_step(runner, sid, Path(merged.output), merged.output_id, st.eval,
                            all_data, sdir / "eval", device, st.name, progress)
            stage_rec["eval"] = ev.output
            stage_rec["steps"]["eval"] = ev.key
        write_atomic(sdir / "stage.json", json.dumps(stage_rec, indent=1) + "\n")
        record["stages"].append(stage_rec)
        bb_path, bb_id = Path(merged.output), merged.output_id  # continual: next backbone

    record["final_model"] = str(bb_path)
    results = ([record["backbone_eval"]] if "backbone_eval" in record else []) + \
        [s["eval"] for s in record["stages"] if "eval" in s]
    labels = (["backbone"] if "backbone_eval" in record else []) + \
        [s["name"] for s in record["stages"] if "eval" in s]
    if results:
        from ..eval.report import compare

        rep = compare(results, out / "report", labels)
        record["report"] = {k: str(v) for k, v in rep.items()}
    record["steps"] = [o.as_dict() for o in runner.outcomes]
    write_atomic(out / "run.json", json.dumps(record, indent=1, default=str) + "\n")
    return record
