#!/usr/bin/env python3
"""Tables and plots from vicuna_mi.py's JSON reports, e.g. a results directory of scripts/sweep.sh.

    python scripts/summarize.py RESULTS_DIR [MORE_DIRS_OR_REPORTS ...] [--out DIR] [--heatmap RUN]

Runs that differ only in their seed are one configuration. Writes to --out (default RESULTS_DIR):
  summary.md    the sweep command (from RESULTS_DIR/sweep.cmd), then one row per configuration:
                perplexity per set as the mean over seeds and (min–max)
  summary.csv   the same rows, numbers unformatted (ppl.<set>.mean / .min / .max)
  pareto.png    perplexity against effective bits per method and grouping, min–max bars over
                seeds, one panel per evaluation set
  heatmap_<run>.png  share of each width per layer and sub-layer of one run (--heatmap RUN: a
                report's file name without .json; default: the first MI-grouped run)
  time.png      wall time per stage per configuration (mean over seeds)
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import pandas as pd  # noqa: E402

# Config keys that do not change the result: runs differing only here are seeds of one configuration.
NOT_CONFIGURATION = ("seed", "out", "data_dir", "device", "batch_size", "trust_remote_code")
CONFIG_DEFAULTS = {"calib_split": "train"}  # keys that reports written before they existed lack
EVAL_ORDER = ("wikitext2", "ptb", "c4")
STAGE_ORDER = ("load", "evaluation_data", "calibration_data", "capture", "statistics", "mi", "clustering",
               "allocation", "prune_quant", "propagate", "evaluation")
NOT_STAGES = ("total", "compression", "mi_clustering_fraction")
GROUPING_ORDER = {"mi": 0, "random": 1, "contiguous": 2, "per row": 3, "-": 4}
SEED_SUFFIX = re.compile(r"_seed\d+$")


def read_reports(paths: list[Path]) -> dict[str, dict]:
    """Reports by run name (file name without .json); unreadable files are skipped with a warning."""
    files = [f for p in paths for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    reports: dict[str, dict] = {}
    for f in files:
        try:
            report = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            print(f"summarize: skipping {f}: {e}", file=sys.stderr)
            continue
        if not isinstance(report, dict) or "config" not in report:
            print(f"summarize: skipping {f}: not a vicuna_mi report", file=sys.stderr)
            continue
        name = f.stem if f.stem not in reports else f"{f.parent.name}/{f.stem}"
        reports[name] = report
    return reports


def _model_name(model: str) -> str:
    return Path(model).stem if model.endswith(".gguf") else model


def run_row(name: str, report: dict) -> dict:
    """One flat row per report; keys a report lacks become NaN (dense runs, --eval none, old reports)."""
    cfg = {**CONFIG_DEFAULTS, **report["config"]}
    bits = report.get("avg_bits") or {}
    grouped = bool(cfg.get("use_mi_grouping"))
    wbits = cfg.get("wbits", 16)
    quantized = grouped or wbits < 16
    prunen, prunem = cfg.get("prunen", 0), cfg.get("prunem", 0)
    pruned = cfg.get("sparsity", 0) > 0 or prunen > 0
    if pruned:
        method = cfg.get("method", "sparsegpt")
    elif quantized:  # quantization only: the SparseGPT solve at sparsity 0 is GPTQ; the others round to nearest
        method = "gptq" if cfg.get("method", "sparsegpt") == "sparsegpt" else "rtn"
    else:
        method = "dense"
    choices = cfg.get("bit_choices") or []
    calibration = "-"
    if pruned or quantized:
        calibration = cfg.get("dataset", "?") + ("" if cfg["calib_split"] == "train" else f" ({cfg['calib_split']})")
    target = bits.get("target", cfg.get("target_avg_bits") if grouped else (wbits if quantized else math.nan))
    row = {
        "config": json.dumps({k: v for k, v in cfg.items() if k not in NOT_CONFIGURATION}, sort_keys=True),
        "run": SEED_SUFFIX.sub("", name),
        "report": name,
        "model": _model_name(str(cfg.get("model", "?"))),
        "method": method,
        "sparsity": f"{prunen}:{prunem}" if prunen else f"{cfg.get('sparsity', 0):g}",
        "grouping": cfg.get("grouping", "mi") if grouped else ("per row" if quantized else "-"),
        "widths": ",".join(map(str, choices)) if grouped else (str(wbits) if quantized else "16"),
        "target": target,
        "bits": bits.get("actual", math.nan),
        "effective_bits": bits.get("effective", math.nan),
        "groups": cfg.get("n_groups", math.nan) if grouped else math.nan,
        "calibration": calibration,
        "nsamples": cfg.get("nsamples", math.nan),
        "seqlen": cfg.get("seqlen", math.nan),
        "seed": cfg.get("seed", 0),
    }
    for set_name, value in (report.get("ppl") or {}).items():
        row[f"ppl.{set_name}"] = value
    times = report.get("time_s") or {}
    row["compression_s"] = times.get("compression", math.nan)
    row["total_s"] = times.get("total", math.nan)
    for stage, seconds in times.items():
        if stage not in NOT_STAGES:
            row[f"time.{stage}"] = seconds
    return row


def eval_sets(runs: pd.DataFrame) -> list[str]:
    names = [c[len("ppl."):] for c in runs.columns if c.startswith("ppl.")]
    return sorted(names, key=lambda n: (EVAL_ORDER.index(n) if n in EVAL_ORDER else len(EVAL_ORDER), n))


def stage_columns(columns) -> list[str]:
    names = [c[len("time."):] for c in columns if c.startswith("time.")]
    names.sort(key=lambda n: (STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER), n))
    return [f"time.{n}" for n in names]


def configurations(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: descriptions, seeds, means over seeds, and per set ppl mean/min/max."""
    described = ["run", "model", "method", "sparsity", "grouping", "widths", "target", "groups",
                 "calibration", "nsamples", "seqlen"]
    averaged = ["bits", "effective_bits", "compression_s", "total_s"] + stage_columns(runs.columns)
    by_config = runs.groupby("config", sort=False)
    table = by_config[described].first()
    table["seeds"] = by_config["seed"].agg(lambda s: ",".join(str(int(x)) for x in sorted(s)))
    table["n_seeds"] = by_config["seed"].size()
    table[averaged] = by_config[averaged].mean()
    for name in eval_sets(runs):
        stats = by_config[f"ppl.{name}"].agg(["mean", "min", "max", "count"])
        for stat in stats.columns:
            table[f"ppl.{name}.{stat}"] = stats[stat]
    table["_grouping"] = table["grouping"].map(GROUPING_ORDER).fillna(len(GROUPING_ORDER))
    table["_n_widths"] = -table["widths"].str.count(",")
    table = table.sort_values(["model", "calibration", "method", "sparsity", "target", "_grouping", "_n_widths", "run"],
                              na_position="last", kind="stable")
    return table.drop(columns=["_grouping", "_n_widths"]).reset_index(drop=True)


