#!/usr/bin/env bash
# Parameter sweeps through vicuna_mi.py, one JSON report per run, resumable.
#
#   bash scripts/sweep.sh SWEEP RESULTS_DIR [MODEL] [DATA_DIR] [-- ARGS FOR EVERY RUN]
#   python scripts/summarize.py RESULTS_DIR        # tables and plots from the reports
#
# SWEEP: equal_size | prototype | baselines | calibration (each is described at its `case` below).
# MODEL defaults to smollm2-135m; DATA_DIR to ../shared/data ("hub" reads the Hugging Face hub).
# Arguments after `--` go to every run and win over the sweep's own (except --seed and --out).
#
# Run r at seed s writes RESULTS_DIR/<r>_seed<s>.json. A run whose report exists is skipped, so the
# same command run again after an interruption (Ctrl-C, a lost machine) completes only the missing
# runs. vicuna_mi.py writes <r>_seed<s>.json.part, renamed to .json only after it exits with 0, so a
# killed or failed run never counts as done. Seeds are the outer loop: seed 0 of every run first.
# Each run's output goes to RESULTS_DIR/logs/<run>.log; each sweep command is appended to
# RESULTS_DIR/sweep.cmd, which summarize.py quotes at the top of summary.md.
#
# Environment (default):
#   PYTHON (python)  NSAMPLES (128)  SEQLEN (2048): calibration windows; a run's own --nsamples wins
#   SEEDS ("0 1 2" for equal_size, "0" for the others)
#   CALIB (c4): calibration set of equal_size, prototype and baselines
#   equal_size: TARGETS ("3.0 3.5 4.0")  GROUPINGS ("mi random contiguous")  UNIFORM ("3 4")
#               ONE_WIDTH ("contiguous"; "contiguous mi" adds MI groups at one width, "" none)
#   calibration: CALIB_SPLIT (validation)
#   ONLY: extended regex on run names (e.g. '^mi_t4'); MAX_RUNS: stop after starting this many runs;
#   DRY_RUN=1: print the commands, run nothing.
# Tiny CPU smoke test:
#   PYTHON=.venv/bin/python NSAMPLES=2 SEQLEN=32 SEEDS=0 TARGETS=4.0 GROUPINGS=mi UNIFORM= ONE_WIDTH= \
#     bash scripts/sweep.sh equal_size /tmp/sweep synthetic:tiny ../shared/data -- --eval wikitext2 --eval_samples 2
set -uo pipefail  # no -e: a failed run is logged and the sweep goes on

