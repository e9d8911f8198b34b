"""table.md, fronts.png and comparisons.json of the frontier study from its point rows
(frontier.py's points.jsonl): per split and seed, every point's metrics, each method's
kept-utility front, hypervolumes, and on the test split the matched comparison of
SafePatching's front with each baseline front (frontier_analysis).

    python experiments/frontier_report.py experiments/results/frontier   # again from the files
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import frontier_analysis as fa  # noqa: E402

GROUPS = ["safepatch", "osm_scale", "se_scale", "task_arithmetic", "ties", "intersection"]
COLORS = {"safepatch": "tab:red", "osm_scale": "tab:blue", "se_scale": "tab:orange",
          "task_arithmetic": "tab:green", "ties": "tab:purple", "intersection": "tab:brown"}


def _pct(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "–"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _params(r: dict) -> str:
    p = r.get("params") or {}
    return ", ".join(f"{k}={v}" for k, v in p.items())


def annotate(rows: list[dict]) -> dict:
    """Per (split, seed): the backbone row, each row's kept-utility flag and each group's front
    (the backbone is a member of every group: doing nothing is open to every method).
    Returns {(split, seed): {"backbone": row, "points": [{...row, harm, over, kept}],
    "fronts": {group: [points]}}}."""
    out = {}
    for split in ("screen", "test"):
        srows = [r for r in rows if r["stage"] == split]
        base = next((r for r in srows if r["group"] == "backbone"), None)
        if base is None:
            continue
        bu = {"perplexity": base["perplexity"], "alpaca_refusal": base["alpaca_refusal"]["rate"]}
        for seed in sorted({r["seed"] for r in srows if r["seed"] is not None}):
            pts = []
            for r in [base] + [r for r in srows if r["seed"] == seed]:
                u = {"perplexity": r["perplexity"], "alpaca_refusal": r["alpaca_refusal"]["rate"]}
                pts.append({**r, "harm": r["harmful_compliance"]["rate"],
                            "over": r["xstest_over_refusal"]["rate"],
                            "kept": r is base or fa.kept_utility(u, bu),
                            "ppl_ratio": (r["perplexity"] / base["perplexity"]
                                          if r["perplexity"] and base["perplexity"] else None)})
            fronts = {g: fa.front([p for p in pts if p["kept"] and p["group"] in (g, "backbone")])
                      for g in GROUPS}
            out[(split, seed)] = {"backbone": pts[0], "points": pts, "fronts": fronts}
    return out


def matched(ann: dict, n_perm: int = 10000) -> dict:
    """Test split: for each seed and SafePatching front point (not the backbone), each baseline
    front's over-refusal interpolated at its harmful compliance, the difference (baseline −
    SafePatching, in rate units; > 0: SafePatching refuses fewer safe prompts) and its paired
    sign-flip p over the XSTest prompts; pooled per baseline over seeds (per prompt, the mean
    difference over that seed's covered front points; the test on all (seed, prompt) pairs)."""
    res = {"per_point": [], "pooled": {}}
    pooled: dict[str, list[float]] = {g: [] for g in GROUPS if g != "safepatch"}
    for (split, seed), a in sorted(ann.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if split != "test":
            continue
        sp = [p for p in a["fronts"]["safepatch"] if p["group"] != "backbone"]
        per_prompt: dict[str, dict[str, list[float]]] = {g: {} for g in pooled}
        for p in sp:
            for g in pooled:
                fr = a["fronts"][g]
                b = fa.bracket(fr, p["harm"])
                entry = {"seed": seed, "point": p["point"], "harm": p["harm"],
                         "over": p["over"], "baseline": g}
                if b is None:
                    res["per_point"].append({**entry, "covered": False,
                                             "baseline_range": [fr[0]["harm"], fr[-1]["harm"]]
                                             if fr else None})
                    continue
                i, j, w = b
                ids = sorted(set(p["xstest_flags"]) & set(fr[i]["xstest_flags"])
                             & set(fr[j]["xstest_flags"]))
                interp = fa.interpolate_prompts([fr[i]["xstest_flags"][k] for k in ids],
                                                [fr[j]["xstest_flags"][k] for k in ids], w)
                d = [v - float(p["xstest_flags"][k]) for v, k in zip(interp, ids)]
                for k, v in zip(ids, d):
                    per_prompt[g].setdefault(k, []).append(v)
                res["per_point"].append({**entry, "covered": True,
                                         "baseline_over": sum(interp) / len(ids),
                                         "diff": sum(d) / len(d), "n": len(ids),
                                         "between": [fr[i]["point"], fr[j]["point"]], "w": w,
                                         "p": fa.sign_flip_test(d, n_perm, seed=0)})
        for g, m in per_prompt.items():
            pooled[g] += [sum(v) / len(v) for v in m.values()]
    for g, d in pooled.items():
        res["pooled"][g] = {"n": len(d), "diff": sum(d) / len(d) if d else None,
                            "p": fa.sign_flip_test(d, n_perm, seed=0) if d else None}
    return res


def markdown(rows: list[dict], meta: dict, ann: dict, cmp: dict | None) -> str:
    env = meta.get("environment", {})
    lines = ["# Frontier study: results so far", "",
             f"Command: `{meta.get('command')}`  ",
             f"Commit {env.get('commit')}{' (dirty tree)' if env.get('dirty') else ''}; "
             f"{env.get('cpu')} ({env.get('cpu_count')} CPUs), torch {env.get('torch')} with "
             f"{env.get('torch_threads')} thread(s), transformers {env.get('transformers')}; "
             f"preset `{meta.get('preset')}`; wall time of the last invocation "
             f"{meta.get('wall_time_s')} s"
             f"{' (stopped by --max-minutes)' if meta.get('stopped_by_budget') else ''}.", "",
             "Rates in % with 95 % Wilson intervals; harmful = HarmBench test + StrongREJECT "
             "compliance; over-refusal = XSTest safe prompts answered with a refusal or a "
             "non-answer; Alpaca = refusal + non-answer on benign Alpaca instructions; "
             "perplexity of the benign reference answers (× the backbone's). Kept utility: "
             "perplexity ≤ 1.1× and Alpaca ≤ the backbone's + 5 points. Front: on the "
             "kept-utility Pareto front of its method (the backbone belongs to every front).",
             ""]
    for (split, seed), a in sorted(ann.items(), key=lambda kv: (kv[0][0] != "screen", kv[0][1])):
        b = a["points"][0]
        lines += [f"## {split} prompts, seed {seed}", "",
                  f"n = {b['harmful_compliance']['n']} harmful, {b['xstest_over_refusal']['n']} "
                  f"XSTest, {b['alpaca_refusal']['n']} Alpaca per point.", "",
                  "| point | method | harmful | XSTest over-refusal | XSTest non-answer | "
                  "harmful non-answer | Alpaca | perplexity | kept | front | s (merge + eval) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        on = {id(p) for g in a["fronts"].values() for p in g}
        for p in a["points"]:
            ppl = "–" if p["perplexity"] is None else f"{p['perplexity']:.2f}" + (
                "" if p["group"] == "backbone" else f" ({p['ppl_ratio']:.2f}×)")
            secs = p.get("step_s")
            lines.append(
                f"| {p['point']} | {p['method']} | {_pct(p['harmful_compliance'])} | "
                f"{_pct(p['xstest_over_refusal'])} | {_pct(p['xstest_non_answer'])} | "
                f"{_pct(p['harmful_non_answer'])} | {_pct(p['alpaca_refusal'])} | {ppl} | "
                f"{'yes' if p['kept'] else 'no'} | {'**yes**' if id(p) in on else ''} | "
                f"{'' if secs is None else round(secs)} |")
        lines += ["", "Hypervolume of each method's kept-utility front (reference (100 %, "
                  "100 %); larger is better; the backbone alone gives "
                  f"{fa.hypervolume([b]):.3f}):", "",
                  "| method | front points | hypervolume |", "|---|---|---|"]
        for g in GROUPS:
            fr = a["fronts"][g]
            n_own = sum(p["group"] == g for p in a["points"])
            lines.append(f"| {g} | {len(fr)} ({n_own} points screened) | "
                         f"{fa.hypervolume(fr):.3f} |")
        lines.append("")
    if cmp and cmp["per_point"]:
        lines += ["## Matched comparison (test prompts)", "",
                  "Baseline front's over-refusal interpolated at each SafePatching front point's "
                  "harmful compliance; diff = baseline − SafePatching in points (> 0: "
                  "SafePatching refuses fewer safe prompts); p = paired sign-flip test over the "
                  "XSTest prompts. The matched harmful compliance is itself an estimate "
                  "(about ±10 points at n = 100).", "",
                  "| seed | SafePatching point | harmful | over-refusal | baseline | baseline "
                  "over-refusal | diff | p |", "|---|---|---|---|---|---|---|---|"]
        for c in cmp["per_point"]:
            if c["covered"]:
                lines.append(f"| {c['seed']} | {c['point']} | {100 * c['harm']:.0f} | "
                             f"{100 * c['over']:.0f} | {c['baseline']} | "
                             f"{100 * c['baseline_over']:.1f} | {100 * c['diff']:+.1f} | "
                             f"{c['p']:.3g} |")
            else:
                lines.append(f"| {c['seed']} | {c['point']} | {100 * c['harm']:.0f} | "
                             f"{100 * c['over']:.0f} | {c['baseline']} | not covered | | |")
        lines += ["", "| baseline | pooled n (seed, prompt) | mean diff | p |", "|---|---|---|---|"]
        for g, v in cmp["pooled"].items():
            diff = "–" if v["diff"] is None else f"{100 * v['diff']:+.1f}"
            pv = "–" if v["p"] is None else f"{v['p']:.3g}"
            lines.append(f"| {g} | {v['n']} | {diff} | {pv} |")
        lines.append("")
    if meta.get("failed"):
        lines += ["Failed points: " + "; ".join(f"{k}: {v}" for k, v in meta["failed"].items()),
                  ""]
    return "\n".join(lines) + "\n"


def plot(ann: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(ann, key=lambda k: (k[0] != "screen", k[1]))
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 5.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        a = ann[key]
        for p in a["points"]:
            ax.scatter(100 * p["harm"], 100 * p["over"], s=14,
                       c="lightgrey" if not p["kept"] else COLORS.get(p["group"], "k"),
                       alpha=0.5 if p["kept"] else 0.9, zorder=1)
        for g in GROUPS:
            fr = a["fronts"][g]
            if len([p for p in fr if p["group"] != "backbone"]) == 0:
                continue
            xs = [100 * p["harm"] for p in fr]
            ys = [100 * p["over"] for p in fr]
            xe = [[100 * (p["harm"] - p["harmful_compliance"]["ci95"][0]) for p in fr],
                  [100 * (p["harmful_compliance"]["ci95"][1] - p["harm"]) for p in fr]]
            ye = [[100 * (p["over"] - p["xstest_over_refusal"]["ci95"][0]) for p in fr],
                  [100 * (p["xstest_over_refusal"]["ci95"][1] - p["over"]) for p in fr]]
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="-o", ms=4, lw=1.2, capsize=2,
                        color=COLORS[g], label=g, alpha=0.85, zorder=2)
        b = a["backbone"]
        ax.scatter([100 * b["harm"]], [100 * b["over"]], marker="*", s=160, c="k",
                   label="backbone", zorder=3)
        ax.set_xlabel("harmful compliance (%)")
        ax.set_ylabel("XSTest over-refusal (%)")
        ax.set_title(f"{key[0]} prompts, seed {key[1]} (grey: utility not kept)")
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], meta: dict, out: Path) -> dict:
    """table.md, fronts.png, comparisons.json in `out`; returns the comparison."""
    ann = annotate(rows)
    cmp = matched(ann) if any(k[0] == "test" for k in ann) else None
    (out / "table.md").write_text(markdown(rows, meta, ann, cmp), encoding="utf-8")
    plot(ann, out / "fronts.png")
    hv = {f"{k[0]}/seed{k[1]}": {g: fa.hypervolume(a["fronts"][g]) for g in GROUPS}
          for k, a in ann.items()}
    (out / "comparisons.json").write_text(json.dumps({"hypervolume": hv, "matched": cmp},
                                                     indent=1) + "\n")
    return {"hypervolume": hv, "matched": cmp}


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_dir")
    a = ap.parse_args(argv)
    d = Path(a.results_dir)
    rows = [json.loads(line) for line in (d / "points.jsonl").read_text().splitlines() if line]
    meta = json.loads((d / "meta.json").read_text())
    write_report(rows, meta, d)
    print((d / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