def _number(value, digits: int) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _ppl_cell(row: pd.Series, name: str) -> str:
    mean, lo, hi = row[f"ppl.{name}.mean"], row[f"ppl.{name}.min"], row[f"ppl.{name}.max"]
    if pd.isna(mean):
        return "-"
    return f"{mean:.2f}" if row[f"ppl.{name}.count"] < 2 or lo == hi else f"{mean:.2f} ({lo:.2f}–{hi:.2f})"


def markdown_table(table: pd.DataFrame, sets: list[str]) -> str:
    shown = pd.DataFrame({
        "run": table["run"], "model": table["model"], "method": table["method"], "sparsity": table["sparsity"],
        "grouping": table["grouping"], "widths": table["widths"],
        "target": table["target"].map(lambda v: "-" if pd.isna(v) else f"{v:g}"),
        "bits": table["bits"].map(lambda v: _number(v, 3)),
        "effective bits": table["effective_bits"].map(lambda v: _number(v, 3)),
        "groups": table["groups"].map(lambda v: _number(v, 0)),
        "calibration": table["calibration"],
        "samples": [f"{int(n)}×{int(s)}" if calib != "-" and not (pd.isna(n) or pd.isna(s)) else "-"
                    for n, s, calib in zip(table["nsamples"], table["seqlen"], table["calibration"])],
        "seeds": table["seeds"],
    })
    for name in sets:
        shown[name] = [_ppl_cell(row, name) for _, row in table.iterrows()]
    shown["compression s"] = table["compression_s"].map(lambda v: _number(v, 1))
    numeric = {"target", "bits", "effective bits", "groups", "compression s", *sets}
    align = ["right" if c in numeric else "left" for c in shown.columns]
    return shown.to_markdown(index=False, disable_numparse=True, colalign=align)  # keep the formatted digits


