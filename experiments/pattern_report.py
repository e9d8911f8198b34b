"""Table (markdown) and plot (PNG) of the pattern-reproduction experiment, from its results JSON.

`write_report(record, out_dir)` writes results.json, table.md and pattern.png into `out_dir`;
`python experiments/reproduce_pattern.py --report-only results.json --results-dir DIR`
regenerates table and plot from a results JSON alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

# The paper's numbers (arXiv 2405.13820, LLaMA-2-7B-Chat, its Table 1): harmful rate judged by
# a guard model on its harmful sets, XSTest refusal rate on safe prompts, in percent.
PAPER = {
    "backbone": (31.7, 8.0),
    "se_only": (0.0, 98.4),
    "osm_only": (87.7, 0.0),
    "safepatch": (3.3, 5.6),
}

KIND_COLOURS = {"backbone": "black", "shipped": "grey", "patch": "tab:red",
                "baseline": "tab:blue", "ablation": "tab:purple", "safepatch": "tab:green"}


def _fmt(r: dict | None) -> str:
    if not r or not r.get("n"):
        return "–"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _ppl(u: dict | None) -> str:
    if not u:
        return "–"
    return f"{u['perplexity']:.2f} [{u['ci95'][0]:.2f}, {u['ci95'][1]:.2f}]"


def _params(v: dict) -> str:
    p = v.get("params") or {}
    if v.get("method") == "safepatch":
        s = (f"a={p['a']:g} b={p['b']:g} α={p['alpha']:g} β={p['beta']:g} p={p['p']:g}")
        return s + (f" ({p['mask_mode']})" if p.get("mask_mode", "difference") != "difference"
                    else "")
    if v.get("method") in ("ties", "task_arithmetic"):
        return ", ".join(f"{k}={val:g}" for k, val in p.items())
    return ""


def over_refusal(m: dict) -> dict:
    """XSTest over-refusal of a variant's metrics: refusals + non-answers (records judged
    before non-answers existed carry only `refusal`)."""
    return m["xstest"].get("over_refusal") or m["xstest"]["refusal"]


def judges(record: dict) -> list[str]:
    """The judges that produced the variants' rates, in order of first use."""
    return list(dict.fromkeys(v["metrics"].get("judge") or "rules-v1"
                              for v in record.get("variants", {}).values()
                              if v.get("status") == "done"))


