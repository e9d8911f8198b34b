"""`sweep`: the Python twin of `safepatch sweep` — a grid over top rates, scales and retention
from existing patches and scores (merges only, no gradients), each point evaluated on small
prompt subsets, with a table and a trade-off plot marking the Pareto front.

Each point is a SafePatching merge into POINT/model followed by an evaluation into
POINT/eval; both are steps with manifests (pipeline/stages.py), so an interrupted or extended
sweep redoes only the missing points. The evaluation's key depends on the merge's key (not on
the merged files), so the merged models can be deleted after evaluation (the default) and a
rerun still skips finished points. The merge engine reads each score directory's digit-0
histograms (histograms.safetensors) instead of recomputing them, so a point costs one
threshold-refinement pass over the scores per patch plus one streaming merge pass.

Outputs in OUT: sweep.csv, sweep.md (one row per point, Pareto-optimal points marked),
sweep.png (compliance on harmful prompts vs over-refusal on XSTest safe prompts, utility
perplexity as colour, the Pareto front drawn), sweep.json, points/<id>/{eval,model}.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from ..errors import ConfigError, DataError
from ..io.atomic import write_atomic
from .stages import StepRunner, canonical_hash, dir_fingerprint, file_identity
from .sweep_config import SweepConfig


def from_run(run_dir: str | Path, stage: str | None = None) -> dict:
    """Backbone, patch, score and data paths of one stage of a `safepatch run` directory
    (default: the last stage), as SweepConfig keyword arguments."""
    p = Path(run_dir) / "run.json"
    try:
        rec = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        raise DataError(f"{p}: not a finished `safepatch run` directory (no readable run.json)"
                        ) from None
    stages = rec.get("stages") or []
    if not stages:
        raise DataError(f"{p}: the run has no finished stage")
    if stage is None:
        st = stages[-1]
    else:
        found = [s for s in stages if stage in (s["name"], s["id"])]
        if not found:
            raise ConfigError(f"{p}: no stage {stage!r} (stages: "
                              f"{', '.join(s['name'] for s in stages)})")
        st = found[0]
    return {"backbone": st["backbone"], "patch_se": st["patches"]["se"],
            "patch_osm": st["patches"]["osm"], "scores_se": st["scores"]["se"],
            "scores_osm": st["scores"]["osm"],
            "dedup_against": list(dict.fromkeys(
                f for s in stages for f in s.get("training_files", [s["data"]])))}


def point_label(pt: dict) -> str:
    return (f"a={pt['top_rate_se']:g} b={pt['top_rate_osm']:g} α={pt['alpha']:g} "
            f"β={pt['beta']:g}" + (f" p={pt['retention']:g}" if pt["retention"] != 1 else ""))


def pareto_front(xs: list[float], ys: list[float]) -> list[bool]:
    """Pareto-optimal flags for minimising both x and y: a point is on the front unless
    another is no worse in both and strictly better in one. NaN coordinates are never on it."""
    flags = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x != x or y != y:
            flags.append(False)
            continue
        dominated = any(j != i and xj <= x and yj <= y and (xj < x or yj < y)
                        for j, (xj, yj) in enumerate(zip(xs, ys)) if xj == xj and yj == yj)
        flags.append(not dominated)
    return flags


def _merge_cfg(cfg: SweepConfig, pt: dict) -> dict:
    patches = {s: p for s, p in (("se", cfg.patch_se), ("osm", cfg.patch_osm)) if p}
    scores = {s: p for s, p in (("se", cfg.scores_se), ("osm", cfg.scores_osm)) if p}
    return {"method": "safepatch", "backbone": cfg.backbone, "patches": patches,
            "scores": scores, "output": {"dtype": cfg.output_dtype},
            "parameters": {**pt, "mask_mode": cfg.mask_mode, "granularity": cfg.granularity,
                           "seed": cfg.seed}}


def _eval_kwargs(cfg: SweepConfig) -> dict:
    from ..eval.judge_models import judge_identity

    # the judge is part of the key: a new judge re-evaluates rather than mixing verdicts
    return {"judge": judge_identity(), "suites": list(cfg.suites), "limit": cfg.limit,
            "subset_seed": cfg.subset_seed,
            "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
            "utility": cfg.utility, "utility_limit": cfg.utility_limit,
            "utility_max_tokens": cfg.utility_max_tokens, "device": cfg.device,
            "dtype": cfg.dtype,
            "dedup_against": [[f, file_identity(f)] for f in cfg.dedup_against]}


def _evaluate(model: Path, out: Path, cfg: SweepConfig, label: str, progress: bool) -> dict:
    from ..eval.generate import GenerationSettings
    from ..eval.run import evaluate

    res = evaluate(model, out, cfg.suites, limit=cfg.limit, subset_seed=cfg.subset_seed,
                   dedup_against=cfg.dedup_against,
                   settings=GenerationSettings(max_new_tokens=cfg.max_new_tokens),
                   batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
                   utility=cfg.utility, utility_limit=cfg.utility_limit,
                   utility_max_tokens=cfg.utility_max_tokens, label=label, progress=progress)
    return {"headline": res["headline"], "utility": res.get("utility")}


def _row(pid: str, pt: dict | None, res: dict, merge_summary: dict | None) -> dict:
    h = res["headline"]
    u = res.get("utility") or {}
    sel = (merge_summary or {}).get("selection") or {}
    row = {"id": pid, **(pt or {"top_rate_se": None, "top_rate_osm": None, "alpha": None,
                                 "beta": None, "retention": None})}
    for key, name in (("harmful_compliance", "harmful"), ("xstest_over_refusal", "over_refusal"),
                      ("xstest_non_answer", "non_answer"), ("degeneration", "degeneration")):
        # results written before non-answers existed have no xstest_non_answer
        r = h.get(key) or {"rate": None, "ci95": [None, None], "n": 0}
        row[name] = r["rate"]
        row[f"{name}_lo"], row[f"{name}_hi"] = r["ci95"]
        row[f"{name}_n"] = r["n"]
    row["utility_ppl"] = u.get("perplexity")
    row["density_se"] = (sel.get("se") or {}).get("density")
    row["density_osm"] = (sel.get("osm") or {}).get("density")
    return row


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def _table(rows: list[dict]) -> str:
    def pct(r, k):
        if r.get(k) is None:
            return "–"
        return f"{100 * r[k]:.1f} [{100 * r[k + '_lo']:.1f}, {100 * r[k + '_hi']:.1f}]"

    lines = ["| point | a (SE) | b (OSM) | α | β | p | compliance on harmful, % | "
             "over-refusal XSTest, % | of which non-answers, % | degeneration, % | utility ppl | "
             "Pareto |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k: "–" if r[k] is None else f"{r[k]:g}"  # noqa: E731
        lines.append(f"| {r['id']} | {f('top_rate_se')} | {f('top_rate_osm')} | {f('alpha')} | "
                     f"{f('beta')} | {f('retention')} | {pct(r, 'harmful')} | "
                     f"{pct(r, 'over_refusal')} | {pct(r, 'non_answer')} | "
                     f"{pct(r, 'degeneration')} | "
                     f"{'–' if r['utility_ppl'] is None else format(r['utility_ppl'], '.2f')} | "
                     f"{'★' if r['pareto'] else ''} |")
    n_h, n_o = rows[0]["harmful_n"], rows[0]["over_refusal_n"]
    lines.append("")
    lines.append(f"n = {n_h} harmful prompts, {n_o} XSTest safe prompts per point; 95% Wilson "
                 "intervals in brackets; over-refusal counts refusals and non-answers; ★ = "
                 "Pareto-optimal (lower compliance and lower over-refusal)" + (", backbone included as a reference point."
                                    if rows[0]["id"] == "backbone" else "."))
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Scatter: x = over-refusal on XSTest safe prompts (%), y = compliance on harmful prompts
    (%), colour = utility perplexity; Pareto-optimal points ringed and joined by the front;
    the backbone as a star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    pts = [r for r in rows if r["id"] != "backbone"]
    xs = [100 * _nan(r["over_refusal"]) for r in pts]
    ys = [100 * _nan(r["harmful"]) for r in pts]
    cs = [_nan(r["utility_ppl"]) for r in pts]
    have_c = any(c == c for c in cs)
    colour = {"c": cs, "cmap": "viridis_r"} if have_c else {"color": "tab:blue"}
    sc = ax.scatter(xs, ys, s=36, edgecolors="k", linewidths=0.4, zorder=3, **colour)
    if have_c:
        fig.colorbar(sc, ax=ax, label="utility: reference perplexity (lower is better)")
    front = sorted((100 * _nan(r["over_refusal"]), 100 * _nan(r["harmful"]))
                   for r in rows if r["pareto"])
    if front:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="tab:red", lw=1.2, zorder=2, label="Pareto front")
        ax.scatter(fx, fy, s=130, facecolors="none", edgecolors="tab:red", lw=1.2, zorder=4)
    for r in rows:
        if r["id"] == "backbone":
            ax.scatter([100 * _nan(r["over_refusal"])], [100 * _nan(r["harmful"])], marker="*",
                       s=160, color="tab:orange", edgecolors="k", zorder=5, label="backbone")
    for r, x, y in zip(pts, xs, ys):
        if r["pareto"]:
            ax.annotate(point_label(r), (x, y), textcoords="offset points", xytext=(5, 4),
                        fontsize=7)
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("over-refusal on XSTest safe prompts (%)")
    ax.set_ylabel("compliance on harmful prompts (%)")
    ax.set_title(title or "SafePatching sweep (lower-left is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(path, png.getvalue())


def sweep(cfg: SweepConfig, out_dir: str | Path, *, progress: bool = True, log_fn=print
          ) -> dict:
    """Merge and evaluate every grid point of `cfg` into `out_dir`; returns {"rows", "table",
    "csv", "plot", "points", "ran" (ids of the points merged and evaluated now)}. Finished points (by manifest) are skipped on a rerun."""
    from ..merge import merge
    from ..merge.config import parse_config

    pts = cfg.grid()
    for k in ("backbone", "patch_se", "patch_osm", "scores_se", "scores_osm"):
        v = getattr(cfg, k)
        if v is not None and not Path(v).is_dir():
            raise ConfigError(f"{k}: directory not found: {v}")
    if not cfg.patch_se and not cfg.patch_osm:
        raise ConfigError("give at least one of patch_se and patch_osm")
    for f in cfg.dedup_against:
        if not Path(f).is_file():
            raise ConfigError(f"dedup_against: file not found: {f}")
    parse_config(_merge_cfg(cfg, pts[0]))  # fail fast on a bad option, before any work
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = StepRunner(out / "manifests", log=log_fn)
    ids = {k: dir_fingerprint(getattr(cfg, k)) for k in
           ("backbone", "patch_se", "patch_osm", "scores_se", "scores_osm") if getattr(cfg, k)}
    evkw = _eval_kwargs(cfg)
    rows, ran = [], []
    if cfg.eval_backbone:
        o = runner.run("backbone", "eval", {"model": ids["backbone"], "eval": evkw},
                       out / "backbone_eval",
                       lambda d: _evaluate(Path(cfg.backbone), d, cfg, "backbone", progress))
        rows.append(_row("backbone", None, json.loads(
            (out / "manifests/backbone/eval.json").read_text())["result"], None))
        del o
    from tqdm.auto import tqdm

    for pt in tqdm(pts, desc="sweep", unit="point", disable=not progress):
        mcfg = _merge_cfg(cfg, pt)
        minputs = {"inputs": ids, "merge": {k: v for k, v in mcfg.items()
                                            if k not in ("backbone", "patches", "scores")}}
        pid = canonical_hash(minputs)[:10]
        pdir = out / "points" / pid
        mkey = canonical_hash(minputs)
        einputs = {"merge": mkey, "eval": evkw}
        eman = runner.read_manifest(f"points/{pid}", "eval")
        fresh = eman is not None and eman.get("key") == canonical_hash(einputs) and \
            (pdir / "eval").is_dir() and dir_fingerprint(pdir / "eval") == eman.get("output_id")
        if not fresh:
            ran.append(pid)

            def do_merge(o: Path) -> dict:
                res = merge(mcfg, o, backend=cfg.backend, device=cfg.merge_device,
                            max_memory=cfg.max_memory, overwrite=True, progress=False)
                return {"summary": res.summary, "seconds": res.seconds}

            if not (pdir / "model").is_dir():
                # a deleted model means its manifest is stale too
                (runner.manifest_path(f"points/{pid}", "merge")).unlink(missing_ok=True)
            runner.run(f"points/{pid}", "merge", minputs, pdir / "model", do_merge)
            runner.run(f"points/{pid}", "eval", einputs, pdir / "eval",
                       lambda d: _evaluate(pdir / "model", d, cfg, point_label(pt), progress))
        else:
            log_fn(f"[points/{pid}] up to date, skipped")
        if not cfg.keep_models and (pdir / "model").is_dir():
            shutil.rmtree(pdir / "model")
        mres = runner.read_manifest(f"points/{pid}", "merge")
        eres = runner.read_manifest(f"points/{pid}", "eval")["result"]
        rows.append(_row(pid, pt, eres, (mres or {}).get("result", {}).get("summary")))
    flags = pareto_front([_nan(r["over_refusal"]) for r in rows], [_nan(r["harmful"]) for r in rows])
    for r, f in zip(rows, flags):
        r["pareto"] = f
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / "sweep.csv", buf.getvalue())
    table = _table(rows)
    write_atomic(out / "sweep.md", table)
    plot_tradeoff(rows, out / "sweep.png")
    doc = {"config": asdict(cfg), "rows": rows}
    write_atomic(out / "sweep.json", json.dumps(doc, indent=1, default=str) + "\n")
    return {"rows": rows, "table": table, "csv": str(out / "sweep.csv"),
            "plot": str(out / "sweep.png"), "points": len(pts), "ran": ran}
