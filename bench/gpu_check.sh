#!/usr/bin/env bash
# One-shot check on a CUDA machine (H100/H200; no network; torch + triton + nvcc installed).
# Run from anywhere inside a working tree of the repository:
#
#     OUT=/path/to/results bash bench/gpu_check.sh
#
# 1. records the machine (env.txt); 2. installs the package editable, offline (or maps
# triton_kernels/ and csrc/ into the package with symlinks when pip cannot); 3. builds the
# csrc extension with its CUDA sources for sm_90 only (build.txt); 4. runs the op tests with
# compiled kernels on the GPU, one pytest process per test file, all at once, plus
# bench/op_check_probe.py (C++ ops called with bad arguments, each in its own process) and
# torch.library.opcheck of every safepatch:: op on CUDA tensors, CUDA C++ and Triton kernels
# (tests/test_ops_library.py -k opcheck_cuda, its own process) (pytest.txt); 5. runs bench/gpu_kernel_bars.py with a small launch sweep (bars.txt,
# kernel_bars.csv), then bench/bench_ops.py --device cuda (bench.txt, ops.csv). summary.txt
# says what ran, how long each stage took and its exit status (per test file: pytest's
# summary line). Flat files under $OUT, no folders.
# Stage limits (s): install 15, build 50, pytest 120 (per process; files run in parallel, the
# two longest in SHARDS=4 processes each), bars 25, bench 35: about 250 s at most.
# LIMIT_{INSTALL,BUILD,PYTEST,BENCH,BARS,MERGE,SCORE} override them. MERGE_BENCH=1 adds the
# 0.7 B end-to-end merge with --device cuda (and once on the CPUs), inputs generated meanwhile;
# SCORE_BENCH=1 adds SNIP's scoring cost and memory (device vs host score buffers).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export SAFEPATCH_CACHE=${SAFEPATCH_CACHE:-/tmp/safepatch_ext_cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/safepatch_triton_cache}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export SAFEPATCH_VERBOSE_BUILD=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_INDEX=1
unset TRITON_INTERPRET SAFEPATCH_BACKEND SAFEPATCH_NO_EXT
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

stage() {  # stage NAME LIMIT_S LOGFILE CMD...: run with a time limit, log status and duration
  local name=$1 limit=$2 logf=$3
  shift 3
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$logf" 2>&1
  local rc=$?
  echo "$(printf '%-10s' "$name") rc=$rc  $(( $(date +%s) - t ))s  (limit ${limit}s; log $(basename "$logf"))" | tee -a "$SUMMARY"
  return $rc
}

# 1. machine
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  git status --short 2>/dev/null | head -n 20
} > "$OUT/env.txt" 2>&1

# 2. package: editable install, else symlinks so safepatch_merge.{triton_kernels,csrc} import
if ! stage install ${LIMIT_INSTALL:-15} "$OUT/build.txt" python3 -m pip install --no-deps --no-build-isolation -e . ; then
  ln -sfn ../triton_kernels safepatch_merge/triton_kernels
  ln -sfn ../csrc safepatch_merge/csrc
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "install failed: using symlinks + PYTHONPATH" | tee -a "$SUMMARY"
fi

if [ "${MERGE_BENCH:-0}" = 1 ]; then
  MERGE_WORK=${MERGE_WORK:-/tmp/safepatch_bench_merge}
  python3 bench/bench_merge.py --sizes ${MERGE_SIZE:-0.7b} --generate-only --workdir "$MERGE_WORK" \
    > "$OUT/merge_bench.txt" 2>&1 &
  GEN_PID=$!
fi

# 3. the extension, CUDA sources included (compile errors land in build.txt)
stage build ${LIMIT_BUILD:-50} "$OUT/build.txt" python3 - <<'EOF'
import logging, time
import torch
logging.basicConfig(level=logging.INFO)
from safepatch_merge.ops import _extension
t = time.time()
ok = _extension.load()
print(f"loaded={ok} cuda={_extension.has_cuda()} error={_extension.error()} seconds={time.time() - t:.1f}")
for op in ("saliency_accumulate_", "radix_histogram", "masked_merge"):
    print(op, "CUDA kernel registered:",
          ok and torch._C._dispatch_has_kernel_for_dispatch_key(f"safepatch::{op}", "CUDA"))
raise SystemExit(0 if ok and _extension.has_cuda() else 1)
EOF

# 4. op tests, compiled on the GPU (conftest leaves TRITON_INTERPRET unset when CUDA exists):
# one pytest process per file, all at once (Triton compiles on every core; a crash in one file
# hides nothing else), and the probe of the C++ ops' argument checks; logs gathered into
# pytest.txt in file order, one summary line per file.
TESTS=${TESTS:-$(ls tests/test_ops_*.py tests/test_triton_ops.py tests/test_philox.py tests/test_select.py \
        tests/test_extension.py 2>/dev/null | tr '\n' ' ')}
