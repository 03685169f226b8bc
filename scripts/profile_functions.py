"""Synchronised wall time and call count of the compression's main functions over one vicuna_mi run.

    python scripts/profile_functions.py OUT.json MODEL DATASET [vicuna_mi options...]

Each listed function is wrapped (CUDA synchronised before and after, so the times nest: a caller's
time includes its callees'); ``eigh.cpu`` / ``eigh.cuda`` are torch.linalg.eigh by device. The
synchronisations add a little to the run's own stage times.
"""
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import channel_grouping as cg  # noqa: E402
import quant  # noqa: E402
import vicuna_mi  # noqa: E402

FUNCTIONS = [(cg, n) for n in ("top_eigenvectors", "subspace_eigenvectors", "_orthonormalize", "kmeans", "_kmeans_plusplus",
                               "_lloyd", "_fill_empty", "_canonical", "silhouette_score", "column_errors",
                               "allocate_bits_many", "_knapsack_tables_all", "_best_splits_all",
                               "_start_block")]
FUNCTIONS += [(quant, "stacked_group_grid"), (vicuna_mi, "finish_records"), (cg._EigenWindows, "run")]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    totals: dict[str, list] = {}

    def add(key: str, seconds: float) -> None:
        entry = totals.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds

    def wrap(owner, name: str) -> None:
        f = getattr(owner, name)
        key = f"{getattr(owner, '__name__', owner)}.{name}"

        @functools.wraps(f)
        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                sync()
                add(key, time.perf_counter() - start)

        setattr(owner, name, timed)

    for owner, name in FUNCTIONS:
        wrap(owner, name)
    eigh = torch.linalg.eigh

    def eigh_timed(A, *args, **kwargs):
        start = time.perf_counter()
        result = eigh(A, *args, **kwargs)
        add(f"eigh.{A.device.type}", time.perf_counter() - start)
        return result

    torch.linalg.eigh = eigh_timed
    out = argv[0]
    rc = vicuna_mi.main(argv[1:] + ["--out", out + ".report.json"])
    report = json.load(open(out + ".report.json"))
    os.remove(out + ".report.json")
    json.dump({"time_s": report["time_s"], "funcs": totals}, open(out, "w"), indent=1)
    for key, (n, seconds) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"  {key:40s} {n:6d} {seconds:7.3f} s {1000 * seconds / n:7.2f} ms/call")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
