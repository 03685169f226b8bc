#!/usr/bin/env python3
"""Time channel_grouping.allocate_bits and column_errors against the frozen copies in tests/_reference_alloc.py.

    python scripts/bench_alloc.py [--skip-column-errors] [--rows 5120] [--cols 13824]

allocate_bits: d = 5120 and 13824 channels, 8 groups, widths (2, 3, 4, 6, 8), target 4.0 (the
vicuna-13b sub-layers; 7 calls per decoder layer). column_errors: W [rows, cols], 8 groups, the
same widths, a 50% keep mask. Both check that the outputs equal the reference's.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import channel_grouping  # noqa: E402
from _reference_alloc import reference_allocate_bits, reference_column_errors  # noqa: E402

BITS = [2, 3, 4, 6, 8]


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-column-errors", action="store_true")
    ap.add_argument("--rows", type=int, default=5120)
    ap.add_argument("--cols", type=int, default=13824)
    ap.add_argument("--groups", type=int, default=8)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    for d in (5120, 13824):
        labels = torch.randint(0, args.groups, (d,), generator=g)
        scale = torch.exp(2 * torch.randn(d, 1, generator=g, dtype=torch.float64))
        col = scale * 4.0 ** -torch.tensor(BITS, dtype=torch.float64) * (1 + 0.3 * torch.rand(d, len(BITS), generator=g, dtype=torch.float64))
        new = channel_grouping.allocate_bits(col, labels, BITS, 4.0)
        ref = reference_allocate_bits(col, labels, BITS, 4.0)
        assert torch.equal(new.col_bits, ref.col_bits) and torch.equal(new.labels, ref.labels) and new.group_bits == ref.group_bits
        t_new = best_of(lambda: channel_grouping.allocate_bits(col, labels, BITS, 4.0), 20)
        t_ref = best_of(lambda: reference_allocate_bits(col, labels, BITS, 4.0), 3)
        print(f"allocate_bits d={d:6d} G={args.groups} C={len(BITS)}: reference {1e3 * t_ref:8.1f} ms   now {1e3 * t_new:8.2f} ms")
    if args.skip_column_errors:
        return
    W = torch.randn(args.rows, args.cols, generator=g)
    h = torch.rand(args.cols, generator=g)
    labels = torch.randint(0, args.groups, (args.cols,), generator=g)
    keep = torch.rand(args.rows, args.cols, generator=g) > 0.5
    for mask in (None, keep):
        t0 = time.perf_counter()
        ref = reference_column_errors(W, h, labels, args.groups, BITS, mask)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        new = channel_grouping.column_errors(W, h, labels, args.groups, BITS, mask)
        t_new = time.perf_counter() - t0
        assert torch.equal(new, ref)
        print(f"column_errors W [{args.rows}, {args.cols}] keep_mask={mask is not None}: reference {t_ref:6.2f} s   now {t_new:6.2f} s")


if __name__ == "__main__":
    main()
