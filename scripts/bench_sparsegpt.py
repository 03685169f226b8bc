#!/usr/bin/env python3
"""Time sparsegpt_solve (50% + 4-bit grid on 8 column groups) at real sub-layer shapes.

    python scripts/bench_sparsegpt.py [--shapes vicuna-13b|smollm2] [--compare OTHER_SPARSEGPT.py]

--compare times another version of sparsegpt.py in the same process (before/after measurements).
Per decoder layer the tool makes four solves: q/k/v fused, o, gate/up fused, down.
"""
import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import quant  # noqa: E402
import sparsegpt  # noqa: E402

SHAPES = {  # (rows, cols, row_splits) of the four solves of one layer
    "vicuna-13b": [(15360, 5120, [5120] * 3), (5120, 5120, [5120]), (27648, 5120, [13824] * 2), (5120, 13824, [5120])],
    "smollm2": [(960, 576, [576, 192, 192]), (576, 576, [576]), (3072, 576, [1536] * 2), (576, 1536, [576])],
}


def load(path: str):
    spec = importlib.util.spec_from_file_location("sparsegpt_other", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def bench(module, shapes, device, repeats: int) -> list[float]:
    times = []
    for rows, cols, splits in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        X = torch.randn(4096, cols, device=device, generator=g)
        H = 2 / 4096 * X.T @ X
        W = torch.randn(rows, cols, device=device, generator=g) * 0.02
        grid = quant.group_grid(W, torch.arange(cols, device=device) % 8, [4] * 8)
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            module.sparsegpt_solve(W, H, sparsity=0.5, grid=grid, row_splits=splits)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        times.append(best)
    return times


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="vicuna-13b", choices=SHAPES)
    p.add_argument("--compare", help="path of another sparsegpt.py to time in the same run")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SHAPES[a.shapes]
    versions = [("current", sparsegpt)] + ([("compare", load(a.compare))] if a.compare else [])
    for name, module in versions:
        t = bench(module, shapes, device, a.repeats)
        cells = "  ".join(f"{r}x{c}: {s:.3f}s" for (r, c, _), s in zip(shapes, t))
        print(f"{name:8s} {device.type}  {cells}  per layer: {sum(t):.3f}s", flush=True)
