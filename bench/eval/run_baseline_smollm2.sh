#!/usr/bin/env bash
# Baseline eval of SmolLM2-135M-Instruct (as shipped) on fixed 30-prompt subsets of every
# packaged suite, 64 new tokens, greedy, CPU. Results: bench/results/eval_baseline_smollm2/.
# The model directory is built offline by safepatch_merge.models.smollm2.ensure_smollm2().
# --threads 1: on a busy shared 2-core host, torch's default of 2 threads ran ~10x slower.
# DATA: the public data folder whose train/harmful_pairs.jsonl the evaluation is deduplicated
# against.
set -euo pipefail
DATA=${DATA:?set DATA to the public data folder (with train/harmful_pairs.jsonl)}
cd "$(dirname "$0")/../.."
MODEL=$(python -c "from safepatch_merge.models.smollm2 import ensure_smollm2; print(ensure_smollm2())")
exec safepatch eval "$MODEL" -o bench/results/eval_baseline_smollm2 --label SmolLM2-135M-Instruct \
  --suite xstest --suite harmbench --suite strongreject --suite advbench --suite mtbench \
  --limit "${LIMIT:-30}" --max-new-tokens 64 --batch-size 8 --threads 1 \
  --dedup-against "$DATA/train/harmful_pairs.jsonl" "$@"
