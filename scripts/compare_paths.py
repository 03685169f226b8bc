#!/usr/bin/env python3
"""Perplexity of the fast paths against the paths before issue 9, on the same command.

    python scripts/compare_paths.py --out FILE.json -- MODEL DATASET [vicuna_mi.py flags]

Runs vicuna_mi.py's command twice in one process: as it is (tensor-core Hessian sums, fused OBS
loop on CUDA, shared statistics passes) and on the earlier paths (float32 Hessian GEMMs, the
PyTorch column loop, the walker's own pass per group). Writes both
reports' perplexities, their relative differences, and both compression times.
"""
import argparse
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sparsegpt  # noqa: E402
import vicuna_mi  # noqa: E402


def run_baseline(cfg: vicuna_mi.CompressConfig) -> dict:
    """vicuna_mi.run with the paths before issue 9, restored afterwards."""
    saved = (sparsegpt._gram_mode, sparsegpt.sparsegpt_solve, vicuna_mi.compress_model)
    solve, compress = saved[1], saved[2]
    try:
        sparsegpt._gram_mode = "float32"
        sparsegpt.sparsegpt_solve = lambda W, H, **kw: solve(W, H, **{**kw, "fused": False})
        vicuna_mi.compress_model = functools.partial(compress, shared_passes=False)
        return vicuna_mi.run(cfg)
    finally:
        sparsegpt._gram_mode, sparsegpt.sparsegpt_solve, vicuna_mi.compress_model = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", required=True, help="JSON with both runs' perplexities")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- MODEL DATASET [flags] as for vicuna_mi.py")
    a = p.parse_args()
    argv = a.command[1:] if a.command[:1] == ["--"] else a.command
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in ("fast", "baseline"):
        cfg = vicuna_mi.parse_args(argv + ["--out", str(out.with_suffix(f".{name}.json"))])
        runs[name] = vicuna_mi.run(cfg) if name == "fast" else run_baseline(cfg)
    fast, base = runs["fast"], runs["baseline"]
    result = {"command": "python vicuna_mi.py " + " ".join(argv),
              "ppl": {"fast": fast["ppl"], "baseline": base["ppl"]},
              "rel_diff": {k: fast["ppl"][k] / base["ppl"][k] - 1 for k in fast["ppl"]},
              "compression_s": {"fast": fast["time_s"]["compression"], "baseline": base["time_s"]["compression"]}}
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
