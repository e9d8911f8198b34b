"""End-to-end merge benchmark: `safepatch merge` vs mergekit, side by side, on synthetic
Llama-shaped bf16 checkpoints (docs/design.md §4; bar: at most mergekit's wall time and
1 GiB of peak RSS).

For each size the script generates a base model, two patched copies (base + small noise) and
two fp32 score directories (with digit-0 histograms), then alternates, `--repeats` times:
  * mergekit 0.1.5 (its own venv, CPU torch): plain task arithmetic over the three checkpoints
    (`mergekit-yaml --no-copy-tokenizer`, HF_HUB_OFFLINE=1);
  * `safepatch merge` with the full SafePatching method (5 inputs, difference mode, retention
    0.9) under `--max-memory`;
and records wall time, input GB/s (bytes of the inputs each tool reads / wall time) and peak
RSS (``/usr/bin/time``'s maximum resident set size of the process), taking medians. It also
times a plain sequential read of the inputs (`cat`-like, 8 MiB blocks) as the I/O ceiling,
and checks numbers: a `safepatch merge` with mask_mode none and alpha = beta = 1 (= task
arithmetic) is compared element by element with mergekit's output.

    python bench/bench_merge.py --sizes 0.7b,1.4b --repeats 3 --workdir /work/bench_merge_tmp
    python bench/bench_merge.py --sizes 0.7b --device cuda --skip-mergekit   # on a GPU host
    python bench/bench_merge.py --sizes 0.7b --skip-mergekit --retention-order before_selection

Results: bench/results/merge.csv (appended) and bench/results/merge_<device>.md (rewritten).
Generated files are deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# Llama-shaped (TinyLlama-like widths, GQA 32/4 heads); the layer count sets the size.
SIZES = {"0.7b": 13, "1.4b": 29, "tiny": 2}
WIDTH = dict(hidden=2048, inter=5632, heads=32, kv_heads=4, vocab=32000)
SHARD_BYTES = 2_000_000_000


def tensor_specs(layers: int, w=WIDTH) -> list[tuple[str, tuple[int, ...]]]:
    h, kv = w["hidden"], w["hidden"] // w["heads"] * w["kv_heads"]
    specs = [("model.embed_tokens.weight", (w["vocab"], h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate_proj.weight", (w["inter"], h)),
                  (p + "mlp.up_proj.weight", (w["inter"], h)),
                  (p + "mlp.down_proj.weight", (h, w["inter"]))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (w["vocab"], h))]
    return specs


def _gen(name: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(name.encode()) * 7919 + len(name))
    if name.endswith("norm.weight"):
        return torch.ones(shape) + 0.01 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * 0.02


def write_checkpoint(out: Path, specs, make, dtype, config: dict | None) -> int:
    """Write tensors make(name, shape) in shards of ~2 GB with an index; returns bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    groups, cur, size = [], [], 0
    isz = torch.empty((), dtype=dtype).element_size()
    for name, shape in specs:
        n = int(torch.tensor(shape).prod()) * isz
        if cur and size + n > SHARD_BYTES:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    groups.append(cur)
    wm, total = {}, 0
    for i, grp in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in grp:
            t = make(name, shape)
            if t is None:
                continue
            tensors[name] = t.to(dtype).contiguous()
            wm[name] = fname
            total += tensors[name].numel() * isz
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": wm}, indent=1))
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    return total


def llama_config(layers: int, w=WIDTH) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": w["hidden"], "intermediate_size": w["inter"],
            "num_attention_heads": w["heads"], "num_key_value_heads": w["kv_heads"],
            "num_hidden_layers": layers, "vocab_size": w["vocab"], "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048, "tie_word_embeddings": False,
            "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1,
            "eos_token_id": 2, "rope_theta": 10000.0}