echo "tests: $TESTS" >> "$SUMMARY"
TLOG=$(mktemp -d /tmp/safepatch_pytest.XXXXXX)
t=$(date +%s)
# The direct C++-op argument test runs in a process of its own: run 1 died there with SIGSEGV,
# and a crash loses pytest's end-of-run failure report of everything else in its process.
ALONE=op_checks_its_own_arguments
# torch.library.opcheck of the ops on CUDA tensors (schema, fake kernel, autograd registration,
# AOT dispatch with dynamic shapes), CUDA C++ and compiled Triton: a process of its own too.
OPCHECK=opcheck_cuda
pytest_job() {  # pytest_job LOGNAME ARGS...
  local lname=$1 t1
  shift
  t1=$(date +%s)
  timeout --kill-after=5 "${LIMIT_PYTEST:-120}" python3 -X faulthandler -m pytest -q \
    -p no:cacheprovider -rfE --tb=line "$@" > "$TLOG/$lname.log" 2>&1
  echo "rc=$? $(( $(date +%s) - t1 ))s" > "$TLOG/$lname.rc"
}
# The two files with the most Triton variants run in SHARDS processes each (run 2: both hit the
# 75 s limit compiling one variant after another on one core).
SHARDED="test_ops_merge.py test_triton_ops.py"
SHARDS=${SHARDS:-4}
LOGS=""
PIDS=""
for f in $TESTS; do
  b=$(basename "$f")
  if [[ " $SHARDED " == *" $b "* ]]; then
    for i in $(seq 0 $((SHARDS - 1))); do
      SAFEPATCH_TEST_SHARD="$i/$SHARDS" pytest_job "$b.shard$i" "$f" -k "not $ALONE and not $OPCHECK" &
      PIDS="$PIDS $!"
      LOGS="$LOGS $b.shard$i"
    done
  else
    pytest_job "$b" "$f" -k "not $ALONE and not $OPCHECK" &
    PIDS="$PIDS $!"
    LOGS="$LOGS $b"
  fi
done
pytest_job "$ALONE" tests/test_ops_merge.py -k "$ALONE" &
PIDS="$PIDS $!"
pytest_job "$OPCHECK" tests/test_ops_library.py -k "$OPCHECK" &
PIDS="$PIDS $!"
# the engine's CUDA pipeline and SNIP on the GPU (their tests marked gpu)
GPU_MARKED=gpu_marked
pytest_job "$GPU_MARKED" tests/test_merge_engine.py tests/test_score_snip.py \
  tests/test_score_host_buffers.py -m gpu &
PIDS="$PIDS $!"
( timeout --kill-after=5 "${LIMIT_PYTEST:-120}" python3 bench/op_check_probe.py > "$TLOG/probe.log" 2>&1
  echo "rc=$?" >> "$TLOG/probe.log" ) &
PIDS="$PIDS $!"
wait $PIDS  # not the background input generation of step 6
for b in $LOGS $ALONE $OPCHECK $GPU_MARKED; do
  f=$b
  { echo "=== $f $(cat "$TLOG/$b.rc" 2>/dev/null)"; cat "$TLOG/$b.log" 2>/dev/null; } >> "$OUT/pytest.txt"
  echo "pytest     $b $(cat "$TLOG/$b.rc" 2>/dev/null || echo 'rc=?'): $(grep -E '(passed|failed|error|no tests ran)' "$TLOG/$b.log" | tail -n 1)" | tee -a "$SUMMARY"
done
{ echo "=== bench/op_check_probe.py"; cat "$TLOG/probe.log"; } >> "$OUT/pytest.txt"
grep -E '^probe|^rc=' "$TLOG/probe.log" | sed 's/^/  /' >> "$SUMMARY"
echo "pytest     all files $(( $(date +%s) - t ))s (limit ${LIMIT_PYTEST:-120}s per file; log pytest.txt)" | tee -a "$SUMMARY"
rm -rf "$TLOG"

# 5. benchmarks: the kernel bars first (short), then every op on every backend through the
# public ops (bench_ops.py; this run's rows go to a fresh ops.csv in $OUT).
stage bars ${LIMIT_BARS:-25} "$OUT/bars.txt" python3 bench/gpu_kernel_bars.py --skip-reference --sweep small \
  --csv "$OUT/kernel_bars.csv"
