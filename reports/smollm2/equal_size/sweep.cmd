# on the H100 (GPU.md recipe), over two calls, with c444caa plus the allocator and report changes later committed in 8f65c72 (HEAD computes the same); uniform widths at seed 0 only (device time)
NSAMPLES=128 SEQLEN=2048 SEEDS="0 1 2" TARGETS="3.0 4.0" GROUPINGS="mi random" UNIFORM="" ONE_WIDTH="" bash scripts/sweep.sh equal_size results/equal_size "$SMOLLM2_GGUF" "$MI_DATA_DIR"
NSAMPLES=128 SEQLEN=2048 SEEDS="0" GROUPINGS="" UNIFORM="3 4" ONE_WIDTH="" bash scripts/sweep.sh equal_size results/equal_size "$SMOLLM2_GGUF" "$MI_DATA_DIR"