usage() {
  sed -n '4,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[ $# -ge 2 ] || usage
sweep=$1 results=$2
shift 2
model=smollm2-135m data=../shared/data
if [ $# -gt 0 ] && [ "$1" != -- ]; then model=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" != -- ]; then data=$1; shift; fi
if [ $# -gt 0 ]; then
  [ "$1" = -- ] || usage
  shift
fi
extra=("$@")

PYTHON=${PYTHON:-python}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
CALIB=${CALIB:-c4}
root=$(cd "$(dirname "$0")/.." && pwd)

configs=()  # one "name<TAB>dataset<TAB>args" per run; args hold no spaces of their own
add() {
  local name=$1 dataset=$2
  shift 2
  configs+=("$name"$'\t'"$dataset"$'\t'"$*")
}

case $sweep in
  equal_size)
    # Does MI grouping beat simpler groupings at the same size? 50% sparsity; mixed widths on MI,
    # random and contiguous groups of the same count at each target; uniform per-row widths; one
    # width on contiguous groups (the group-wise convention of GPTQ-style tools).
    SEEDS=${SEEDS:-0 1 2}
    TARGETS=${TARGETS-3.0 3.5 4.0}
    GROUPINGS=${GROUPINGS-mi random contiguous}
    UNIFORM=${UNIFORM-3 4}
    ONE_WIDTH=${ONE_WIDTH-contiguous}
    knobs=(TARGETS GROUPINGS UNIFORM ONE_WIDTH)
    for t in $TARGETS; do
      for g in $GROUPINGS; do
        add "${g}_t$t" "$CALIB" --sparsity 0.5 --grouping "$g" --target_avg_bits "$t" --n_groups 8
      done
    done
    for w in $UNIFORM; do
      add "uniform_w$w" "$CALIB" --sparsity 0.5 --use_mi_grouping 0 --wbits "$w"
    done
    for g in $ONE_WIDTH; do
      add "${g}_one_width_4" "$CALIB" --sparsity 0.5 --grouping "$g" --bit_choices 4 --target_avg_bits 4 --n_groups 8
    done
    ;;
  prototype)
    # The earlier prototype's three suggested configurations, as it gave them (--wbits is unused
    # while MI grouping is on; each sets its own --nsamples).
    SEEDS=${SEEDS:-0}
    knobs=()
    add proto_s0.4_t4.0_g10 "$CALIB" --nsamples 128 --sparsity 0.4 --wbits 4 --target_avg_bits 4.0 --n_groups 10
    add proto_s0.3_t5.0_g8 "$CALIB" --nsamples 128 --sparsity 0.3 --wbits 4 --target_avg_bits 5.0 --n_groups 8
    add proto_s0.5_t3.5_g10 "$CALIB" --nsamples 64 --sparsity 0.5 --wbits 3 --target_avg_bits 3.5 --n_groups 10
    ;;
  baselines)
    # The reference points of the MI runs (MI 4.0 at 50% sparsity): the dense model, one part off
    # at a time, other pruning methods, 2:4, and GPTQ-style quantization only.
    SEEDS=${SEEDS:-0}
    knobs=()
    add dense "$CALIB" --sparsity 0 --use_mi_grouping 0 --wbits 16
    add sparsegpt_w4 "$CALIB" --sparsity 0.5 --use_mi_grouping 0 --wbits 4
    add mi_t4.0_quant_only "$CALIB" --sparsity 0 --target_avg_bits 4.0 --n_groups 8
    add sparsegpt "$CALIB" --sparsity 0.5 --use_mi_grouping 0 --wbits 16
    add wanda "$CALIB" --sparsity 0.5 --method wanda --use_mi_grouping 0 --wbits 16
    add magnitude "$CALIB" --sparsity 0.5 --method magnitude --use_mi_grouping 0 --wbits 16
    add sparsegpt_2of4_mi_t4.0 "$CALIB" --sparsity 0 --prunen 2 --prunem 4 --target_avg_bits 4.0 --n_groups 8
    add sparsegpt_2of4 "$CALIB" --sparsity 0 --prunen 2 --prunem 4 --use_mi_grouping 0 --wbits 16
    add gptq_w4 "$CALIB" --sparsity 0 --use_mi_grouping 0 --wbits 4
    add gptq_w3 "$CALIB" --sparsity 0 --use_mi_grouping 0 --wbits 3
    ;;
  calibration)
    # MI 4.0 at 50% sparsity calibrated on each set and on a mix, each evaluated on all three sets
    # (the prototype saw PTB at 73.9 after calibrating on C4 alone). The offline copies of WikiText-2
    # and PTB have no train split, so they calibrate on validation (CALIB_SPLIT=train with the hub);
    # never on test, the split that is evaluated. c4 always calibrates on its train file (its
    # validation split is what c4 perplexity reads), also inside the mix.
    SEEDS=${SEEDS:-0}
    CALIB_SPLIT=${CALIB_SPLIT:-validation}
    knobs=(CALIB_SPLIT)
    mi=(--sparsity 0.5 --target_avg_bits 4.0 --n_groups 8)
    add calib_c4 c4 "${mi[@]}"
    add calib_wikitext2 wikitext2 "${mi[@]}" --calib_split "$CALIB_SPLIT"
    add calib_ptb ptb "${mi[@]}" --calib_split "$CALIB_SPLIT"
    add calib_mix c4+wikitext2+ptb "${mi[@]}" --calib_split "$CALIB_SPLIT"
    ;;
  *)
    echo "sweep.sh: unknown sweep '$sweep' (equal_size | prototype | baselines | calibration)" >&2
    exit 2
    ;;
