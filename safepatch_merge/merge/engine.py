"""The streaming merge engine: plan, pre-pass, one streaming pass, finish; atomic output.

``merge(config, out_dir, ...)`` (the Python twin of ``safepatch merge``) runs four steps, each
a function with typed inputs and outputs:

1. :func:`plan_merge` -> :class:`Planned`: open every input (backbone + the method's roles)
   by headers only and validate them; size chunks from the memory budget (``--max-memory``
   bounds the process's resident memory: the budget minus what the process already holds is
   split into ``depth`` read slots, the writer queue and the backend's scratch per element,
   so peak memory does not grow with the model; tensors larger than a chunk are processed in
   row chunks with their element offset, which by construction of the ops gives
   bit-identical results); the output shards, and a plan id hashing everything that decides
   the output bytes.
2. :func:`run_prepass` -> :class:`MergePlan`: the method's pre-pass (e.g. exact thresholds),
   streaming under the same budget; the plan a dry run prints.
3. :func:`.stream_pass.stream_pass`: one streaming pass in backbone file order: a background
   reader fills slots, the main thread runs the method on the chosen device, a background
   writer appends each tensor's bytes to its shard; finished shards are recorded for resume.
4. :func:`.finish.finish_files`: index, config / tokenizer files, model card and provenance;
   then OUT.partial is renamed to OUT.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import __version__
from ..devices import resolve_device
from ..errors import ConfigError, SafepatchError, clip
from ..io.checkpoint import Checkpoint, ContentHasher, open_checkpoint
from ..io.hashing import file_sha256
from ..io.links import hub_blobs_of
from ..io.outpath import check_apart
from ..io.safetensors_header import DTYPES
from ..io.writer import OutputBuilder, OutputError, ShardPlan, plan_shards
from ..ops import backend_for, set_backend
from . import transfer
from .config import MergeConfig, load_config, parse_config
from .config_values import parse_size
from .finish import finish_files
from .methods import MergeMethod
from .registry import method_for
from .stages import StageClock
from .stream import EngineContext
from .stream_pass import stream_pass
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


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (the command's flags, checked). budget: resident-memory bytes.
    prepass_threads / stream_threads: CPU op threads of each pass (None: on an accelerator,
    left as they are)."""

    device: torch.device
    budget: int
    prepass_threads: int | None = None
    stream_threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    progress: bool = False


@dataclass(frozen=True)
class Planned:
    """Step 1's output: the opened inputs and how they will be streamed.

    ckpts: {role: Checkpoint}, "base" the backbone. roles_of: {backbone tensor: the method's
    roles for it}, () for a copied tensor. out_dtypes: {tensor: safetensors dtype of the
    output}. chunk: elements per streamed chunk; depth: read slots; estimated_peak: bytes.
    plan_id: sha256 of everything that decides the output bytes."""

    cfg: MergeConfig
    method: MergeMethod
    ckpts: Mapping[str, Checkpoint]
    backend: str
    shards: tuple[ShardPlan, ...]
    out_dtypes: Mapping[str, str]
    roles_of: Mapping[str, tuple[str, ...]]
    chunk: int
    depth: int
    estimated_peak: int
    plan_id: str

    @property
    def base(self) -> Checkpoint:
        return self.ckpts["base"]


@dataclass(frozen=True)
class MergePlan:
    """What a merge does (a dry run prints it; ``--stats`` records it). Bytes unless named
    otherwise; summary: the method's parameters and pre-pass results (thresholds,
    densities)."""

    method: str
    backend: str
    device: str
    tensors: int
    patched_tensors: int
    read_bytes: int
    write_bytes: int
    shards: int
    chunk_elements: int
    max_memory: int
    estimated_peak_memory: int
    device_cache_bytes: int
    summary: dict

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MergeResult:
    """What a merge did (or, for a dry run, would do). stages: StageClock.as_dict(), seconds
    per stage; prepass_bytes_read: read by the method's pre-pass."""

    out_dir: Path | None
    plan: MergePlan
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    summary: dict = dataclasses.field(default_factory=dict)
    stages: dict = dataclasses.field(default_factory=dict)
    prepass_bytes_read: int = 0


