"""Byte parity of merges between two checkouts: the merge-engine test corpus (SafePatching,
and the classic merges in both config forms), merged by an older checkout (--base-src) and
by this one, every output file compared.

    git worktree add /tmp/base <commit>
    python bench/merge_bytes_parity.py --base-src /tmp/base

The classic merges (task_arithmetic, ties, dare_ties, dare_linear on tiny bf16 and float32
Llama fine-tunes, whole tensors and 700-element chunks; ties also from mergekit's config form)
are merged once each. Magnitude-trimming
cases (ties) may differ in their weight shards where an older checkout kept every entry tied at
a tensor's trim threshold; for them this checkout's recorded kept counts are checked against
an independent count (mergekit's k per tensor, or the tensor's non-zero deltas where fewer).

Each merge runs in its own process: the older code is imported from a staging directory that
maps its csrc/ and triton_kernels/ into the package as an install would (checked: the process
reports where its package and C++ sources came from, and its extension is built from the old
sources). Weight shards, index, config and tokenizer files must be byte-identical. The model
card and the provenance may differ only by what a newer checkout adds to every merge: the
``retention_order`` parameter (card row, provenance parameter), the applied densities (card
section, provenance ``result.applied``) and a classic merge's magnitude-trim counts (card
section, provenance ``result.trim``); after removing exactly those, they must be
byte-identical too. Writes bench/results/merge_bytes_parity.md (rewritten).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the corpus builders of the merge tests

RUNNER = """
import json, sys
import safepatch_merge
from safepatch_merge.merge import merge
from safepatch_merge.ops import _extension
cfg, out, backend, budget = sys.argv[1:5]
merge(cfg, out, backend=backend or None, max_memory=budget or None)
print(json.dumps({"package": safepatch_merge.__file__,
                  "csrc": str(_extension.csrc_dir().resolve()), "ext_loaded": _extension.load()}))
