#!/usr/bin/env python3
"""Tabulate JSON run reports as a Markdown table: python scripts/tabulate.py results/mi/*.json"""
import json
import sys
from pathlib import Path


def row(path: Path) -> str:
    r = json.loads(path.read_text())
    c, ppl = r["config"], r["ppl"]
    bits = r.get("avg_bits", {})
    sp = r.get("sparsity", {})
    fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"
    mi_cl = r["time_s"].get("mi_clustering_fraction")
    return "| " + " | ".join([
        path.stem, c["method"], f"{c['prunen']}:{c['prunem']}" if c["prunen"] else f"{c['sparsity']:g}",
        (f"MI {c['grouping']} {c['target_avg_bits']:g} {{{','.join(map(str, c['bit_choices']))}}}"
         if c["use_mi_grouping"] else f"uniform {c['wbits']}"),
        fmt(bits.get("actual")), fmt(bits.get("effective")), fmt(sp.get("actual")),
        fmt(ppl.get("wikitext2")), fmt(ppl.get("ptb")), fmt(ppl.get("c4")),
        f"{r['time_s']['total']:.0f}", f"{mi_cl * 100:.1f}%" if mi_cl is not None else "-"]) + " |"


if __name__ == "__main__":
    print("| run | method | sparsity | bits | avg bits | effective bits | zeros | wikitext2 | ptb | c4 | wall s | MI+clust |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in sys.argv[1:]:
        print(row(Path(p)))
