"""scripts/sweep.sh (resumable sweeps) and scripts/summarize.py (tables and plots) on tiny CPU runs."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.sh"
# equal_size cut to three runs of the tiny model: MI and random groups at 4.0 bits, uniform 4-bit.
TINY_ENV = {"PYTHON": sys.executable, "NSAMPLES": "2", "SEQLEN": "32", "SEEDS": "0", "TARGETS": "4.0",
            "GROUPINGS": "mi random", "UNIFORM": "4", "ONE_WIDTH": ""}
TINY_RUNS = ["mi_t4.0_seed0", "random_t4.0_seed0", "uniform_w4_seed0"]


def _load_summarize():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "scripts" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summarize = _load_summarize()


def sweep_cmd(results: Path, data_dir: str, sweep: str = "equal_size") -> list[str]:
    return ["bash", str(SWEEP), sweep, str(results), "synthetic:tiny", data_dir,
            "--", "--eval", "wikitext2", "--eval_samples", "2"]


def sweep_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAX_RUNS", "DRY_RUN", "ONLY")}
    return {**env, **TINY_ENV, **extra}


def reports(results: Path) -> dict[str, int]:
    """Report name -> mtime in ns, for every finished report."""
    return {p.stem: p.stat().st_mtime_ns for p in sorted(results.glob("*.json"))}


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory, data_dir) -> dict:
    """One tiny sweep, stopped twice: after MAX_RUNS=1, then killed (SIGKILL) once a second report exists."""
    results = tmp_path_factory.mktemp("sweep") / "results"
    seen: dict = {"results": results}
    first = subprocess.run(sweep_cmd(results, data_dir), env=sweep_env(MAX_RUNS="1"), capture_output=True,
                           text=True, timeout=120)
    seen["first"], seen["after_first"] = first, reports(results)

    proc = subprocess.Popen(sweep_cmd(results, data_dir), env=sweep_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(reports(results)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the run it had started next
    proc.wait()
    seen["after_kill"] = reports(results)
    # A run killed while writing its report leaves at most a .part file, which must not count as done.
    (results / f"{TINY_RUNS[2]}.json.part").write_text('{"config": {"trunc')

    last = subprocess.run(sweep_cmd(results, data_dir), env=sweep_env(), capture_output=True, text=True, timeout=120)
    seen["last"], seen["after_last"] = last, reports(results)
    return seen


def test_sweep_resumes_after_stop_and_kill(interrupted_sweep):
    seen = interrupted_sweep
    assert seen["first"].returncode == 0, seen["first"].stderr
    assert list(seen["after_first"]) == TINY_RUNS[:1]
    assert "MAX_RUNS=1" in seen["first"].stdout
    assert list(seen["after_kill"]) == TINY_RUNS[:2]
    assert seen["after_kill"][TINY_RUNS[0]] == seen["after_first"][TINY_RUNS[0]]

    assert seen["last"].returncode == 0, seen["last"].stdout + seen["last"].stderr
    assert sorted(seen["after_last"]) == sorted(TINY_RUNS)
    for run in TINY_RUNS[:2]:  # finished reports are neither rerun nor rewritten
        assert seen["after_last"][run] == seen["after_kill"][run]
        assert f"skip  {run}" in seen["last"].stdout
    assert "1 started, 2 skipped (reports exist), 0 failed" in seen["last"].stdout
    results = seen["results"]
    assert not list(results.glob("*.part"))
    for run in TINY_RUNS:
        report = json.loads((results / f"{run}.json").read_text())
        assert report["config"]["seed"] == 0 and report["config"]["nsamples"] == 2
        assert report["eval_windows"] == {"wikitext2": 2}
        assert (results / "logs" / f"{run}.log").is_file()
    assert "bash scripts/sweep.sh equal_size" in (results / "sweep.cmd").read_text()


def test_failed_run_leaves_no_report(tmp_path):
    # A stand-in for vicuna_mi.py that writes half a report to --out, then fails.
    fake = tmp_path / "fake_python"
    fake.write_text('#!/usr/bin/env bash\nwhile [ "$1" != --out ]; do shift; done\necho "{" > "$2"\nexit 3\n')
    fake.chmod(0o755)
    results = tmp_path / "results"
    done = subprocess.run(sweep_cmd(results, "unused"), env=sweep_env(PYTHON=str(fake)), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert "3 failed" in done.stdout and "FAIL  mi_t4.0_seed0 (exit 3)" in done.stderr
    assert not list(results.glob("*.json")) and not list(results.glob("*.part"))


def _dry_run(sweep: str, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("SEEDS", "TARGETS", "GROUPINGS", "UNIFORM", "ONE_WIDTH")}
    done = subprocess.run(["bash", str(SWEEP), sweep, "/nonexistent/results", "smollm2-135m", "../shared/data"],
                          env={**base, "DRY_RUN": "1", **env}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_sweep_lists():
    lines = _dry_run("equal_size")
    assert len(lines) == (3 * 3 + 2 + 1) * 3  # targets x groupings, uniform 3/4, one width; seeds 0 1 2
    assert all("--seed" in line and "--nsamples 128 --seqlen 2048" in line for line in lines)
    assert sum("--grouping contiguous --bit_choices 4 --target_avg_bits 4" in line for line in lines) == 3
    assert sum("--use_mi_grouping 0 --wbits 3" in line for line in lines) == 3
    subset = _dry_run("equal_size", TARGETS="3.0 4.0", GROUPINGS="mi random", SEEDS="0")
    assert len(subset) == 2 * 2 + 2 + 1
    assert len(_dry_run("prototype")) == 3
    baselines = _dry_run("baselines")
    assert len(baselines) == 10 and any("--method wanda" in line for line in baselines)
    calibration = _dry_run("calibration")
    assert [line.split()[3] for line in calibration] == ["c4", "wikitext2", "ptb", "c4+wikitext2+ptb"]
    assert sum("--calib_split validation" in line for line in calibration) == 3
    unknown = subprocess.run(["bash", str(SWEEP), "nope", "/tmp/x"], capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 2 and "unknown sweep" in unknown.stderr


# --- summarize.py ----------------------------------------------------------------------------


def _png_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 0.05


def test_summarize_sweep_reports(interrupted_sweep, tmp_path, capsys):
    results = interrupted_sweep["results"]
    out = tmp_path / "summary"
    assert summarize.main([str(results), "--out", str(out)]) == 0
    md = (out / "summary.md").read_text()
    lines = md.splitlines()
    assert lines[3] == "```bash" and lines[4].startswith("NSAMPLES=2 SEQLEN=32 SEEDS=0")
    assert "bash scripts/sweep.sh equal_size" in lines[4]
    rows = [line.split("|")[1].strip() for line in lines if line.startswith("| ") and not line.startswith("| run ")]
    assert rows == ["mi_t4.0", "random_t4.0", "uniform_w4"]
    csv = pd.read_csv(out / "summary.csv")
    assert list(csv["run"]) == ["mi_t4.0", "random_t4.0", "uniform_w4"]
    assert list(csv["grouping"]) == ["mi", "random", "per row"]
    assert (csv["n_seeds"] == 1).all() and (csv["ppl.wikitext2.mean"] > 1).all()
    for name in ("pareto.png", "heatmap_mi_t4.0_seed0.png", "time.png"):
        _png_ok(out / name)
    assert summarize.main([str(results), "--out", str(out), "--heatmap", "uniform_w4_seed0"]) == 0
    _png_ok(out / "heatmap_uniform_w4_seed0.png")
    assert summarize.main([str(results), "--out", str(out), "--heatmap", "nope"]) == 2
    assert "no such report" in capsys.readouterr().err


def _report(seed: int, ppl: dict, **config) -> dict:
    cfg = {"model": "synthetic:tiny", "dataset": "c4", "nsamples": 2, "seqlen": 32, "seed": seed,
           "sparsity": 0.5, "prunen": 0, "prunem": 0, "method": "sparsegpt", "wbits": 16,
           "use_mi_grouping": True, "grouping": "mi", "n_groups": 8, "target_avg_bits": 4.0,
           "bit_choices": [2, 3, 4, 6, 8], "eval": list(ppl), "data_dir": f"/data{seed}", "out": f"r{seed}.json",
           **config}
    layers = [{"layer": i, "name": n, "shape": [64, 64], "bits": 4.0, "time_s": 0.1,
               "bit_histogram": {"3": 32, "4": 16, "6": 16}} for i in range(2) for n in ("q_proj", "down_proj")]
    return {"config": cfg, "ppl": ppl, "eval_windows": {k: 2 for k in ppl},
            "avg_bits": {"target": 4.0, "actual": 4.0, "effective": 3.2 + seed / 100},
            "time_s": {"total": 10.0 + seed, "load": 1.0, "mi": 0.5, "prune_quant": 2.0, "evaluation": 1.0,
                       "compression": 3.0 + seed}, "layers": layers}


def test_summarize_aggregates_seeds(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    made = {
        "mi_t4_seed0": _report(0, {"wikitext2": 10.0, "ptb": 20.0}),
        "mi_t4_seed1": _report(1, {"wikitext2": 12.0, "ptb": 30.0}),
        "mi_t4_seed2": _report(2, {"wikitext2": 17.0, "ptb": 40.0}),
        "random_t4_seed0": _report(0, {"wikitext2": 15.0, "ptb": 35.0}, grouping="random"),
        "noeval_seed0": _report(0, {}, grouping="contiguous"),  # --eval none: empty ppl
    }
    dense = copy.deepcopy(made["random_t4_seed0"])
    dense["config"].update(sparsity=0.0, use_mi_grouping=False)
    for key in ("avg_bits", "layers"):
        dense.pop(key)
    dense["time_s"] = {"total": 5.0, "load": 4.0, "evaluation": 1.0, "compression": 0.0}
    made["dense"] = dense
    for name, report in made.items():
        (results / f"{name}.json").write_text(json.dumps(report))
    (results / "broken.json").write_text('{"config": ')  # e.g. a run killed while writing --out

    assert summarize.main([str(results)]) == 0
    csv = pd.read_csv(results / "summary.csv").set_index("run")
    assert sorted(csv.index) == ["dense", "mi_t4", "noeval", "random_t4"]
    mi = csv.loc["mi_t4"]
    assert mi["seeds"] == "0,1,2" and mi["n_seeds"] == 3
    assert mi["ppl.wikitext2.mean"] == pytest.approx(13.0)
    assert (mi["ppl.wikitext2.min"], mi["ppl.wikitext2.max"]) == (10.0, 17.0)
    assert mi["ppl.ptb.mean"] == pytest.approx(30.0)
    assert mi["effective_bits"] == pytest.approx(3.21) and mi["compression_s"] == pytest.approx(4.0)
    assert csv.loc["dense", "method"] == "dense" and pd.isna(csv.loc["dense", "effective_bits"])
    assert pd.isna(csv.loc["noeval", "ppl.wikitext2.mean"])

    md = (results / "summary.md").read_text()
    mi_row = next(line for line in md.splitlines() if line.startswith("| mi_t4 "))
    assert "13.00 (10.00–17.00)" in mi_row and "30.00 (20.00–40.00)" in mi_row and "0,1,2" in mi_row
    cells = [cell.strip() for cell in mi_row.split("|")]
    assert "4.000" in cells and "3.210" in cells  # bits and effective bits keep their digits
    random_row = next(line for line in md.splitlines() if line.startswith("| random_t4 "))
    assert "15.00 " in random_row and "–" not in random_row
    assert "Reports: " in md  # no sweep.cmd here
    for name in ("pareto.png", "heatmap_mi_t4_seed0.png", "time.png"):
        _png_ok(results / name)
