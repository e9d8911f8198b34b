"""The streaming merge engine: plan, validate, pre-pass, one streaming pass, atomic output.

``merge(config, out_dir, ...)`` (the Python twin of ``safepatch merge``):

1. parse the config, refuse an existing OUT (unless overwrite) before any work;
2. open every input (backbone + the method's roles) by headers only and validate them;
3. size chunks from the memory budget: ``--max-memory`` bounds the process's resident memory
   (the budget minus what the process already holds is split into ``depth`` read slots, the
   writer queue and the backend's scratch per element), so peak memory does not grow with the
   model; tensors larger than a chunk are processed in row chunks with their element offset,
   which by construction of the ops gives bit-identical results;
4. the method's pre-pass (e.g. exact thresholds), streaming under the same budget;
5. the output plan (shards, header per shard), a plan id hashing everything that decides the
   output bytes, then one streaming pass in backbone file order: a background reader fills
   slots, the main thread runs the method on the chosen device, a background writer appends
   each tensor's bytes to its shard; finished shards are recorded for ``resume``;
6. index, config / tokenizer files, model card and provenance; rename OUT.partial -> OUT.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError, SafepatchError, clip
from ..io import (Checkpoint, ContentHasher, OutputBuilder, Part, Prefetcher, ShardPlan,
                  index_json, item_bytes, open_checkpoint, plan_shards)
from ..io.links import hub_blobs_of, trusted_target
from ..io.outpath import check_apart
from ..io.safetensors_header import DTYPES, TORCH_TO_ST
from ..ops import backend_for, set_backend
from .card import COPY_FILES, TOKENIZER_FILES, model_card, provenance, rewrite_config_dtype
from .config import MergeConfig, load_config, parse_config, parse_size
from . import transfer
from .methods import MergeMethod, get_method
from .stages import StageClock
from .value_checks import check_output as check_output_values
from .value_checks import score_reader_check

log = logging.getLogger("safepatch_merge.merge")

# Smallest chunk the budget may force. SAFEPATCH_MERGE_MIN_CHUNK lowers it (tests use it to
# make tiny models take many streaming steps).
MIN_CHUNK = 4096
MAX_CHUNK = 1 << 22  # elements; larger chunks only cost pipeline overlap
_OUT_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_FLOAT_ST = ("F32", "BF16", "F16", "F64")


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def default_max_memory() -> int:
    """A quarter of physical memory, at most 16 GiB."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 16 << 30
    return min(16 << 30, total // 4)


@dataclass
class MergeResult:
    """What a merge did (or, for a dry run, would do)."""

    out_dir: Path | None
    plan: dict
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    summary: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)  # StageClock.as_dict(): seconds per stage
    prepass_bytes_read: int = 0  # read by the method's pre-pass (e.g. threshold refinement)