def series_labels(table: pd.DataFrame) -> pd.Series:
    """Legend label per configuration: its grouping, prefixed by what else varies across the table."""
    compressed = table[table["method"] != "dense"]
    varying = [c for c in ("model", "calibration", "method", "sparsity", "groups") if compressed[c].nunique() > 1]

    def label(row: pd.Series) -> str:
        parts = [str(row[c]) for c in ("model", "calibration", "method") if c in varying]
        if "sparsity" in varying:
            parts.append(f"sparsity {row['sparsity']}")
        if row["grouping"] == "per row":
            parts.append("uniform per row")
        elif row["grouping"] == "-":
            parts.append("unquantized")
        else:
            count = f"{row['groups']:g} " if "groups" in varying else ""
            parts.append(f"{count}{row['grouping']} groups" + (", one width" if "," not in row["widths"] else ""))
        return ", ".join(parts)

    return table.apply(label, axis=1)


def plot_pareto(table: pd.DataFrame, sets: list[str], path: Path) -> bool:
    """Perplexity against effective bits per series, min–max over seeds; dense as a dashed line."""
    sets = [s for s in sets if table[f"ppl.{s}.mean"].notna().any()]
    if not sets:
        return False
    table = table.assign(series=series_labels(table))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 5.5), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], sets):
        mean, lo, hi = (f"ppl.{name}.{s}" for s in ("mean", "min", "max"))
        rows = table.dropna(subset=[mean])
        for _, dense in rows[rows["method"] == "dense"].iterrows():
            ax.axhline(dense[mean], color="grey", linestyle="--", label="dense")
        points = rows[rows["method"] != "dense"].dropna(subset=["effective_bits"])
        for label, group in points.groupby("series", sort=False):
            group = group.sort_values("effective_bits")
            yerr = [group[mean] - group[lo], group[hi] - group[mean]]
            ax.errorbar(group["effective_bits"], group[mean], yerr=yerr, marker="o", capsize=3, label=label)
        values = rows[[lo, hi]].to_numpy().ravel()
        if len(values) and values.min() > 0 and values.max() / values.min() > 5:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set(title=name, xlabel="effective bits per weight", ylabel="perplexity (mean, min–max over seeds)")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_heatmap(name: str, report: dict, path: Path) -> bool:
    """Share of each width among the input channels of every sub-layer: a panel per width, layer on x."""
    shares = pd.DataFrame([
        {"layer": int(r["layer"]), "sublayer": r["name"], "width": int(b), "share": c / sum(r["bit_histogram"].values())}
        for r in report.get("layers") or [] for b, c in (r.get("bit_histogram") or {}).items()])
    if shares.empty:
        return False
    widths = sorted(shares["width"].unique())
    sublayers = list(dict.fromkeys(shares["sublayer"]))
    layers = sorted(shares["layer"].unique())
    fig, axes = plt.subplots(len(widths), 1, squeeze=False, sharex=True, layout="constrained",
                             figsize=(max(6.0, 0.3 * len(layers) + 3), 0.8 + len(widths) * (0.3 * len(sublayers) + 0.5)))
    for ax, width in zip(axes[:, 0], widths):
        grid = (shares[shares["width"] == width]
                .pivot_table(index="sublayer", columns="layer", values="share", aggfunc="sum", fill_value=0.0)
                .reindex(index=sublayers, columns=layers, fill_value=0.0))
        image = ax.imshow(grid.to_numpy(), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(sublayers)), [s.split(".")[-1] for s in sublayers], fontsize=7)
        ax.set_ylabel(f"{width} bits")
    axes[-1, 0].set_xticks(range(len(layers)), layers, fontsize=7)
    axes[-1, 0].set_xlabel("layer")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="share of input channels")
    fig.suptitle(f"{name}: width shares per sub-layer")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_times(table: pd.DataFrame, path: Path) -> bool:
    """Stacked wall time per stage for each configuration (mean over seeds)."""
    columns = [c for c in stage_columns(table.columns) if table[c].notna().any()]
    if not columns:
        return False
    times = table.set_index("run")[columns].fillna(0.0).rename(columns=lambda c: c[len("time."):])
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.35 * len(times)), layout="constrained")
    times.plot.barh(stacked=True, ax=ax, width=0.8, colormap="tab20")
    ax.invert_yaxis()
    ax.set(xlabel="seconds (mean over seeds)", ylabel="", title="time per stage")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def default_heatmap_run(table: pd.DataFrame, reports: dict[str, dict], runs: pd.DataFrame) -> Optional[str]:
    """The first MI-grouped report in table order (else the first quantized one) that has layer records."""
    order = {run: i for i, run in enumerate(table["run"])}
    candidates = runs.assign(_order=runs["run"].map(order)).sort_values(["_order", "seed"], kind="stable")
    has_layers = candidates["report"].map(lambda r: bool(reports[r].get("layers")))
    for preferred in (candidates["grouping"] == "mi", candidates["grouping"] != "-"):
        hits = candidates[has_layers & preferred]
        if len(hits):
            return hits["report"].iloc[0]
    return None


