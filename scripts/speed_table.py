#!/usr/bin/env python3
"""The README's speed tables, from JSON reports named by a manifest.

    python scripts/speed_table.py reports/speed/bench_table.json [--out reports/speed/bench_table.md]
    python scripts/speed_table.py reports/speed/smollm2_table.json [--out reports/speed/smollm2_table.md]

Report paths are relative to the manifest's directory.
- A bench manifest ({"command", "rows": [{"label", "reports"}]}) tabulates scripts/bench_speed.py
  reports: per stage, one figure per report, comma-separated. Wall time excludes the plain-loop
  check when the report times it apart; "layer copies" is the stage "transfer" ("untimed" in
  reports without it).
- A runs manifest ({"kind": "runs", "command", "rows": [{"label", "host", "runs": [[...], ...],
  "against": [...]}]}) tabulates vicuna_mi.py reports' compression time: the runs' groups
  separated by "; ", then "against" the runs it alternated with.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

STAGES = (("statistics", "statistics"), ("clustering", "clustering"), ("allocation", "allocation"),
          ("prune + quantize", "prune_quant"), ("pack (wait)", "pack"), ("propagate", "propagate"),
          ("layer copies", "transfer"))
HEADER = ["run (report)", "wall, check excluded", *(name for name, _ in STAGES), "peak GPU"]


def _join(values: list[str]) -> str:
    return ", ".join(values)


def wall_cell(reports: list[dict]) -> str:
    """Wall time without the plain-loop check (with it, where the report does not time it apart), and the stages' sum."""
    walls = []
    for r in reports:
        check = r.get("plain_loop_check_s")
        walls.append(f"{r['compression_wall_s'] - check:.1f} s" if check is not None
                     else f"{r['compression_wall_s']:.1f} s with the check")
    stages = _join([f"{r['compression_s']:.1f}" for r in reports])
    return f"{_join(walls)} (stages {stages})"


def stage_cell(reports: list[dict], key: str) -> str:
    return _join([f"{r['stages_s'][key]:.1f}" if key in r["stages_s"] else "untimed" for r in reports])


def peak_cell(reports: list[dict]) -> str:
    peaks = list(dict.fromkeys(f"{r['peak_gpu_gib']:.2f}" for r in reports))   # distinct, in order
    return f"{_join(peaks)} GiB"


def row(label: str, names: list[str], reports: list[dict]) -> str:
    first, rest = names[0], [n.rsplit("/", 1)[-1] for n in names[1:]]
    refs = ", ".join([f"`{first}`", *(f"`{n}`" for n in rest)])
    cells = [f"{label} ({refs})", wall_cell(reports), *(stage_cell(reports, key) for _, key in STAGES), peak_cell(reports)]
    return "| " + " | ".join(cells) + " |"


def _compression(manifest: Path, names: list[str]) -> str:
    return _join([f"{json.loads((manifest.parent / name).read_text())['time_s']['compression']:.2f}" for name in names])


def runs_row(manifest: Path, entry: dict) -> str:
    """| label (reports) | compression of each group of runs, '; '-separated [against ...] | host |"""
    names = [name for group in entry["runs"] for name in group] + list(entry.get("against", []))
    figures = "; ".join(_compression(manifest, group) for group in entry["runs"])
    if entry.get("against"):
        figures += f" against {_compression(manifest, entry['against'])}"
    refs = ", ".join(f"`{name}`" for name in names)
    return f"| {entry['label']} ({refs}) | {figures} | {entry['host']} |"


def table(manifest: Path) -> str:
    spec = json.loads(manifest.read_text())
    runs = spec.get("kind") == "runs"
    header = ["code and condition (reports)", "compression, s", "host"] if runs else HEADER
    lines = [f"Made by `python scripts/speed_table.py {manifest}` from the reports of `{spec['command']}`.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in spec["rows"]:
        if runs:
            lines.append(runs_row(manifest, entry))
        else:
            reports = [json.loads((manifest.parent / name).read_text()) for name in entry["reports"]]
            lines.append(row(entry["label"], entry["reports"], reports))
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, help="markdown file (default: print)")
    a = p.parse_args(argv)
    try:
        text = table(a.manifest)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {a.manifest}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if a.out:
        a.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