"""

SHARDS = {"output": {"max_shard_size": "30KB"}}


def corpus() -> list[tuple]:
    """(label, input kind, parameters, extra config keys, backend, SAFEPATCH_MERGE_MIN_CHUNK,
    --max-memory) for every case of the corpus."""
    from merge_helpers import ENGINE_CASES

    cases = []
    for backend in ("reference", "cpp"):
        for label, params in ENGINE_CASES:
            cases.append((f"{label} [{backend}, 1000-element chunks]", "f32", params, SHARDS,
                          backend, "1000", "1MB"))
    for label, params in ENGINE_CASES[1:4]:
        cases.append((f"{label} [triton interpreter]", "f32", params, SHARDS, "triton", None,
                      None))
    cases += [
        ("retention 0.5 [cpp, 37-element chunks, 1KB]", "f32",
         {"top_rate_se": 0.2, "top_rate_osm": 0.2, "retention": 0.5, "rescale": True}, SHARDS,
         "cpp", "37", "1KB"),
        ("delta patches, float32 output [cpp]", "delta", {"top_rate_se": 0.3, "top_rate_osm": 0.2},
         {"patches": {"format": "delta"}, "output": {"dtype": "float32"}}, "cpp", None, None),
        ("include/exclude [cpp]", "f32", {"top_rate_se": 0.5, "top_rate_osm": 0.5},
         {"include": ["model.layers.*"], "exclude": ["*.mlp.*"]}, "cpp", None, None),
        ("bf16 scores, OSM histograms missing [cpp]", "bf16",
         {"top_rate_se": 0.15, "top_rate_osm": 0.35}, {}, "cpp", None, None),
        ("resume-test parameters, hidden 48 [cpp, 200-element chunks]", "h48",
         {"top_rate_se": 0.2, "top_rate_osm": 0.25, "retention": 0.7, "rescale": True, "seed": 5},
         {"output": {"max_shard_size": "24KB"}}, "cpp", "200", "1KB"),
    ]
    for dtype in ("bf16", "f32"):
        for method, glob in CLASSIC:
            for backend, chunk, budget, how in (("cpp", None, None, "whole tensors"),
                                                ("cpp", "700", "1KB", "700-element chunks"),
                                                ("reference", "700", "1KB",
                                                 "700-element chunks, no C++ kernels")):
                if backend == "reference" and method != "ties":
                    continue
                extra = {"classic": {"method": method, "parameters": glob}}
                cases.append((f"{method}{' ' + json.dumps(glob) if glob else ''} {dtype} "
                               f"[{how}]", f"classic_{dtype}", None, extra, backend, chunk,
                               budget))
    cases.append(("ties bf16, mergekit's config form [whole tensors]", "classic_bf16", None,
                  {"classic": {"method": "ties", "mergekit": True}}, "cpp", None, None))
    return cases


CLASSIC = [("task_arithmetic", {"normalize": True, "lambda": 0.7}), ("ties", {}),
           ("ties", {"rescale": True, "normalize": False}), ("dare_ties", {}),
           ("dare_linear", {"rescale": False})]
CLASSIC_DENSITIES = (0.3, 0.55, 0.9)
MAGNITUDE = ("ties",)


def classic_config(root: Path, spec: dict) -> dict:
    """A classic merge config over the tiny models in `root` (base, ft0..ft2): this package's
    form with spec's method and parameters, or mergekit's form where spec["mergekit"]."""
    models = [{"model": str(root / f"ft{i}"), "parameters": {"weight": w, "density": d}}
              for i, (w, d) in enumerate(zip((0.6, 0.5, -0.2), CLASSIC_DENSITIES))]
    if spec.get("mergekit"):
        return {"merge_method": spec["method"], "base_model": str(root / "base"),
                "models": [{"model": str(root / "base")}] + models, "dtype": "bfloat16"}
    cfg = {"method": spec["method"], "backbone": str(root / "base"), "models": models,
           "seed": 5, "output": {"max_shard_size": "40KB"}}
    if spec.get("parameters"):
        cfg["parameters"] = spec["parameters"]
    return cfg


def build_classic_models(root: Path, dtype: torch.dtype) -> Path:
    from safepatch_merge.testing import make_tiny_model, perturbed_copy, save_model_dir

    m, tok = make_tiny_model(0, hidden_size=32, num_layers=2, intermediate_size=64, dtype=dtype)
    save_model_dir(m, tok, root / "base", max_shard_size="40KB")
    for i in range(3):
        save_model_dir(perturbed_copy(m, 0.02, seed=i + 1), tok, root / f"ft{i}",
                       max_shard_size="40KB")
    return root


def expected_kept(root: Path) -> list[int]:
    """Per model: mergekit's k summed over the float tensors, each capped at the tensor's
    non-zero deltas (an independent count from the inputs)."""
    from merge_helpers import load_dir

    from safepatch_merge.merge.classic.trim import trim_count

    base = load_dir(root / "base")
    out = []
    for i, dens in enumerate(CLASSIC_DENSITIES):
        ft = load_dir(root / f"ft{i}")
        out.append(sum(min(trim_count(dens, b.numel()),
                           int((ft[n].float() != b.float()).sum()))
                       for n, b in base.items() if b.is_floating_point()))
    return out


def build_corpus_inputs(root: Path) -> dict[str, dict]:
    from merge_helpers import build_inputs, load_dir

    out = {"f32": build_inputs(root / "f32"), "h48": build_inputs(root / "h48", hidden=48)}
    bf = build_inputs(root / "bf16", score_dtype=torch.bfloat16)
    (bf["scores_osm"] / "histograms.safetensors").unlink()
    out["bf16"] = bf
    out["classic_bf16"] = build_classic_models(root / "classic_bf16", torch.bfloat16)
    out["classic_f32"] = build_classic_models(root / "classic_f32", torch.float32)
    from safetensors.torch import save_file

    base = load_dir(out["f32"]["base"])
    delta = dict(out["f32"])
    for side in ("se", "osm"):
        d = root / f"delta_{side}"
        d.mkdir(parents=True, exist_ok=True)
        full = load_dir(out["f32"][side])
        save_file({n: full[n].float() - base[n].float() for n in full}, str(d / "model.safetensors"))
        delta[side] = d
    out["delta"] = delta
    return out


def stage_checkout(src: Path, stage: Path) -> Path:
    """A directory whose safepatch_merge package is `src`'s, with csrc/ and triton_kernels/
    mapped inside it as pyproject.toml's package-dir does."""
    pkg = stage / "safepatch_merge"
    pkg.mkdir(parents=True)
    for p in (src / "safepatch_merge").iterdir():
        (pkg / p.name).symlink_to(p)
    (pkg / "csrc").symlink_to(src / "csrc")
    (pkg / "triton_kernels").symlink_to(src / "triton_kernels")
    return stage


