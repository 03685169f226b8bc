#!/usr/bin/env bash
# Full-length sweeps on SmolLM2-135M (run them on a GPU: 128 x 2048 calibration, full evaluation).
#   bash scripts/sweep_smollm2.sh SUITE [MODEL] [DATA_DIR]
# SUITE: dense | baselines (plain SparseGPT, Wanda, magnitude, GPTQ-style quantization, 2:4)
#        | mi, mi3, mi4 (MI / random / contiguous groups at 3.0 and 4.0 bits vs uniform 3/4-bit, and one width for all)
# Each run writes results/<SUITE>/<name>.json; scripts/tabulate.py turns them into a table.
set -euo pipefail
suite=$1; model=${2:-smollm2-135m}; data=${3:-../shared/data}
out=results/${suite%[34]}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/log.txt"
  python vicuna_mi.py "$model" c4 --nsamples 128 --seqlen 2048 --data_dir "$data" "$@" \
    --out "$out/$name.json" 2>&1 | grep -v 'it/s\]\|s/it\]' | tee -a "$out/log.txt"
}
case $suite in
  dense)
    run dense --sparsity 0 --use_mi_grouping 0 --wbits 16 ;;
  baselines)
    run sparsegpt50      --sparsity 0.5 --use_mi_grouping 0 --wbits 16
    run sparsegpt50_w4   --sparsity 0.5 --use_mi_grouping 0 --wbits 4
    run wanda50          --sparsity 0.5 --use_mi_grouping 0 --wbits 16 --method wanda
    run magnitude50      --sparsity 0.5 --use_mi_grouping 0 --wbits 16 --method magnitude
    run gptq_w4          --sparsity 0   --use_mi_grouping 0 --wbits 4
    run gptq_w3          --sparsity 0   --use_mi_grouping 0 --wbits 3
    run sparsegpt_2of4   --sparsity 0 --prunen 2 --prunem 4 --use_mi_grouping 0 --wbits 16 ;;
  mi|mi3|mi4)
    bits_list="3 4"; [ "$suite" = mi3 ] && bits_list=3; [ "$suite" = mi4 ] && bits_list=4
    for bits in $bits_list; do
      run "uniform_w$bits" --sparsity 0.5 --use_mi_grouping 0 --wbits "$bits"
      for grouping in mi random contiguous; do
        run "${grouping}_t$bits" --sparsity 0.5 --n_groups 8 --target_avg_bits "$bits" --grouping "$grouping"
      done
    done
    [ "$suite" = mi3 ] || run mi_one_width_4 --sparsity 0.5 --n_groups 8 --target_avg_bits 4 --bit_choices 4 --grouping mi ;;
  *) echo "unknown suite $suite (dense | baselines | mi)" >&2; exit 2 ;;
esac
