#!/usr/bin/env bash
# Speed and memory of the full pipeline at Vicuna-13B's real shapes (40 layers, 5120, 13824) with
# random weights: 128 x 2048 calibration, MI groups, 50% sparsity, 4.0-bit target, full evaluation.
# Perplexities of random weights mean nothing; the times and the peak memory are the point.
#   bash scripts/bench_vicuna13b.sh [DATA_DIR] [extra vicuna_mi.py args]
set -euo pipefail
data=${1:-../shared/data}; shift || true
mkdir -p results/vicuna13b
PYTHONUNBUFFERED=1 python vicuna_mi.py synthetic:vicuna-13b c4 --nsamples 128 --seqlen 2048 \
  --sparsity 0.5 --target_avg_bits 4.0 --n_groups 8 --data_dir "$data" \
  --out results/vicuna13b/mi_t4.json "$@"