def reused_stage(src: Path, workdir: Path) -> Path:
    """`workdir`/stage from stage_checkout(src), made on the first run in `workdir` and reused
    by later ones (workdir is created if missing)."""
    workdir.mkdir(parents=True, exist_ok=True)
    stage = workdir / "stage"
    return stage if stage.exists() else stage_checkout(src, stage)


def run_merge(cfg: Path, out: Path, backend, chunk, budget, pythonpath: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAFEPATCH_MERGE_MIN_CHUNK")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    if chunk:
        env["SAFEPATCH_MERGE_MIN_CHUNK"] = chunk
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", RUNNER, str(cfg), str(out), backend or "",
                          budget or ""], env=env, capture_output=True, text=True, cwd="/")
    if res.returncode != 0:
        raise SystemExit(f"merge failed ({pythonpath or 'this checkout'}): {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def strip_card(text: str) -> tuple[str, int]:
    """The card without the retention_order row, the applied-density and the magnitude-trim
    sections (the blank line before a heading through its table); (text, lines removed)."""
    lines = text.split("\n")
    out = [ln for ln in lines if not ln.startswith("| retention_order | ")]
    removed = len(lines) - len(out)
    for heading in ("## Applied densities", "## Magnitude trim"):
        if heading not in out:
            continue
        h = out.index(heading)
        j = h + 1
        while j < len(out) and not out[j].startswith("|"):  # blank, sentence, blank
            j += 1
        while j < len(out) and out[j].startswith("|"):  # the table
            j += 1
        removed += j - (h - 1)
        out = out[:h - 1] + out[j:]
    return "\n".join(out), removed


def strip_provenance(raw: bytes, trims: bool = False) -> tuple[bytes, int]:
    """The provenance without this checkout's additions; trims: without the output shards'
    sha256 too (the shards of a magnitude-trimming merge may differ; compared on their own)."""
    doc = json.loads(raw)
    res = doc.get("result") or {}
    if trims:
        for rec in doc.get("output_shards") or []:
            rec.pop("sha256", None)
    n = int(res.get("parameters", {}).pop("retention_order", None) is not None)
    n += int(res.pop("applied", None) is not None)
    n += int(res.pop("trim", None) is not None)
    return (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode(), n


def compare(base_dir: Path, head_dir: Path, trims: bool = False) -> dict:
    """File-by-file comparison; trims: weight shards may differ (magnitude trim), listed
    under "trim_differ" instead of "differ"."""
    from merge_helpers import dir_bytes

    a, b = dir_bytes(base_dir), dir_bytes(head_dir)
    rec = {"files": len(a), "identical": 0, "identical_after_additions": 0, "differ": [],
           "trim_differ": []}
    if set(a) != set(b):
        rec["differ"].append(f"file sets differ: {sorted(set(a) ^ set(b))}")
        return rec
    for f in sorted(a):
        if a[f] == b[f]:
            rec["identical"] += 1
            continue
        if f == "README.md":
            stripped, removed = strip_card(b[f].decode())
            ok = removed > 0 and stripped.encode() == a[f]
        elif f == "safepatch_provenance.json":
            stripped, removed = strip_provenance(b[f], trims)
            base_doc = strip_provenance(a[f], trims)[0] if trims else a[f]
            ok = removed > 0 and stripped == base_doc
        else:
            ok = False
        if ok:
            rec["identical_after_additions"] += 1
        elif trims and f.endswith(".safetensors"):
            rec["trim_differ"].append(f)
        else:
            rec["differ"].append(f)
    return rec


def machine() -> str:
    cpu = "?"
    for ln in open("/proc/cpuinfo"):
        if ln.startswith("model name"):
            cpu = ln.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return f"{cpu} x{os.cpu_count()}, {mem:.0f} GiB"


def git_head(path: Path) -> str:
    return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-src", required=True, type=Path, help="checkout of the older commit")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--compare-only", action="store_true",
                    help="compare the outputs an earlier run left in --workdir (no merges)")
    ap.add_argument("--machine", default=None, help="machine description for the results page "
                    "(default: CPU model, cores and memory from /proc)")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" /
                    "merge_bytes_parity.md")
    args = ap.parse_args(argv)
    base_src = args.base_src.resolve()
    work = Path(tempfile.mkdtemp(prefix="merge_parity_")) if args.workdir is None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.compare_only:
            from merge_helpers import build_inputs  # noqa: F401 - the same imports as a run
            inputs = {"classic_bf16": work / "inputs" / "classic_bf16",
                      "classic_f32": work / "inputs" / "classic_f32"}
        else:
            stage = stage_checkout(base_src, work / "stage")
            inputs = build_corpus_inputs(work / "inputs")
        from merge_helpers import write_config

        rows, failures = [], 0
        for i, (label, inp, params, extra, backend, chunk, budget) in enumerate(corpus()):
            classic = extra.get("classic")
            if args.compare_only:
                pass
            elif classic:
                cfg = work / f"c{i}.yaml"
                cfg.write_text(yaml.safe_dump(classic_config(inputs[inp], classic)))
            else:
                cfg = write_config(work / f"c{i}.yaml", inputs[inp], params, **extra)
            if not args.compare_only:
                who = {}
                for side, pp in (("base", str(stage)), ("head", None)):
                    who[side] = run_merge(cfg, work / f"{side}{i}", backend, chunk, budget, pp)
                assert Path(who["base"]["csrc"]) == base_src / "csrc", who["base"]
                assert Path(who["base"]["package"]).parent.parent == stage, who["base"]
                assert Path(who["head"]["csrc"]) == REPO / "csrc", who["head"]
                if backend == "cpp":
                    assert who["base"]["ext_loaded"] and who["head"]["ext_loaded"], who
            trims = bool(classic) and classic["method"] in MAGNITUDE
            rec = compare(work / f"base{i}", work / f"head{i}", trims)
            if trims:
                prov = json.loads((work / f"head{i}" / "safepatch_provenance.json").read_text())
                got = [prov["result"]["trim"][f"model_{j}"]["kept"] for j in range(3)]
                want = expected_kept(inputs[inp])
                rec["kept"] = f"{got} (independent count {want})"
                if got != want:
                    rec["differ"].append(f"kept counts {got} != {want}")
            failures += bool(rec["differ"])
            rows.append((label, rec))
            print(label, rec, flush=True)
        total = sum(r["files"] for _, r in rows)
        same = sum(r["identical"] for _, r in rows)
        added = sum(r["identical_after_additions"] for _, r in rows)
        trimmed = sum(len(r["trim_differ"]) for _, r in rows)
        lines = [
            "# Merge output bytes: older checkout vs this one", "",
            f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}",
            f"- base: {git_head(base_src)} (`{base_src}`), head: {git_head(REPO)}",
            f"- machine: {args.machine or machine()}, torch {torch.__version__}, Python {platform.python_version()}",
            f"- command: `python bench/merge_bytes_parity.py {shlex.join(argv or sys.argv[1:])}`",
            "- corpus: the merge-engine tests' configurations (tiny Llama models from "
            "tests/merge_helpers.py and safepatch_merge.testing), SafePatching and the classic "
            "merges, each merged by both checkouts in separate processes",
            "- identical after additions: README.md / safepatch_provenance.json equal byte for "
            "byte once the retention_order row/parameter, the applied-density section/record and "
            "the magnitude-trim section/record are removed", "",
            f"**{same} of {total} files byte-identical, {added} identical after the additions, "
            f"{trimmed} weight shards of magnitude-trimming merges different (kept counts "
            f"checked), {total - same - added - trimmed} other different; {failures} case(s) "
            "with unexpected differences.**", "",
            "| case | files | identical | identical after additions | shards differing "
            "(magnitude trim) | kept entries per model | other differences |",
            "|---|---|---|---|---|---|---|"]
        for label, r in rows:
            lines.append(f"| {label} | {r['files']} | {r['identical']} | "
                         f"{r['identical_after_additions']} | {len(r['trim_differ']) or '-'} | "
                         f"{r.get('kept', '-')} | {', '.join(r['differ']) or '-'} |")
        args.results.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 1 if failures else 0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