esac

data_args=(--data_dir "$data")
[ "$data" = hub ] && data_args=()

# The command that reproduces this sweep, with the settings that shape it (not PYTHON, MAX_RUNS, DRY_RUN).
env_line="NSAMPLES=$NSAMPLES SEQLEN=$SEQLEN SEEDS=$(printf '%q' "$SEEDS")"
[ "$CALIB" = c4 ] || env_line+=" CALIB=$(printf '%q' "$CALIB")"
for knob in "${knobs[@]}"; do env_line+=" $knob=$(printf '%q' "${!knob}")"; done
[ -z "${ONLY:-}" ] || env_line+=" ONLY=$(printf '%q' "$ONLY")"
cmd_line="$env_line bash scripts/sweep.sh $sweep $(printf '%q ' "$results" "$model" "$data")"
[ ${#extra[@]} -eq 0 ] || cmd_line+="-- $(printf '%q ' "${extra[@]}")"
cmd_line=${cmd_line% }
if [ -z "${DRY_RUN:-}" ]; then
  mkdir -p "$results/logs"
  grep -qxF -- "$cmd_line" "$results/sweep.cmd" 2>/dev/null || echo "$cmd_line" >>"$results/sweep.cmd"
fi

child="" tmp=""
on_signal() {
  [ -z "$child" ] || kill "$child" 2>/dev/null
  [ -z "$tmp" ] || rm -f "$tmp"
  echo "sweep.sh: interrupted; run the same command again to resume" >&2
  exit 130
}
trap on_signal INT TERM

started=0 skipped=0 failed=()
for seed in $SEEDS; do
  for config in "${configs[@]}"; do
    IFS=$'\t' read -r name dataset args <<<"$config"
    read -ra argv <<<"$args"
    run=${name}_seed$seed
    if [ -n "${ONLY:-}" ] && ! [[ $run =~ $ONLY ]]; then continue; fi
    report=$results/$run.json
    if [ -e "$report" ]; then
      skipped=$((skipped + 1))
      echo "skip  $run (report exists)"
      continue
    fi
    cmd=("$PYTHON" "$root/vicuna_mi.py" "$model" "$dataset" "${data_args[@]}" --nsamples "$NSAMPLES"
         --seqlen "$SEQLEN" "${argv[@]}" "${extra[@]}" --seed "$seed" --out "$report.part")
    if [ -n "${DRY_RUN:-}" ]; then
      printf '%q ' "${cmd[@]}"
      echo
      continue
    fi
    if [ -n "${MAX_RUNS:-}" ] && [ "$started" -ge "$MAX_RUNS" ]; then
      echo "stop  after MAX_RUNS=$MAX_RUNS runs; run the same command again to resume"
      break 2
    fi
    started=$((started + 1))
    log=$results/logs/$run.log
    tmp=$report.part
    echo "run   $run: $dataset ${argv[*]} ${extra[*]}"
    t0=$SECONDS
    # In the background so that a signal reaches on_signal at once (it stops the run too).
    PYTHONUNBUFFERED=1 "${cmd[@]}" >"$log" 2>&1 &
    child=$!
    wait "$child"
    rc=$?
    child=""
    if [ "$rc" -eq 0 ] && [ -s "$tmp" ]; then
      mv -f "$tmp" "$report"  # a rename: the report appears whole or not at all
      echo "done  $run in $((SECONDS - t0)) s"
    else
      rm -f "$tmp"
      failed+=("$run")
      echo "FAIL  $run (exit $rc), last lines of $log:" >&2
      tail -n 5 "$log" >&2
    fi
    tmp=""
  done
done

[ -n "${DRY_RUN:-}" ] && exit 0
echo "sweep $sweep: $started started, $skipped skipped (reports exist), ${#failed[@]} failed${failed[*]:+: ${failed[*]}}"
echo "tables and plots: python scripts/summarize.py $results"
[ ${#failed[@]} -eq 0 ]
