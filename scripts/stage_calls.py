"""Every stage call of one vicuna_mi run, in order, with its synchronised wall time.

    python scripts/stage_calls.py OUT.json MODEL DATASET [vicuna_mi options...]

Writes {"import_torch_s", "time_s" (the run's report), "calls": [[stage, seconds], ...], "ppl"}.
Layer l's calls run from its group's 4l-th "statistics" call (LLaMA-style layers: 4 input groups),
so the first layer's one-time costs show against the median layer. Set PROBE_CODE to a directory
holding another version's modules to time that version.
"""
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.environ.get("PROBE_CODE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_start = time.perf_counter()
import torch  # noqa: E402,F401

_import_torch_s = time.perf_counter() - _start
import vicuna_mi  # noqa: E402


def main(argv: list[str]) -> int:
    out, calls = argv[0], []
    timed = vicuna_mi.StageTimer.__call__

    @contextmanager
    def recording(self, stage):
        self._sync()
        start = time.perf_counter()
        try:
            with timed(self, stage):
                yield
        finally:
            self._sync()
            calls.append((stage, round(time.perf_counter() - start, 5)))

    vicuna_mi.StageTimer.__call__ = recording
    report_path = out + ".report.json"
    rc = vicuna_mi.main(argv[1:] + ["--out", report_path])
    report = json.load(open(report_path))
    os.remove(report_path)
    json.dump({"import_torch_s": _import_torch_s, "time_s": report["time_s"], "calls": calls, "ppl": report.get("ppl")},
              open(out, "w"))
    stats = [t for stage, t in calls if stage == "statistics"]
    per_layer = [sum(stats[4 * i:4 * i + 4]) for i in range(len(stats) // 4)]
    if per_layer:
        print(f"{out}: statistics of layer 0 {per_layer[0]:.3f} s, median layer {statistics.median(per_layer):.3f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
