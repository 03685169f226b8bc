NSAMPLES=32 SEQLEN=256 SEEDS=0 CALIB_SPLIT=validation bash scripts/sweep.sh calibration results/calibration smollm2-135m ../shared/data -- --eval_samples 32