def generate(root: Path, layers: int) -> dict[str, Path]:
    from safetensors.torch import save_file

    from safepatch_merge.ops import radix_histogram

    specs = tensor_specs(layers)
    cfg = llama_config(layers)
    paths = {k: root / k for k in ("base", "se", "osm", "scores_se", "scores_osm")}
    t0 = time.time()
    write_checkpoint(paths["base"], specs, lambda n, s: _gen(n, s, 0), torch.bfloat16, cfg)
    for i, side in enumerate(("se", "osm")):
        def patched(n, s, i=i):
            b = _gen(n, s, 0).to(torch.bfloat16).float()
            g = torch.Generator().manual_seed(50 + i + len(n))
            return b + 0.002 * torch.randn(s, generator=g)
        write_checkpoint(paths[side], specs, patched, torch.bfloat16, cfg)
        hists = {}

        def score(n, s, i=i):
            if n.endswith("norm.weight"):
                return None
            g = torch.Generator().manual_seed(90 + i + len(n))
            t = torch.rand(s, generator=g)
            hists[n] = radix_histogram(t, 0, 0)
            return t
        write_checkpoint(paths[f"scores_{side}"], specs, score, torch.float32, None)
        save_file(hists, str(paths[f"scores_{side}"] / "histograms.safetensors"))
        (paths[f"scores_{side}"] / "score_info.json").write_text(json.dumps(
            {"format": "safepatch-scores", "version": 1, "note": "synthetic (bench)"}))
    print(f"generated {layers}-layer inputs in {time.time() - t0:.0f} s", flush=True)
    return paths


def dir_bytes(p: Path, pattern="*.safetensors", exclude=("histograms.safetensors",)) -> int:
    return sum(f.stat().st_size for f in p.glob(pattern) if f.name not in exclude)