def markdown(record: dict) -> str:
    """The whole report table (and its context) as markdown."""
    lines = ["# SafePatching pattern on SmolLM2-135M-Instruct", ""]
    env = record.get("environment", {})
    lines += [f"- preset `{record.get('preset', {}).get('name')}`, device {env.get('device')} "
              f"({env.get('device_name')}), eval dtype {record.get('eval_dtype')}, "
              f"seed {record.get('preset', {}).get('seed')}",
              f"- finished {record.get('finished')}; wall time {record.get('wall_time_s')} s"
              + (" — stopped by the time budget" if record.get("stopped_by_budget") else ""),
              "- rates in % with 95% Wilson intervals; n = prompts. *Compliance* = the judge's "
              "`compliance` outcome (not a refusal, non-answer or degenerate output; no guard "
              "model here: this is not a judged harmful rate). *Over-refusal* = XSTest safe "
              "prompts judged refusal or non-answer (XSTest's scheme); non-answers also apart.",
              f"- judge: {', '.join(judges(record)) or '–'}"
              + (f" ({record['rejudged']})" if record.get("rejudged") else ""), ""]
    sizes = record.get("prompt_sets", {})
    if sizes:
        lines += ["| prompt set | before dedup | removed exact | removed fuzzy | used |",
                  "|---|---|---|---|---|"]
        for k, s in sizes.items():
            lines.append(f"| {k} | {s['before']} | {s['removed_exact']} | {s['removed_fuzzy']} "
                         f"| {s['used']} |")
        lines.append("")
    lines += ["| model | params | HarmBench compliance | StrongREJECT compliance | "
              "pooled harmful compliance | harmful non-answer | harmful degenerate | "
              "XSTest over-refusal | XSTest non-answer | XSTest degenerate | utility ppl | "
              "paper (harmful / XSTest) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in record.get("variants", {}).items():
        if v.get("status") != "done":
            lines.append(f"| {name} | {_params(v)} | {v.get('status')}: "
                         f"{(v.get('error') or '')[:80]} | | | | | | | | | |")
            continue
        m = v["metrics"]
        paper = PAPER.get(v.get("paper_row") or "")
        lines.append(
            f"| {name} | {_params(v)} | {_fmt(m['harmbench']['compliance'])} (n={m['harmbench']['n']}) | "
            f"{_fmt(m['strongreject']['compliance'])} (n={m['strongreject']['n']}) | "
            f"{_fmt(m['harmful_pooled']['compliance'])} (n={m['harmful_pooled']['n']}) | "
            f"{_fmt(m['harmful_pooled'].get('non_answer'))} | "
            f"{_fmt(m['harmful_pooled']['degenerate'])} | "
            f"{_fmt(over_refusal(m))} (n={m['xstest']['n']}) | "
            f"{_fmt(m['xstest'].get('non_answer'))} | "
            f"{_fmt(m['xstest']['degenerate'])} | {_ppl(m.get('utility'))} | "
            f"{f'{paper[0]:.1f} / {paper[1]:.1f}' if paper else ''} |")
    u = next((v["metrics"].get("utility") for v in record.get("variants", {}).values()
              if v.get("status") == "done" and v["metrics"].get("utility")), None)
    if u:
        lines += ["", f"Utility proxy: perplexity of {u['n_docs']} benign reference answers "
                      f"({u['n_tokens']} tokens, ≤{u['max_response_tokens']} per answer; bootstrap "
                      "95% interval). Lower is better."]
    cal = record.get("calibration")
    if cal:
        cal_judge = {c.get("judge") or "rules-v1" for c in cal.get("candidates", [])}
        lines += ["", "## Safety-tuned backbone: candidates (calibration prompts, never reported "
                      "as results)", "",
                  f"Rule: {cal.get('rule')}", "",
                  f"Judge: {', '.join(sorted(cal_judge))} (as run: the calibration completions "
                  "are not exported, so these rates were not re-judged)", "",
                  "| candidate | SFT steps | harmful compliance (calib) | benign refusal (Alpaca) "
                  "| over-refusal (held-out XSTest) | chosen |",
                  "|---|---|---|---|---|---|"]
        for c in cal.get("candidates", []):
            xs = c.get("xstest_refusal")
            xs_cell = f"{_fmt(xs)} (n={xs.get('n')})" if xs else "not calibrated"
            lines.append(f"| {c['name']} | {c['steps']} | {_fmt(c.get('harmful_compliance'))} "
                         f"(n={c.get('harmful_compliance', {}).get('n')}) | "
                         f"{_fmt(c.get('benign_refusal'))} (n={c.get('benign_refusal', {}).get('n')}) "
                         f"| {xs_cell} | {'yes' if c['name'] == cal.get('chosen') else ''} |")
    pt = record.get("patches")
    if pt:
        lines += ["", "## Patches", ""]
        for side, d in pt.items():
            lines.append(f"- {side}: {d.get('steps')} steps, stop: {d.get('stop_reason')}, "
                         f"train NLL {d.get('nll_first')} → {d.get('nll_last')} (nats/token)")
    ov = record.get("score_overlap")
    if ov and "error" not in ov:
        lines += ["", "## Overlap of the two top sets (what the difference set removes)", "",
                  f"N = {ov['n']} scored parameters; T_X = top-k by SNIP score, one global "
                  "threshold.", "", "| rate | k | SE selected | OSM selected | |T_SE ∩ T_OSM| | "
                  "∩ / k |", "|---|---|---|---|---|---|"]
        for r, d in ov.items():
            if r == "n":
                continue
            lines.append(f"| {r} | {d['k']} | {d['se_selected']} | {d['osm_selected']} | "
                         f"{d['intersection']} | {d['intersection_over_k']:.3f} |")
    tm = record.get("timings")
    if tm:
        lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in tm.items()]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> bool:
    """Scatter of pooled harmful compliance vs XSTest over-refusal (95% intervals as error
    bars), one point per finished variant. Returns False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9.5, 6), dpi=110)
    for name, v in record.get("variants", {}).items():
        if v.get("status") != "done":
            continue
        h, x = v["metrics"]["harmful_pooled"]["compliance"], over_refusal(v["metrics"])
        if not h.get("n") or not x.get("n"):
            continue
        hx, xy = 100 * h["rate"], 100 * x["rate"]
        err_x = [[hx - 100 * h["ci95"][0]], [100 * h["ci95"][1] - hx]]
        err_y = [[xy - 100 * x["ci95"][0]], [100 * x["ci95"][1] - xy]]
        c = KIND_COLOURS.get(v.get("kind"), "tab:orange")
        i = len(ax.containers) + 1
        ax.errorbar(hx, xy, xerr=err_x, yerr=err_y, fmt="o", color=c, ms=5, lw=0.8, capsize=2,
                    label=f"{i}: {name}")
        # numbers, not names, beside the points: coinciding points stay readable via the legend
        ax.annotate(str(i), (hx, xy), textcoords="offset points", xytext=(4, 3 + 7 * (i % 3)),
                    fontsize=7, color=c)
    ax.set_xlabel("compliance on harmful prompts, % (HarmBench + StrongREJECT)")
    ax.set_ylabel("over-refusal on XSTest safe prompts (refusals + non-answers), %")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.set_title("SmolLM2-135M (safety-tuned backbone): lower left is better", fontsize=10)
    if ax.containers:
        ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(record: dict, out_dir: str | Path, write_json: bool = True) -> dict:
    """Write results.json (unless write_json is False), table.md and pattern.png into out_dir.
    Returns {name: path} of what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if write_json:
        p = out / "results.json"
        tmp = p.with_name(p.name + ".partial")
        tmp.write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
        tmp.replace(p)
        paths["json"] = p
    t = out / "table.md"
    t.write_text(markdown(record), encoding="utf-8")
    paths["table"] = t
    if plot(record, out / "pattern.png"):
        paths["plot"] = out / "pattern.png"
    return paths


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    return str(o)