def sweep_commands(paths: list[Path]) -> list[str]:
    lines: list[str] = []
    for p in paths:
        cmd_file = p / "sweep.cmd"
        if p.is_dir() and cmd_file.is_file():
            lines += [line for line in cmd_file.read_text().splitlines() if line.strip() and line not in lines]
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("results", nargs="+", type=Path, help="results directories and/or report files")
    p.add_argument("--out", type=Path, help="output directory (default: the first RESULTS_DIR)")
    p.add_argument("--heatmap", metavar="RUN", help="report name (file name without .json) or path of the width heatmap")
    a = p.parse_args(argv)
    reports = read_reports(a.results)
    if not reports:
        print(f"summarize: no reports in {' '.join(map(str, a.results))}", file=sys.stderr)
        return 2
    heatmap_reports = dict(reports)
    if a.heatmap is not None and a.heatmap not in reports:
        named = read_reports([Path(a.heatmap)]) if Path(a.heatmap).is_file() else {}
        if not named:
            print(f"summarize: --heatmap {a.heatmap}: no such report; names: {', '.join(reports)}", file=sys.stderr)
            return 2
        heatmap_reports.update(named)
    runs = pd.DataFrame([run_row(name, report) for name, report in reports.items()])
    table = configurations(runs)
    sets = eval_sets(runs)
    out = a.out or (a.results[0] if a.results[0].is_dir() else a.results[0].parent)
    out.mkdir(parents=True, exist_ok=True)

    commands = sweep_commands(a.results)
    header = ["<!-- generated by scripts/summarize.py -->"]
    header += (["Sweep:", "", "```bash", *commands, "```", ""] if commands
               else [f"Reports: {', '.join(f'`{x}`' for x in a.results)}", ""])
    header += [f"Table: `python scripts/summarize.py {' '.join(shlex.quote(str(x)) for x in a.results)}` "
               f"({len(runs)} reports, {len(table)} configurations). Perplexity: mean over seeds (min–max); "
               "bits: mean width over all weights; effective: bits per weight of a real format; "
               "compression s: `time_s.compression`, mean over seeds.", ""]
    (out / "summary.md").write_text("\n".join(header) + "\n" + markdown_table(table, sets) + "\n")
    table.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    written = [out / "summary.md", out / "summary.csv"]
    if plot_pareto(table, sets, out / "pareto.png"):
        written.append(out / "pareto.png")
    if a.heatmap is None:
        chosen = default_heatmap_run(table, reports, runs)
    else:
        chosen = a.heatmap if a.heatmap in reports else Path(a.heatmap).stem
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", chosen or "")
    if chosen is not None and plot_heatmap(chosen, heatmap_reports[chosen], out / f"heatmap_{safe}.png"):
        written.append(out / f"heatmap_{safe}.png")
    if plot_times(table, out / "time.png"):
        written.append(out / "time.png")
    print("\n".join(f"wrote {w}" for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
