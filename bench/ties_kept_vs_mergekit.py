"""TIES's kept entries per tensor, ours vs mergekit 0.1.5's, on bench_classic's synthetic bf16
model (0.70 B parameters, two fine-tunes, density 0.1).

For every tensor and fine-tune: mergekit's kept set is what ``mergekit.sparsify.magnitude``
keeps of the bf16 delta (mergekit's own function, called on the delta it would compute:
bf16(ft − base)); ours is what safepatch's TensorMerge statistics keep (the exact selector
with the index-order tie cutoff, plain-torch path) of the fp32 delta. Reported: tensors, k,
kept counts (equal to k per tensor?), entries in one set and not the other, and whether every
such entry has |delta_bf16| equal to mergekit's threshold (the k-th largest |delta_bf16|).
bf16 rounding is monotone, so a top-k of the fp32 |delta| is a top-k of the bf16 |delta|: the
sets can only differ among entries tied there.

Run with a Python that has mergekit 0.1.5 and this checkout importable, e.g.

    SAFEPATCH_NO_EXT=1 PYTHONPATH=. /path/to/mergekit-venv/bin/python \\
        bench/ties_kept_vs_mergekit.py --workdir /tmp/ties_kept

(--reference: use mergekit's formula reimplemented below instead of importing mergekit.)
Writes bench/results/ties_kept_vs_mergekit.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
DENSITY = 0.1


def mergekit_magnitude_reference(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit 0.1.5 sparsify.magnitude without rescale, reimplemented: k = max(1,
    int(density·N)), an argsort of |delta| (float32 on CPU), the first k kept."""
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    w = delta.abs().reshape(-1).float()
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return delta * mask.reshape_as(delta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--machine", default="2-core AMD EPYC VM, 24 GiB")
    ap.add_argument("--results", type=Path,
                    default=REPO / "bench" / "results" / "ties_kept_vs_mergekit.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from safetensors import safe_open

    from safepatch_merge.merge.classic.spec import default_params, get_method
    from safepatch_merge.merge.classic.tensor_merge import TensorMerge
    from safepatch_merge.merge.classic.trim import keep_mask, local_cutoff

    if args.reference:
        magnitude, source = mergekit_magnitude_reference, "mergekit's formula reimplemented"
    else:
        import mergekit
        from mergekit.sparsify import magnitude
        source = f"mergekit {getattr(mergekit, '__version__', '?')} sparsify.magnitude"
        from importlib.metadata import version
        source = f"mergekit {version('mergekit')} sparsify.magnitude (imported)"

    root = args.workdir / f"{args.layers}l"
    if not (root / "ft1" / "model.safetensors.index.json").exists():
        from bench_classic import generate
        generate(root, args.layers)

    def tensors(path):
        idx = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        return idx

    wmap = tensors(root / "base")
    handles = {}

    def load(which, name):
        f = (which, tensors(root / which)[name]) if which != "base" else ("base", wmap[name])
        if f not in handles:
            handles[f] = safe_open(str(root / f[0] / f[1]), "pt")
        return handles[f].get_tensor(name)

    spec = get_method("ties")
    rows = []
    t0 = time.time()
    for name in sorted(wmap):
        b = load("base", name)
        if not b.is_floating_point():
            continue
        n = b.numel()
        for i in range(2):
            x = load(f"ft{i}", name)
            p = default_params("ties", [1.0], [DENSITY])
            tm = TensorMerge(spec, p, name, n)
            flat_b, flat_x = b.reshape(-1), x.reshape(-1)
            ad = torch.sub(flat_x, flat_b.float()).abs_()
            while tm.pending:
                tm._observe_abs(tm.models[0], ad.clone(), 0)
                tm.end_pass()
            m = tm.models[0]
            ours = keep_mask(ad, m.threshold, local_cutoff(m.cutoff, 0, n))
            d16 = (x - b).reshape(-1)  # mergekit's delta: bf16 arithmetic
            theirs_val = magnitude(d16, DENSITY)
            k = max(1, int(DENSITY * n))
            w = d16.abs().float()
            t16 = torch.topk(w, k).values[-1]
            theirs = theirs_val != 0
            # mergekit also "keeps" zero deltas when fewer than k are non-zero; they add nothing
            differ = ours ^ theirs
            at_threshold = bool((w[differ] == t16).all())
            rows.append(dict(name=name, model=i, n=n, k=k, ours=int(ours.sum()),
                             theirs=int(theirs.sum()), nonzero=int((d16 != 0).sum()),
                             differ=int(differ.sum()), tied=int((w == t16).sum()),
                             all_differences_at_threshold=at_threshold,
                             cutoff=m.cutoff is not None))
        if len(rows) % 20 == 0:
            print(f"{len(rows)} tensor-models, {time.time() - t0:.0f} s", flush=True)
    exact = all(r["ours"] == min(r["k"], r["nonzero"]) for r in rows)
    same_as_theirs = all(r["ours"] == r["theirs"] for r in rows)
    all_at = all(r["all_differences_at_threshold"] for r in rows)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    total_n = sum(r["n"] for r in rows) // 2
    lines = [
        "# TIES kept entries per tensor: safepatch vs mergekit 0.1.5", "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}, "
        f"commit: {commit}",
        f"- machine: {args.machine}, torch {torch.__version__}, Python "
        f"{platform.python_version()}",
        f"- command: `{' '.join(['python', 'bench/ties_kept_vs_mergekit.py'] + (argv or sys.argv[1:]))}`"
        " (SAFEPATCH_NO_EXT=1: our plain-torch statistics path; the C++ kernels keep the same "
        "entries, tests/test_classic_trim.py)",
        f"- model: bench_classic.py's synthetic Llama ({args.layers} layers, {total_n / 1e9:.2f} B "
        "params, bf16) and its two fine-tunes (base + N(0, 0.002²)); density 0.1, each "
        "fine-tune's trim compared separately",
        f"- mergekit side: {source} on the bf16 delta (ft − base in bf16, as mergekit computes "
        "it); ours: TensorMerge's statistics (exact k-th largest of the fp32 |delta|, ties by "
        "element index)", "",
        f"**{len(rows)} tensor trims: kept == mergekit's k (or the non-zero deltas where fewer) "
        f"in {sum(r['ours'] == min(r['k'], r['nonzero']) for r in rows)}; kept count equal to "
        f"mergekit's in {sum(r['ours'] == r['theirs'] for r in rows)}; kept sets differ in "
        f"{sum(r['differ'] > 0 for r in rows)} trims, {sum(r['differ'] for r in rows)} entries "
        f"in all, every one of them with |delta_bf16| equal to mergekit's threshold: {all_at}. "
        f"Tie cutoff used (ties beyond k) in {sum(r['cutoff'] for r in rows)} trims.**", "",
        "| tensor | fine-tune | N | k | kept (ours) | kept (mergekit) | entries tied at "
        "mergekit's threshold | in one set only | all at threshold |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | ft{r['model']} | {r['n']} | {r['k']} | {r['ours']} | "
                     f"{r['theirs']} | {r['tied']} | {r['differ']} | "
                     f"{r['all_differences_at_threshold']} |")
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:10]))
    return 0 if exact and same_as_theirs and all_at else 1


if __name__ == "__main__":
    sys.exit(main())