class EngineContext:
    """What a method's pre-pass sees: opened checkpoints, device, work dir, and streaming."""

    def __init__(self, ckpts: dict[str, Checkpoint], device: torch.device, chunk_elems: int,
                 depth: int, work_dir: Path | None, progress: bool,
                 clock: StageClock | None = None):
        self.ckpts, self.device, self.chunk_elems = ckpts, device, chunk_elems
        self.depth, self.work_dir, self.progress = depth, work_dir, progress
        self.clock = clock if clock is not None else StageClock()
        self.stage = "prepass"  # prefix of the stream timings
        self.transfer = transfer.ops_for(device)  # None: the host computes on the reader's views
        self.bytes_read = 0  # by stream_items
        # Chunks a pre-pass streamed to the accelerator and kept there for the merge pass, so
        # they are not read twice: {(role, name, offset, count): device tensor}.
        self.cache: dict[tuple[str, str, int, int], torch.Tensor] = {}
        self.cache_budget = 0  # bytes; set by merge() from what --max-memory leaves
        self.cache_bytes = 0
        # run on the reader thread for every part read (value_checks.score_reader_check)
        self.read_check: Callable | None = None

    def keep(self, role: str, name: str, offset: int, chunk: torch.Tensor) -> None:
        """Keep a copy of this pre-pass chunk on the accelerator for the merge pass, if the
        budget allows (no-op on the CPU, where the reader maps the page cache instead)."""
        n = chunk.numel() * chunk.element_size()
        if self.transfer is None or self.cache_bytes + n > self.cache_budget:
            return
        key = (role, name, offset, chunk.numel())
        if key not in self.cache:
            self.cache[key] = chunk.clone()  # the chunk views a device slot that is reused
            self.cache_bytes += n

    def chunks(self, numel: int, row: int) -> list[tuple[int, int]]:
        """(offset, count) chunks of a tensor of `numel` elements with rows of `row` elements:
        whole rows per chunk where a row fits, else plain element ranges."""
        c = self.chunk_elems
        if 0 < row <= c:
            c = (c // row) * row
        if numel == 0:
            return [(0, 0)]
        return [(o, min(c, numel - o)) for o in range(0, numel, c)]

    def stream(self, role: str, names: list[str], fn: Callable[[str, torch.Tensor, int], None],
               desc: str = "") -> None:
        """Call fn(name, chunk, offset) for every chunk of tensors `names` of checkpoint `role`
        (chunk: 1-D, the checkpoint's dtype, on the engine's device), in the given order."""
        self.stream_entries([(role, n) for n in names],
                            lambda r, name, chunk, off: fn(name, chunk, off), desc)

    def stream_entries(self, entries: list[tuple[str, str]],
                       fn: Callable[[str, str, torch.Tensor, int], None], desc: str = "") -> None:
        """Call fn(role, name, chunk, offset) for every chunk of tensors (role, name), in order,
        with read-ahead under the engine's memory budget."""
        items, meta = [], []
        for role, name in entries:
            info = self.ckpts[role].tensors[name]
            row = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
            for off, cnt in self.chunks(info.numel, row):
                items.append([Part(role, info, off, cnt)])
                meta.append((role, name, off))

        def call(i, views):
            role, name, off = meta[i]
            fn(role, name, views[role], off)

        self.stream_items(items, call, desc)

    def open_stream(self, items: list[list[Part]], desc: str):
        """(reader, Uploader or None, progress bar) for streaming `items` on the engine's
        device: mapped page-cache windows on the CPU; pinned slots, each uploaded in one
        copy, on an accelerator."""
        slot = max(item_bytes(p) for p in items)
        bar = _bar(sum(item_bytes(p) for p in items), desc, self.progress)
        ops = self.transfer
        pf = Prefetcher(items, slot, self.depth, pin=ops is not None and ops.pin,
                        zero_copy=None if ops is None else False, check=self.read_check)
        up = transfer.Uploader(ops, slot, self.depth) if ops is not None else None
        return pf, up, bar

    def stream_items(self, items: list[list[Part]],
                     fn: Callable[[int, dict[str, torch.Tensor]], None], desc: str = "") -> None:
        """Call fn(i, {part key: 1-D chunk on the engine's device}) for each work item i of
        `items` in order, with read-ahead. On an accelerator each item goes up in one
        asynchronous copy and fn's work is queued, not waited for; fn must not keep the
        chunks past its return (their device memory is reused)."""
        if not items:
            return
        pf, up, bar = self.open_stream(items, desc)
        it = iter(pf)
        clock, stage = self.clock, self.stage
        try:
            while True:
                if up is not None:  # never hold the reader's slots while waiting on it
                    with clock(f"{stage}.h2d_wait"):
                        up.release_finished(block=True)
                with clock(f"{stage}.read_wait"):
                    item = next(it, None)
                if item is None:
                    break
                views = up.upload(item) if up is not None else item.views
                with clock(f"{stage}.compute"):
                    fn(item.index, views)
                if up is not None:
                    up.computed()
                else:
                    item.release()
                bar.update(item_bytes(items[item.index]))
        finally:
            pf.close()
            bar.close()
        clock.add(f"{stage}.reader_busy", pf.busy_seconds)
        self.bytes_read += pf.bytes_read


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, dynamic_ncols=True, leave=False)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _versions() -> dict:
    import platform

    import safetensors

    from .. import __version__ as ours

    return {"safepatch_merge": ours, "torch": torch.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def merge(config: str | Path | dict | MergeConfig, out_dir: str | Path, *,
          backend: str | None = None, device: str = "cpu", max_memory: int | str | None = None,
          resume: bool = False, overwrite: bool = False, dry_run: bool = False,
          progress: bool = False) -> MergeResult:
    """Merge as `config` says (YAML path, mapping or MergeConfig) into HF model directory
    `out_dir`. backend: reference | cpp | triton | auto (None: automatic). device: "cpu",
    "cuda", "cuda:1". max_memory: resident-memory budget in bytes or a size string ("1GiB");
    default a quarter of RAM (<= 16 GiB). resume: continue OUT.partial. overwrite: replace an
    existing OUT. dry_run: validate and return the plan (thresholds included) without writing.
    Raises SafepatchError subclasses (one-line messages) for every input problem; nothing is
    ever left at `out_dir` unless the merge completed.
    """
    t0 = time.perf_counter()
    clock = StageClock()
    cfg = (config if isinstance(config, MergeConfig) else load_config(config)
           if isinstance(config, (str, Path)) else parse_config(config))
    if backend is not None:
        try:
            set_backend(backend)
        except ValueError as e:
            raise ConfigError(f"--backend: {e}") from None
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    # CPU op threads for the pre-pass (no writer running) and the merge pass
    pre_threads, op_threads = ((compute_threads(torch.get_num_threads(), False),
                                compute_threads(torch.get_num_threads(), True))
                               if dev.type == "cpu" else (None, None))
    budget = parse_size(max_memory, "--max-memory") if max_memory is not None \
        else default_max_memory()
    out_dir = Path(out_dir)
    builder = OutputBuilder(out_dir, "", resume=resume, overwrite=overwrite)
    if not dry_run:
        builder.check_target()

    method: MergeMethod = get_method(cfg.method)(cfg)
    backbone = cfg.resolve(cfg.backbone)
    ckpts = {"base": open_checkpoint(backbone, "backbone", revision=cfg.revision,
                                     allow_pickle=cfg.allow_pickle, hint=cfg.hint(backbone))}
    for role, src in method.input_sources().items():
        ckpts[role] = open_checkpoint(src, role, revision=cfg.revision,
                                      allow_pickle=cfg.allow_pickle, hint=cfg.hint(src))
    base = ckpts["base"]
    if not dry_run:
        _check_apart(out_dir, ckpts, config)
    _check_patterns(cfg, base)
    selected = [n for n in base.tensors
                if (not cfg.include or _matches(n, cfg.include)) and not _matches(n, cfg.exclude)]
    method.check_inputs(ckpts, selected)
    clock.add("open", time.perf_counter() - t0)
    with clock("load_ops"):  # the first call may build or load the extension
        try:
            backend_name = backend_for(dev)[0]
        except RuntimeError as e:
            raise ConfigError(f"--backend: {e}") from None
    if dev.type == "cuda" and not dry_run:
        with clock("device_init"):  # CUDA context, so that its cost is not billed to a pass
            torch.zeros(1, device=dev).add_(1).cpu()

    # Output plan: every backbone tensor, in backbone file order.
    entries, out_dt = [], {}
    for name, info in base.tensors.items():
        dt = info.dtype
        if cfg.output.dtype != "auto" and dt in _FLOAT_ST:
            dt = _OUT_DTYPE[cfg.output.dtype]
        out_dt[name] = dt
        entries.append((name, dt, info.shape))
    shards = plan_shards(entries, cfg.output.max_shard_size)

    # Memory: bytes per element held at once = read slots + writer queue + backend scratch.
    roles_of = {n: method.roles_for(n) for n in base.tensors}
    per_elem_in = max((base.tensors[n].itemsize
                       + sum(ckpts[r].tensors[n].itemsize for r in roles_of[n]))
                      for n in base.tensors) if base.tensors else 1
    per_elem_out = max((DTYPES[d][1] for d in out_dt.values()), default=1)
    depth = 3 if dev.type == "cuda" else 2
    scratch = method_scratch(method, backend_name) if dev.type == "cpu" else 8
    baseline = current_rss()
    avail = budget - baseline
    per_elem = depth * per_elem_in + 3 * per_elem_out + scratch
    min_chunk = int(os.environ.get("SAFEPATCH_MERGE_MIN_CHUNK", MIN_CHUNK))
    chunk = min(MAX_CHUNK, max(min_chunk, avail // per_elem if avail > 0 else 0))
    if avail < per_elem * min_chunk:
        log.warning("--max-memory %s leaves no room beyond the %d MiB this process already "
                    "uses; running with minimal %d-element chunks", budget, baseline >> 20,
                    min_chunk)
    whole = [n for n in base.tensors if roles_of[n] and method.whole_tensor(n)]
    est = baseline + chunk * per_elem + sum(
        base.tensors[n].numel * per_elem for n in whole if base.tensors[n].numel > chunk)

    ctx = EngineContext(ckpts, dev, chunk, depth, None, progress, clock)
    # every score read from disk, in the pre-pass or the merge pass, is checked on the reader
    # thread: a stale histogram or threshold cache cannot let bad scores through
    ctx.read_check = score_reader_check({r: f"{r} {ck.source}" for r, ck in ckpts.items()
                                         if r.startswith("scores_")})
    if ctx.transfer is not None and not dry_run:
        with clock("device_init"):
            ctx.cache_budget = max(0, min(budget - est, ctx.transfer.cache_limit()))
    plan_id = _plan_id(cfg, ckpts, shards, backend_name)
    builder.plan_id = _resume_id(plan_id, ckpts)
    hasher = content = None
    if not dry_run:
        builder.open()
        ctx.work_dir = builder.work_dir
        if cfg.output.hash_inputs:
            try:
                hasher, content = _start_content_hashes(builder, ckpts)
            except BaseException:
                builder.close_thread()
                raise
    threads = torch.get_num_threads()
    try:
        if pre_threads is not None:
            torch.set_num_threads(pre_threads)
        with clock("prepass"):
            method.prepare(ctx)
        summary = method.summary()
        plan = {
            "method": cfg.method, "backend": backend_name, "device": str(dev),
            "tensors": len(base.tensors),
            "patched_tensors": sum(1 for n in base.tensors if roles_of[n]),
            "read_bytes": sum(base.tensors[n].nbytes + sum(ckpts[r].tensors[n].nbytes
                                                           for r in roles_of[n])
                              for n in base.tensors),
            "write_bytes": sum(s.data_bytes for s in shards), "shards": len(shards),
            "chunk_elements": chunk, "max_memory": budget,
            "estimated_peak_memory": est, "device_cache_bytes": ctx.cache_bytes,
            "summary": summary,
        }
        if dry_run:
            return MergeResult(None, plan, time.perf_counter() - t0, summary=summary,
                               stages=clock.as_dict())
        ctx.stage = "stream"
        if op_threads is not None:
            torch.set_num_threads(op_threads)
        with clock("stream"):
            read, written = _stream_pass(ctx, method, builder, shards, roles_of, out_dt,
                                         check_output=not cfg.output.allow_nonfinite)
        clock.add("stream.writer_busy", builder.thread.busy_seconds)
        summary = method.summary()
        with clock("finish"):
            sha = content
            if hasher is not None:
                with clock("finish.hash_wait"):
                    sha = hasher.result()
            _finish_files(cfg, method, builder, ckpts, shards, summary, backend_name, plan_id,
                          sha)
    except SafepatchError:
        if not dry_run:
            builder.abandon()
        raise
    except BaseException:
        builder.close_thread()
        raise
    finally:
        torch.set_num_threads(threads)
        if hasher is not None:
            hasher.cancel()
    with clock("finish"):
        out = builder.finish()
    secs = time.perf_counter() - t0
    log.info("merged %d tensors into %s in %.1f s (%.2f GB/s read)", len(base.tensors), out,
             secs, read / secs / 1e9 if secs else 0.0)
    log.debug("stages: %s", clock.line())
    return MergeResult(out, plan, secs, read, written, summary, clock.as_dict(), ctx.bytes_read)


def compute_threads(torch_threads: int, writing: bool = True) -> int:
    """Threads for the ops during a CPU merge. While the output is written: one fewer than
    torch would use (at least 1), so the reader and writer threads have a core and never
    preempt an OpenMP region, whose other workers would wait for the preempted one at its
    barrier. On the 2-core VM (0.7 B models): SafePatching 9.8-11.1 s wall with 2 op threads
    vs 8.9-9.2 s with 1; task arithmetic 5.8-6.6 s vs 5.6-6.1 s; TIES (compute-bound)
    10.6-10.7 s vs 10.2-11.9 s, a wash. A pre-pass (`writing` False) only has the reader
    beside it, which maps page-cache windows (busy ~10 % of the time), so it gets every
    thread: the SafePatching threshold refinement took 0.48-0.58 s with 2 threads vs
    0.84-1.21 s with 1. SAFEPATCH_MERGE_THREADS overrides both."""
    env = os.environ.get("SAFEPATCH_MERGE_THREADS", "")
    if env.strip():
        try:
            return max(1, int(env))
        except ValueError:
            raise ConfigError(f"SAFEPATCH_MERGE_THREADS={env!r}: expected a whole number") from None
    return max(1, torch_threads - 1) if writing else torch_threads


def method_scratch(method: MergeMethod, backend_name: str) -> int:
    """Temporary bytes per chunk element the method's op needs on `backend_name` (CPU)."""
    fn = getattr(method, "scratch_bytes", None)
    if fn is not None:
        return int(fn(backend_name))
    return 96 if backend_name == "reference" else 16


def _check_patterns(cfg: MergeConfig, base: Checkpoint) -> None:
    """Every include/exclude pattern must match some backbone tensor (a typo would otherwise
    patch everything, or nothing, without a word)."""
    for key, pats in (("include", cfg.include), ("exclude", cfg.exclude)):
        for pat in pats:
            if not any(fnmatch.fnmatchcase(n, pat) for n in base.tensors):
                example = next(iter(base.tensors), "")
                raise ConfigError(f"{key} pattern {clip(pat)} matches no tensor of the backbone "
                                  f"{base.source} (names look like {clip(example)})")


def _check_apart(out_dir: Path, ckpts: dict[str, Checkpoint], config) -> None:
    """OUT must not be, lie inside or contain an input (checkpoints, their Hub cache
    repository, the config file)."""
    dirs = {}
    for role, ck in ckpts.items():
        label = "backbone" if role == "base" else f"{role} input"
        dirs[label] = ck.root
        blobs = hub_blobs_of(ck.root)
        if blobs is not None:
            dirs[f"{label}'s Hub cache repository"] = blobs.parent
    files = {"config": Path(config)} if isinstance(config, (str, Path)) else {}
    check_apart(out_dir, dirs, files)


def _resume_id(plan_id: str, ckpts: dict[str, Checkpoint]) -> str:
    """What a partial output must have been made under to be resumed: the plan, plus each
    input file's size, mtime_ns, inode and header hash, so that new bytes under an unchanged
    header (a patch rewritten between a kill and --resume) start a different plan."""
    stats = {r: c.stat_identity() for r, c in ckpts.items()}
    doc = json.dumps({"plan": plan_id, "inputs": stats}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def _start_content_hashes(builder: OutputBuilder, ckpts: dict[str, Checkpoint]):
    """(background ContentHasher, None) for output.hash_inputs; on a resume that keeps
    finished shards, (None, digests) computed now and compared with the digests the
    interrupted run recorded: different content is refused; unrecorded content (the run was
    killed before hashing finished) cannot vouch for the finished shards, which are redone.
    The digests go into the manifest as soon as they are known."""
    from ..io.hashing import file_sha256
    from ..io.writer import OutputError

    files = list(dict.fromkeys(f for ck in ckpts.values() for f in ck.files))
    if builder.done:
        content = {f: file_sha256(f) for f in files}
        now = {str(f): d for f, d in content.items()}
        before = builder.meta.get("input_sha256")
        if before is not None and before != now:
            changed = sorted(k for k in now if before.get(k) != now[k])
            raise OutputError(f"{builder.partial} was made from inputs whose content has changed "
                              f"since (e.g. {changed[0] if changed else '?'}); pass --overwrite "
                              "to start over")
        if before is None:
            log.warning("output.hash_inputs: the interrupted merge had not hashed its inputs, "
                        "so its %d finished shards cannot be verified; redoing them",
                        len(builder.done))
            builder.discard_done()
        builder.set_meta("input_sha256", now)
        return None, content
    hasher = ContentHasher(files)
    builder.meta_provider = lambda: ({"input_sha256": {str(f): d for f, d in
                                                        hasher.digests.items()}}
                                     if hasher.finished() else {})
    return hasher, None


def _plan_id(cfg: MergeConfig, ckpts, shards: list[ShardPlan], backend_name: str) -> str:
    from .. import __version__ as ours

    doc = {"config": cfg.raw, "inputs": {r: {"source": c.source, "files": c.identity()}
                                         for r, c in ckpts.items()},
           "shards": [[s.filename, s.entries] for s in shards], "backend": backend_name,
           "version": ours}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _stream_pass(ctx: EngineContext, method, builder: OutputBuilder, shards, roles_of, out_dt,
                 check_output: bool = True) -> tuple[int, int]:
    """The merge's one streaming pass: every backbone tensor, in shard order, read, merged on
    the engine's device (or copied as is) and handed to the writer in order. With
    `check_output`, every merged chunk is checked to be finite on the writer thread (see
    value_checks)."""
    base = ctx.ckpts["base"]
    items, meta = [], []  # meta: (shard index, name, offset, count, last chunk of shard)
    todo = [i for i, s in enumerate(shards) if s.filename not in builder.done]
    for si in todo:
        shard = shards[si]
        for ti, (name, _, _) in enumerate(shard.entries):
            info = base.tensors[name]
            row = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
            roles = roles_of[name]
            chunks = ([(0, info.numel)] if roles and method.whole_tensor(name)
                      else ctx.chunks(info.numel, row))
            for ci, (off, cnt) in enumerate(chunks):
                parts = [Part("base", info, off, cnt)]
                parts += [Part(r, ctx.ckpts[r].tensors[name], off, cnt) for r in roles
                          if (r, name, off, cnt) not in ctx.cache]
                items.append(parts)
                last = ti == len(shard.entries) - 1 and ci == len(chunks) - 1
                meta.append((si, name, off, cnt, last))
    used = {(r, m[1], m[2], m[3]) for m in meta for r in roles_of[m[1]]}
    for key in [k for k in ctx.cache if k not in used]:  # e.g. shards a resume skips
        del ctx.cache[key]
    if not items:
        return 0, 0
    clock = ctx.clock
    ops = ctx.transfer
    pf, up, bar = ctx.open_stream(items, "merge")
    ring = None
    if ops is not None:
        out_bytes = max(m[3] * DTYPES[out_dt[m[1]]][1] for m in meta)
        ring = transfer.OutputRing(ops, out_bytes, 3)
    writer = None
    read = written = 0
    # In order, waiting for the writer: (copy-done event or None, host tensor, on_done, index).
    # A host slot or output buffer an entry holds is freed only after the writer wrote it.
    fifo: deque = deque()

    def hand_one() -> bool:
        """Give the oldest entry to the writer, first waiting for its download if it has
        one; False if there is none."""
        nonlocal writer, read, written
        if not fifo:
            return False
        ev, t, on_done, i = fifo.popleft()
        si, name, off, cnt, last = meta[i]
        if ev is not None:
            with clock("stream.d2h_wait"):
                ops.synchronize(ev)
        if writer is None:
            writer = builder.shard(shards[si])
        check = None
        if check_output and roles_of[name]:
            check = functools.partial(check_output_values, name, offset=off)
        with clock("stream.write_wait"):  # the writer's queue is bounded
            writer.write(t, on_done=on_done, check=check)
        nbytes = item_bytes(items[i])
        read += nbytes
        written += cnt * DTYPES[out_dt[name]][1]
        bar.update(nbytes)
        if last:
            with clock("stream.shard_finish"):  # drain, fsync, rename, manifest
                writer.finish()
            writer = None
        return True

    def hand_finished(holding_slots: bool) -> None:
        """Hand over entries whose copy is done; all of them when the reader may be waiting
        for a slot one of them holds."""
        while fifo and (holding_slots or fifo[0][0] is None or ops.query(fifo[0][0])):
            hand_one()

    it = iter(pf)
    try:
        while True:
            if up is not None:  # never hold the reader's slots while waiting on it
                with clock("stream.h2d_wait"):
                    up.release_finished(block=True)
                hand_finished(holding_slots=any(e[0] is None for e in fifo))
            with clock("stream.read_wait"):
                item = next(it, None)
            if item is None:
                break
            si, name, off, cnt, last = meta[item.index]
            info = base.tensors[name]
            dt = out_dt[name]
            if not roles_of[name] and dt == info.dtype:  # copied as is, straight from the slot
                fifo.append((None, item.views["base"], item.release, item.index))
                hand_finished(holding_slots=False)
                continue
            views = up.upload(item) if up is not None else item.views
            for r in roles_of[name]:
                if r not in views:  # kept on the device by the pre-pass; used once
                    views[r] = ctx.cache.pop((r, name, off, cnt))
            with clock("stream.compute"):
                if roles_of[name]:
                    out = method.merge_chunk(name, views, off, DTYPES[dt][0])
                else:
                    out = views["base"].to(DTYPES[dt][0])
                if out.dtype != DTYPES[dt][0] or out.numel() != cnt:
                    raise RuntimeError(f"method {method.name} returned {out.dtype} x "
                                       f"{out.numel()} for {name!r}, expected {DTYPES[dt][0]} "
                                       f"x {cnt}")
            if up is not None:
                host, ev, give_back = ring.download(out, hand_one)
                up.computed()  # after the download: it reads `out`, which may view the slot
                fifo.append((ev, host, give_back, item.index))
            else:
                if any(out.data_ptr() == v.data_ptr() for v in views.values()):
                    out = out.clone()  # never hand the writer a view of a reusable read slot
                item.release()
                fifo.append((None, out, None, item.index))
            del out, views
            hand_finished(holding_slots=False)
        while fifo:
            hand_one()
    except BaseException:
        if writer is not None:
            try:
                builder.thread.drain()
            except SafepatchError:
                pass
            writer.abort()
        raise
    finally:
        pf.close()
        bar.close()
        clock.add("stream.reader_busy", pf.busy_seconds)
    return read, written


def _finish_files(cfg: MergeConfig, method, builder: OutputBuilder, ckpts, shards, summary,
                  backend_name, plan_id, content_sha256=None) -> None:
    base = ckpts["base"]
    if len(shards) > 1:
        builder.add_file("model.safetensors.index.json", index_json(shards))
    names = COPY_FILES + (TOKENIZER_FILES if cfg.output.copy_tokenizer else ())
    extra = [p.name for p in sorted(base.root.glob("*.jinja"))] if cfg.output.copy_tokenizer else []
    out_dtype = None if cfg.output.dtype == "auto" else cfg.output.dtype
    for fname in list(names) + extra:
        src = base.root / fname
        if not os.path.lexists(src):
            continue
        real = trusted_target(src, base.root, what=f"backbone file {src}")  # the link rule
        if fname == "config.json" and out_dtype is not None:
            builder.add_file(fname, rewrite_config_dtype(real.read_bytes(), out_dtype))
        else:
            builder.copy_file(real, fname)  # a regular file with the target's bytes
    if not (base.root / "config.json").is_file():
        log.warning("backbone %s has no config.json; the output cannot be loaded with "
                    "from_pretrained without one", base.source)
    shard_info = [{"file": s.filename, **builder.done[s.filename]} for s in shards]
    prov = provenance(cfg, method, ckpts, summary, backend_name, plan_id, shard_info, _versions(),
                      content_sha256)
    builder.add_file("safepatch_provenance.json", prov)
    if cfg.output.model_card:
        builder.add_file("README.md", model_card(cfg, method, ckpts, summary))


__all__ = ["merge", "MergeResult", "EngineContext", "current_rss", "default_max_memory",
           "TORCH_TO_ST"]
