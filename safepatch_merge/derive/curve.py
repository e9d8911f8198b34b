"""The derivation's curve: nll_curve.csv (one row per weight state) and nll_curve.png."""
from __future__ import annotations

import csv
from pathlib import Path

from .behaviour import METRICS
from .objectives import OBJECTIVES

CURVE_COLS = ["step", "train_nll", "train_loss", "retain_nll", "heldout_nll", "grad_norm", "lr",
              "examples", "tokens"] + [f"calib_{m}" for m in METRICS]


def write_curve(out: Path, rows: list[dict], objective: str) -> None:
    """Write `out`/nll_curve.csv (columns CURVE_COLS, empty where not measured) and, when
    matplotlib is installed, `out`/nll_curve.png (NLLs; calibration metrics beside them)."""
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