def timed(cmd: list[str], env=None, log: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `cmd`: /usr/bin/time's %M where it exists, else the
    child's ru_maxrss from wait4, the child started with posix_spawn (no fork of this
    process, whose pages a forked child would count until its exec: 1.6 GB after generating
    the inputs)."""
    t0 = time.perf_counter()
    tf = Path(f"/tmp/bench_merge_time_{os.getpid()}.txt")
    gnu_time = Path("/usr/bin/time").exists()
    full = (["/usr/bin/time", "-f", "%M", "-o", str(tf)] + cmd) if gnu_time else cmd
    with open(log or os.devnull, "ab") as lf:
        pid = os.posix_spawn(full[0], full, env if env is not None else os.environ,
                             file_actions=[(os.POSIX_SPAWN_DUP2, lf.fileno(), 1),
                                           (os.POSIX_SPAWN_DUP2, lf.fileno(), 2)])
        _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)} (see {log})")
    if gnu_time:
        peak_kib = int(tf.read_text().split()[-1])
        tf.unlink()
    else:
        peak_kib = int(usage.ru_maxrss)
    return wall, peak_kib * 1024


def read_speed(dirs: list[Path]) -> float:
    """GB/s of reading every input file sequentially in 8 MiB blocks (page cache as it is)."""
    total, t0 = 0, time.perf_counter()
    buf = bytearray(8 << 20)
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    return total / (time.perf_counter() - t0) / 1e9


def compare(a: Path, b: Path) -> dict:
    """Elementwise comparison of two bf16 checkpoints (streamed tensor by tensor)."""
    from safetensors import safe_open

    def index(d):
        j = d / "model.safetensors.index.json"
        if j.exists():
            return {n: d / f for n, f in json.loads(j.read_text())["weight_map"].items()}
        with safe_open(d / "model.safetensors", "pt") as f:
            return {n: d / "model.safetensors" for n in f.keys()}
    ia, ib = index(a), index(b)
    assert set(ia) == set(ib), "different tensor names"
    n = diff = 0
    maxabs = maxrel = 0.0
    for name in ia:
        with safe_open(ia[name], "pt") as fa, safe_open(ib[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        n += x.numel()
        ne = x.view(torch.int16) != y.view(torch.int16)
        diff += int(ne.sum())
        maxabs = max(maxabs, float((x.float() - y.float()).abs().max()))
        # Difference in units of bf16 spacing at the larger magnitude (1 = one rounding step).
        spacing = torch.maximum(x.float().abs(), y.float().abs()).clamp_min(1e-30) * 2.0 ** -7
        maxrel = max(maxrel, float(((x.float() - y.float()).abs() / spacing).max()))
    return {"elements": n, "differ": diff, "max_abs": maxabs, "max_steps": maxrel}


def machine() -> str:
    cpu = "?"
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return f"{platform.node()} {cpu} x{os.cpu_count()} {mem:.0f}GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.7b,1.4b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/work/bench_merge_tmp")
    ap.add_argument("--mergekit-venv", default="/work/mk-venv")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--results-dir", default=str(RESULTS),
                    help="where merge.csv (appended) and merge_<device>.md go")
    ap.add_argument("--generate-only", action="store_true",
                    help="write the inputs under --workdir and stop (a GPU host generates them "
                         "on its CPUs while other checks use the GPU)")
    ap.add_argument("--reuse-inputs", action="store_true",
                    help="use inputs a previous --generate-only/--keep run left in --workdir")
    ap.add_argument("--retention-order", choices=("after_selection", "before_selection"),
                    default=None, help="set parameters.retention_order of the SafePatching "
                    "merge (default: left out of the config, i.e. after_selection)")
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else machine()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows, summary = [], []
    mk = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    for size in args.sizes.split(","):
        layers = SIZES[size]
        root = work / size
        if args.reuse_inputs and (root / "generated.ok").exists():
            paths = {k: root / k for k in ("base", "se", "osm", "scores_se", "scores_osm")}
            print(f"reusing the inputs in {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
            paths = generate(root, layers)
            (root / "generated.ok").write_text("complete\n")
        if args.generate_only:
            continue
        n_params = sum(int(torch.tensor(s).prod()) for _, s in tensor_specs(layers))
        sp_cfg = {"backbone": str(paths["base"]),
                  "patches": {"se": str(paths["se"]), "osm": str(paths["osm"])},
                  "scores": {"se": str(paths["scores_se"]), "osm": str(paths["scores_osm"])},
                  "parameters": {"top_rate_se": 0.1, "top_rate_osm": 0.1, "retention": 0.9,
                                 "mask_mode": "difference"}}
        if args.retention_order is not None:
            sp_cfg["parameters"]["retention_order"] = args.retention_order
        ta_cfg = {"backbone": str(paths["base"]),
                  "patches": {"se": str(paths["se"]), "osm": str(paths["osm"])},
                  "parameters": {"mask_mode": "none", "alpha": 1.0, "beta": 1.0}}
        import yaml
        (root / "sp.yaml").write_text(yaml.safe_dump(sp_cfg))
        (root / "ta.yaml").write_text(yaml.safe_dump(ta_cfg))
        (root / "mk.yaml").write_text(yaml.safe_dump({
            "merge_method": "task_arithmetic", "base_model": str(paths["base"]),
            "models": [{"model": str(paths["se"]), "parameters": {"weight": 1.0}},
                       {"model": str(paths["osm"]), "parameters": {"weight": 1.0}}],
            "dtype": "bfloat16"}))
        sp_in = sum(dir_bytes(paths[k]) for k in paths)
        mk_in = sum(dir_bytes(paths[k]) for k in ("base", "se", "osm"))
        sp_cmd = [sys.executable, "-m", "safepatch_merge", "merge", str(root / "sp.yaml"),
                  str(root / "out_sp"), "--max-memory", args.max_memory, "--no-progress",
                  "--overwrite", "--device", args.device]
        mk_cmd = [str(mk), str(root / "mk.yaml"), str(root / "out_mk"), "--no-copy-tokenizer"]
        if args.device.startswith("cuda"):
            mk_cmd += ["--cuda"]
        ceiling = read_speed([paths[k] for k in paths])
        res = {"safepatch": [], "mergekit": []}
        for r in range(args.repeats):
            order = ["mergekit", "safepatch"] if r % 2 == 0 else ["safepatch", "mergekit"]
            for tool in order:
                if tool == "mergekit" and args.skip_mergekit:
                    continue
                shutil.rmtree(root / ("out_mk" if tool == "mergekit" else "out_sp"),
                              ignore_errors=True)
                stats = root / "stats.json"
                stats.unlink(missing_ok=True)
                wall, rss = timed(mk_cmd if tool == "mergekit" else
                                  sp_cmd + ["--stats", str(stats)], env, root / f"{tool}.log")
                nbytes = mk_in if tool == "mergekit" else sp_in
                st = json.loads(stats.read_text()) if tool == "safepatch" else None
                res[tool].append((wall, rss, st))
                rows.append({"date": date, "commit": commit, "machine": dev_name,
                             "device": args.device, "size": size, "params": n_params,
                             "tool": tool, "run": r, "wall_s": round(wall, 3),
                             "input_bytes": nbytes, "input_GBps": round(nbytes / wall / 1e9, 3),
                             "peak_rss_MiB": round(rss / 2**20, 1),
                             "read_ceiling_GBps": round(ceiling, 3),
                             # in-process time of the merge (wall minus interpreter start-up,
                             # imports), and where it went (StageClock)
                             "engine_s": st["seconds"] if st else "",
                             "stages": json.dumps(st["stages"]) if st else ""})
                print(rows[-1], flush=True)
        cmp = None
        if not args.skip_mergekit:
            shutil.rmtree(root / "out_ta", ignore_errors=True)
            timed([sys.executable, "-m", "safepatch_merge", "merge", str(root / "ta.yaml"),
                   str(root / "out_ta"), "--max-memory", args.max_memory, "--no-progress",
                   "--device", args.device], env, root / "ta.log")
            cmp = compare(root / "out_ta", root / "out_mk")
        for tool, v in res.items():
            if not v:
                continue
            wall = statistics.median(w for w, _, _ in v)
            nbytes = mk_in if tool == "mergekit" else sp_in
            stv = [st for _, _, st in v if st]
            mid = sorted(stv, key=lambda st: st["seconds"])[len(stv) // 2] if stv else None
            summary.append({"size": size, "params": n_params, "tool": tool, "wall_s": wall,
                            "input_GB": nbytes / 1e9, "input_GBps": nbytes / wall / 1e9,
                            "peak_rss_MiB": max(r for _, r, _ in v) / 2**20, "runs": len(v),
                            "ceiling": ceiling, "compare": cmp, "stats": mid})
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    if args.generate_only:
        return 0
    csv_path = results / "merge.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    md = results / f"merge_{'cuda' if args.device.startswith('cuda') else 'cpu'}.md"
    lines = [f"# Merge benchmark ({args.device})", "",
             f"- date: {date}, commit: {commit}", f"- machine: {dev_name}",
             f"- command: `python bench/bench_merge.py {' '.join(argv or sys.argv[1:])}`",
             f"- safepatch: `{' '.join(sp_cmd[1:])}` (full method: difference mode, top rates "
             "0.1/0.1, retention 0.9, retention_order "
             f"{args.retention_order or 'after_selection (default)'}; reads base + 2 patches + "
             "2 fp32 score dirs)",
             f"- mergekit 0.1.5: `mergekit-yaml mk.yaml OUT --no-copy-tokenizer` "
             "(task arithmetic, weights 1/1, dtype bfloat16; reads base + 2 patches), "
             "HF_HUB_OFFLINE=1, own venv with CPU torch",
             f"- medians of {args.repeats} alternating runs; peak RSS = max over runs "
             "(/usr/bin/time %M); input GB/s = bytes of the inputs the tool reads / wall time",
             "", "| size | params | tool | wall s (median) | input GB | input GB/s | peak RSS MiB |"
             " plain read GB/s |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['size']} | {s['params'] / 1e9:.2f} B | {s['tool']} | {s['wall_s']:.1f} | "
                     f"{s['input_GB']:.2f} | {s['input_GBps']:.2f} | {s['peak_rss_MiB']:.0f} | "
                     f"{s['ceiling']:.2f} |")
    lines.append("")
    for s in summary:
        if s["tool"] == "safepatch" and s["compare"]:
            c = s["compare"]
            lines.append(f"- {s['size']}: safepatch (mask_mode none, α=β=1) vs mergekit task "
                         f"arithmetic: {c['differ']} of {c['elements']} bf16 elements differ, "
                         f"max |diff| {c['max_abs']:.3g}, max {c['max_steps']:.2f} bf16 rounding steps "
                         "(mergekit computes in bf16, safepatch in fp32 with one final rounding)")
    for s in summary:
        st = s.get("stats")
        if st:
            from safepatch_merge.merge.stages import StageClock

            gbps = s["input_GB"] / st["seconds"]
            lines.append(f"- {s['size']}: safepatch in-process {st['seconds']:.2f} s of "
                         f"{s['wall_s']:.2f} s wall ({gbps:.2f} GB/s of input, "
                         f"{100 * gbps / s['ceiling']:.0f} % of the plain read; the rest of the "
                         f"wall time is interpreter start-up and imports); the median run's "
                         f"stages: {StageClock.line_of(st['stages'])}; device cache "
                         f"{st['plan'].get('device_cache_bytes', 0) / 1e9:.2f} GB, pre-pass read "
                         f"{st.get('prepass_bytes_read', 0) / 1e9:.2f} GB")
    by = {(s["size"], s["tool"]): s for s in summary}
    for size in args.sizes.split(","):
        a, b = by.get((size, "safepatch")), by.get((size, "mergekit"))
        if a and b:
            lines.append(f"- {size}: safepatch wall / mergekit wall = {a['wall_s'] / b['wall_s']:.2f}"
                         f"; safepatch peak RSS {a['peak_rss_MiB']:.0f} MiB")
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
