#!/usr/bin/env bash
# Save, reload and export three compression modes, and compare the perplexities (issue 8's check).
#   bash scripts/checkpoint_roundtrip.sh MODEL DATA_DIR RESULTS_DIR [-- extra args for the compressing runs]
# For each mode: compress with --save (packed) and --save_dense (HF fp16), evaluate the packed
# checkpoint as MODEL (nothing compressed again), evaluate the dense export as a whole model
# (--eval_layerwise 0), then print bytes on disk and the three perplexities side by side.
set -euo pipefail
model=$1; data=$2; out=$3; shift 3; [ "${1:-}" = "--" ] && shift
PYTHON=${PYTHON:-python}; NSAMPLES=${NSAMPLES:-128}; SEQLEN=${SEQLEN:-2048}
mkdir -p "$out"
common=(--data_dir "$data" --seqlen "$SEQLEN")
[ -n "${EVAL_SAMPLES:-}" ] && common+=(--eval_samples "$EVAL_SAMPLES")  # short CPU checks
declare -A modes=(
  [mi4_s50]="--sparsity 0.5 --target_avg_bits 4.0 --n_groups 8"
  [w4_2of4]="--sparsity 0 --prunen 2 --prunem 4 --use_mi_grouping 0 --wbits 4"
  [w3_s0]="--sparsity 0 --use_mi_grouping 0 --wbits 3"
)
for name in mi4_s50 w4_2of4 w3_s0; do
  # shellcheck disable=SC2086
  $PYTHON vicuna_mi.py "$model" c4 "${common[@]}" --nsamples "$NSAMPLES" ${modes[$name]} "$@" \
    --save "$out/$name.packed" --save_dense "$out/$name.dense" --out "$out/$name.json" > "$out/$name.log" 2>&1
  $PYTHON vicuna_mi.py "$out/$name.packed" c4 "${common[@]}" --sparsity 0 --use_mi_grouping 0 --wbits 16 \
    --out "$out/$name.reload.json" > "$out/$name.reload.log" 2>&1
  $PYTHON vicuna_mi.py "$out/$name.dense" c4 "${common[@]}" --sparsity 0 --use_mi_grouping 0 --wbits 16 \
    --eval_layerwise 0 --out "$out/$name.dense.json" > "$out/$name.dense.log" 2>&1
  echo "done $name"
done
$PYTHON - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| mode | packed bytes | fp16 bytes | ratio | effective bits (bytes) | in-memory ppl (w2/ptb/c4) | reloaded ppl | dense export ppl |")
print("|---|---|---|---|---|---|---|---|")
for name in ("mi4_s50", "w4_2of4", "w3_s0"):
    r = json.loads((out / f"{name}.json").read_text())
    re_ = json.loads((out / f"{name}.reload.json").read_text())
    de = json.loads((out / f"{name}.dense.json").read_text())
    disk = sum(f.stat().st_size for f in (out / f"{name}.packed").iterdir())
    size = r.get("size", {})
    fmt = lambda p: " / ".join(f"{p[k]:.3f}" for k in ("wikitext2", "ptb", "c4") if k in p)
    print(f"| {name} | {disk:,} | {size.get('fp16_bytes', 0):,} | {disk / max(size.get('fp16_bytes', 1), 1):.3f} | "
          f"{r['avg_bits']['effective']:.4f} | {fmt(r['ppl'])} | {fmt(re_['ppl'])} | {fmt(de['ppl'])} |")
    print(f"|   equal? | | | | | | {re_['ppl'] == r['ppl']} | {de['ppl'] == r['ppl']} |")
PY