def merge_options(*, backend: str | None = None, device: str = "cpu",
                  max_memory: int | str | None = None, resume: bool = False,
                  overwrite: bool = False, dry_run: bool = False,
                  progress: bool = False) -> MergeOptions:
    """Check the run flags (see :func:`merge`) and select the op backend; ConfigError naming
    the flag."""
    if backend is not None:
        try:
            set_backend(backend)
        except ValueError as e:
            raise ConfigError(f"--backend: {e}") from None
    dev = resolve_device(device, "--device", allow_auto=False)
    threads = ((compute_threads(torch.get_num_threads(), False),
                compute_threads(torch.get_num_threads(), True)) if dev.type == "cpu"
               else (None, None))
    budget = parse_size(max_memory, "--max-memory") if max_memory is not None \
        else default_max_memory()
    return MergeOptions(dev, budget, *threads, resume, overwrite, dry_run, progress)


def plan_merge(cfg: MergeConfig, opts: MergeOptions, clock: StageClock,
               config_file: Path | None = None, out_dir: Path | None = None) -> Planned:
    """Open and check the inputs, size the stream, plan the output (step 1). `out_dir`: the
    output, which must lie apart from every input and `config_file` (None: not checked)."""
    t0 = time.perf_counter()
    method = method_for(cfg)
    sources = {"base": cfg.locate(cfg.backbone), **method.input_sources()}
    ckpts = {role: open_checkpoint(src.path, "backbone" if role == "base" else role,
                                   revision=cfg.revision, allow_pickle=cfg.allow_pickle,
                                   hint=src.hint)
             for role, src in sources.items()}
    base = ckpts["base"]
    if out_dir is not None:
        check_apart_from_inputs(out_dir, ckpts, config_file)
    check_patterns(cfg, base)
    selected = [n for n in base.tensors
                if (not cfg.include or _matches(n, cfg.include)) and not _matches(n, cfg.exclude)]
    method.check_inputs(ckpts, selected)
    clock.add("open", time.perf_counter() - t0)
    dev = opts.device
    with clock("load_ops"):  # the first call may build or load the extension
        try:
            backend_name = backend_for(dev)[0]
        except RuntimeError as e:
            raise ConfigError(f"--backend: {e}") from None
    if dev.type == "cuda" and not opts.dry_run:
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
    shards = tuple(plan_shards(entries, cfg.output.max_shard_size))

    # Memory: bytes per element held at once = read slots + writer queue + backend scratch.
    roles_of = {n: method.roles_for(n) for n in base.tensors}
    per_elem_in = max((base.tensors[n].itemsize
                       + sum(ckpts[r].tensors[n].itemsize for r in roles_of[n]))
                      for n in base.tensors) if base.tensors else 1
    per_elem_out = max((DTYPES[d][1] for d in out_dt.values()), default=1)
    depth = 3 if dev.type == "cuda" else 2
    scratch = method_scratch(method, backend_name) if dev.type == "cpu" else 8
    baseline = current_rss()
    avail = opts.budget - baseline
    per_elem = depth * per_elem_in + 3 * per_elem_out + scratch
    min_chunk = int(os.environ.get("SAFEPATCH_MERGE_MIN_CHUNK", MIN_CHUNK))
    chunk = min(MAX_CHUNK, max(min_chunk, avail // per_elem if avail > 0 else 0))
    if avail < per_elem * min_chunk:
        log.warning("--max-memory %s leaves no room beyond the %d MiB this process already "
                    "uses; running with minimal %d-element chunks", opts.budget, baseline >> 20,
                    min_chunk)
    whole = [n for n in base.tensors if roles_of[n] and method.whole_tensor(n)]
    est = baseline + chunk * per_elem + sum(
        base.tensors[n].numel * per_elem for n in whole if base.tensors[n].numel > chunk)
    return Planned(cfg, method, ckpts, backend_name, shards, out_dt, roles_of, chunk, depth,
                   est, plan_id(cfg, ckpts, shards, backend_name))


def make_context(planned: Planned, opts: MergeOptions, clock: StageClock,
                 work_dir: Path | None) -> EngineContext:
    """The streaming context of both passes. Every score read from disk, in the pre-pass or
    the merge pass, is checked on the reader thread, so that a stale histogram or threshold
    cache cannot let bad scores through. On an accelerator, what the budget leaves beyond
    the estimated peak may keep pre-pass chunks on the device for the merge pass."""
    ops = transfer.ops_for(opts.device)
    cache_budget = 0
    if ops is not None and not opts.dry_run:
        with clock("device_init"):
            cache_budget = max(0, min(opts.budget - planned.estimated_peak, ops.cache_limit()))
    check = score_reader_check({r: f"{r} {ck.source}" for r, ck in planned.ckpts.items()
                                if r.startswith("scores_")})
    return EngineContext(dict(planned.ckpts), opts.device, planned.chunk, planned.depth,
                         work_dir, opts.progress, clock, read_check=check, transfer_ops=ops,
                         cache_budget=cache_budget)


def run_prepass(planned: Planned, ctx: EngineContext, opts: MergeOptions,
                clock: StageClock) -> MergePlan:
    """The method's pre-pass (step 2), with every CPU thread (no writer runs yet); the plan
    with its results."""
    threads = torch.get_num_threads()
    try:
        if opts.prepass_threads is not None:
            torch.set_num_threads(opts.prepass_threads)
        with clock("prepass"):
            planned.method.prepare(ctx)
    finally:
        torch.set_num_threads(threads)
    base, ckpts, roles_of = planned.base, planned.ckpts, planned.roles_of
    return MergePlan(
        method=planned.cfg.method, backend=planned.backend, device=str(opts.device),
        tensors=len(base.tensors),
        patched_tensors=sum(1 for n in base.tensors if roles_of[n]),
        read_bytes=sum(base.tensors[n].nbytes + sum(ckpts[r].tensors[n].nbytes
                                                    for r in roles_of[n])
                       for n in base.tensors),
        write_bytes=sum(s.data_bytes for s in planned.shards), shards=len(planned.shards),
        chunk_elements=planned.chunk, max_memory=opts.budget,
        estimated_peak_memory=planned.estimated_peak, device_cache_bytes=ctx.cache_bytes,
        summary=planned.method.summary())


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
    opts = merge_options(backend=backend, device=device, max_memory=max_memory, resume=resume,
                         overwrite=overwrite, dry_run=dry_run, progress=progress)
    out_dir = Path(out_dir)
    builder = OutputBuilder(out_dir, "", resume=resume, overwrite=overwrite)
    if not dry_run:
        builder.check_target()
    config_file = Path(config) if isinstance(config, (str, Path)) else None
    planned = plan_merge(cfg, opts, clock, config_file, None if dry_run else out_dir)
    if dry_run:
        plan = run_prepass(planned, make_context(planned, opts, clock, None), opts, clock)
        return MergeResult(None, plan, time.perf_counter() - t0, summary=plan.summary,
                           stages=clock.as_dict())
    builder.plan_id = resume_id(planned.plan_id, planned.ckpts)
    builder.open()
    hasher = content = None
    if cfg.output.hash_inputs:
        try:
            hasher, content = start_content_hashes(builder, planned.ckpts)
        except BaseException:
            builder.close_thread()
            raise
    ctx = make_context(planned, opts, clock, builder.work_dir)
    threads = torch.get_num_threads()
    try:
        plan = run_prepass(planned, ctx, opts, clock)
        if opts.stream_threads is not None:
            torch.set_num_threads(opts.stream_threads)
        with clock("stream"):
            read, written = stream_pass(ctx, planned.method, builder, planned.shards,
                                        planned.roles_of, planned.out_dtypes,
                                        check_output=not cfg.output.allow_nonfinite)
        clock.add("stream.writer_busy", builder.thread.busy_seconds)
        summary = planned.method.summary()
        with clock("finish"):
            sha = content
            if hasher is not None:
                with clock("finish.hash_wait"):
                    sha = hasher.result()
            finish_files(cfg, planned.method, builder, planned.ckpts, planned.shards, summary,
                         planned.backend, planned.plan_id, sha)
    except SafepatchError:
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
    log.info("merged %d tensors into %s in %.1f s (%.2f GB/s read)", len(planned.base.tensors),
             out, secs, read / secs / 1e9 if secs else 0.0)
    log.debug("stages: %s", clock.line())
    return MergeResult(out, plan, secs, read, written, summary, clock.as_dict(), ctx.bytes_read)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def compute_threads(torch_threads: int, writing: bool = True) -> int:
    """Threads for the ops during a CPU merge. While the output is written: one fewer than
    torch would use (at least 1), so the reader and writer threads have a core and never
    preempt an OpenMP region, whose other workers would then wait for the preempted one at
    its barrier; on few cores that costs more than the lost op thread gains. A pre-pass
    (`writing` False) only has the reader beside it, which maps page-cache windows and is
    idle most of the time, so it gets every thread. SAFEPATCH_MERGE_THREADS overrides both."""
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


def check_patterns(cfg: MergeConfig, base: Checkpoint) -> None:
    """Every include/exclude pattern must match some backbone tensor (a typo would otherwise
    patch everything, or nothing, without a word)."""
    for key, pats in (("include", cfg.include), ("exclude", cfg.exclude)):
        for pat in pats:
            if not any(fnmatch.fnmatchcase(n, pat) for n in base.tensors):
                example = next(iter(base.tensors), "")
                raise ConfigError(f"{key} pattern {clip(pat)} matches no tensor of the backbone "
                                  f"{base.source} (names look like {clip(example)})")


def check_apart_from_inputs(out_dir: Path, ckpts: dict[str, Checkpoint],
                            config_file: Path | None) -> None:
    """OUT must not be, lie inside or contain an input (checkpoints, their Hub cache
    repository, the config file)."""
    dirs = {}
    for role, ck in ckpts.items():
        label = "backbone" if role == "base" else f"{role} input"
        dirs[label] = ck.root
        blobs = hub_blobs_of(ck.root)
        if blobs is not None:
            dirs[f"{label}'s Hub cache repository"] = blobs.parent
    files = {"config": config_file} if config_file is not None else {}
    check_apart(out_dir, dirs, files)


def resume_id(plan_id: str, ckpts: dict[str, Checkpoint]) -> str:
    """What a partial output must have been made under to be resumed: the plan, plus each
    input file's size, mtime_ns, inode and header hash, so that new bytes under an unchanged
    header (a patch rewritten between a kill and --resume) start a different plan."""
    stats = {r: c.stat_identity() for r, c in ckpts.items()}
    doc = json.dumps({"plan": plan_id, "inputs": stats}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def start_content_hashes(builder: OutputBuilder, ckpts: dict[str, Checkpoint]):
    """(background ContentHasher, None) for output.hash_inputs; on a resume that keeps
    finished shards, (None, digests) computed now and compared with the digests the
    interrupted run recorded: different content is refused; unrecorded content (the run was
    killed before hashing finished) cannot vouch for the finished shards, which are redone.
    The digests go into the manifest as soon as they are known."""
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


def plan_id(cfg: MergeConfig, ckpts: Mapping[str, Checkpoint], shards: tuple[ShardPlan, ...],
            backend_name: str) -> str:
    """sha256 of what decides the output bytes: config, inputs, shards, backend, version."""
    doc = {"config": cfg.raw, "inputs": {r: {"source": c.source, "files": c.identity()}
                                         for r, c in ckpts.items()},
           "shards": [[s.filename, s.entries] for s in shards], "backend": backend_name,
           "version": __version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


__all__ = ["merge", "MergeResult", "MergePlan", "MergeOptions", "Planned", "merge_options",
           "plan_merge", "make_context", "run_prepass", "current_rss", "default_max_memory"]