grep -E "PASS|FAIL|copy bandwidth|^sweep" "$OUT/bars.txt" | sed 's/^/  bars: /' >> "$SUMMARY"
if [ -f bench/bench_ops.py ]; then
  stage bench_ops ${LIMIT_BENCH:-35} "$OUT/bench.txt" python3 bench/bench_ops.py --device cuda --reps 5 \
    --csv "$OUT/ops.csv"
  grep -E "FAILED" "$OUT/bench.txt" | sed 's/^/  bench: /' >> "$SUMMARY"
else
  echo "bench/bench_ops.py missing: skipped" | tee -a "$SUMMARY"
fi

# 6. optional (MERGE_BENCH=1): the end-to-end merge with --device cuda on the 0.7 B
# synthetic model; its inputs are generated on the CPUs in the background from the start.
if [ "${MERGE_BENCH:-0}" = 1 ]; then
  wait "$GEN_PID"
  echo "merge_gen  rc=$? inputs $([ -f "$MERGE_WORK/${MERGE_SIZE:-0.7b}/generated.ok" ] && echo complete || echo MISSING) (log merge_bench.txt)" | tee -a "$SUMMARY"
  stage merge ${LIMIT_MERGE:-120} "$OUT/merge_bench.txt" python3 bench/bench_merge.py --sizes ${MERGE_SIZE:-0.7b} \
    --repeats ${MERGE_REPEATS:-2} --device cuda --skip-mergekit --reuse-inputs --keep --workdir "$MERGE_WORK" \
    --results-dir "$OUT" --max-memory ${MERGE_MEM_CUDA:-12GiB}
  # 12 GiB: room to keep the 5.6 GB of fp32 scores the threshold refinement brings to the
  # device there for the merge pass, so the inputs are read once
  grep -E "wall_s|safepatch wall" "$OUT/merge_bench.txt" | cut -c1-220 | sed 's/^/  merge: /' >> "$SUMMARY"
  grep -E "in-process" "$OUT/merge_bench.txt" | sed 's/^/  merge: /' >> "$SUMMARY"
  # retention drawn before the selection: one more read of the scores in the pre-pass
  stage merge_before ${LIMIT_MERGE:-120} "$OUT/merge_bench.txt" python3 bench/bench_merge.py --sizes ${MERGE_SIZE:-0.7b} \
    --repeats 1 --device cuda --skip-mergekit --reuse-inputs --keep --workdir "$MERGE_WORK" \
    --results-dir "$OUT" --max-memory ${MERGE_MEM_CUDA:-12GiB} --retention-order before_selection
  grep -E "wall_s" "$OUT/merge_bench.txt" | tail -n 1 | cut -c1-220 | sed 's/^/  merge_before: /' >> "$SUMMARY"
  # the same merge on the host's CPUs, for scale (one run)
  stage merge_cpu ${LIMIT_MERGE:-120} "$OUT/merge_bench.txt" python3 bench/bench_merge.py --sizes ${MERGE_SIZE:-0.7b} \
    --repeats 1 --device cpu --skip-mergekit --reuse-inputs --keep --workdir "$MERGE_WORK" \
    --results-dir "$OUT" --max-memory 4GiB
  grep -E "wall_s" "$OUT/merge_bench.txt" | tail -n 1 | cut -c1-220 | sed 's/^/  merge_cpu: /' >> "$SUMMARY"
  grep -E "in-process" "$OUT/merge_bench.txt" | tail -n 1 | sed 's/^/  merge_cpu: /' >> "$SUMMARY"
fi

# 7. optional (SCORE_BENCH=1): SNIP's cost and peak memory on the GPU, with the score
# buffers on the device and in host memory, on a random-weight SmolLM2-135M-shaped model (cost
# depends on shapes and lengths, not values). Scoring data: the packaged benign reference
# answers, or SCORE_DATA=FILE (pairs; every 7th is taken, as for the harmful pairs).
if [ "${SCORE_BENCH:-0}" = 1 ]; then
  stage score ${LIMIT_SCORE:-180} "$OUT/score_bench.txt" python3 bench/bench_score.py --device cuda \
    ${SCORE_DATA:+--data "$SCORE_DATA" --stride 7} \
    --dtype bfloat16 --batch-size 8 --num-examples 60 --max-length 512 --repeats 3 --host-buffers \
    --random-weights /tmp/smollm2_rand --out "$OUT/score_bench.csv"
  grep -E '"(tokens|time_ratio|host_time_ratio|peak_[a-z_]+_MB|[a-z_]*memory_ratio[a-z_]*)"' \
    "$OUT/score_bench.txt" | sed 's/^/  score: /' >> "$SUMMARY"
fi

echo "total $(( $(date +%s) - T0 ))s" | tee -a "$SUMMARY"
