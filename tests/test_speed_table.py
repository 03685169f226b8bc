"""scripts/speed_table.py: the README's speed table is generated from the committed reports."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import speed_table  # noqa: E402


def report(wall, stages_sum, check=None, peak=10.0, **stages):
    r = {"compression_wall_s": wall, "compression_s": stages_sum, "peak_gpu_gib": peak, "stages_s": stages}
    if check is not None:
        r["plain_loop_check_s"] = check
    return r


def test_rows_join_runs_and_leave_out_the_check(tmp_path):
    base = dict(statistics=20.04, clustering=12.0, allocation=11.0, prune_quant=13.0, pack=0.06, propagate=7.0)
    (tmp_path / "a.json").write_text(json.dumps(report(90.0, 80.0, check=6.0, transfer=5.0, **base)))
    (tmp_path / "b.json").write_text(json.dumps(report(85.0, 78.0, check=5.0, transfer=5.5, **base)))
    (tmp_path / "c.json").write_text(json.dumps(report(70.0, 52.0, peak=6.5, **base)))   # no check timed apart, no transfer
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"command": "bench", "rows": [{"label": "two runs", "reports": ["a.json", "b.json"]},
                                                                 {"label": "old", "reports": ["c.json"]}]}))
    lines = speed_table.table(manifest).splitlines()
    assert lines[4] == ("| two runs (`a.json`, `b.json`) | 84.0 s, 80.0 s (stages 80.0, 78.0) | 20.0, 20.0 | 12.0, 12.0 | "
                        "11.0, 11.0 | 13.0, 13.0 | 0.1, 0.1 | 7.0, 7.0 | 5.0, 5.5 | 10.00 GiB |")
    assert lines[5] == "| old (`c.json`) | 70.0 s with the check (stages 52.0) | 20.0 | 12.0 | 11.0 | 13.0 | 0.1 | 7.0 | untimed | 6.50 GiB |"


def test_a_missing_report_is_a_one_line_error(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"command": "bench", "rows": [{"label": "x", "reports": ["gone.json"]}]}))
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "speed_table.py"), str(manifest)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "gone.json" in run.stderr


@pytest.mark.parametrize("manifest", ["reports/speed/bench_table.json", "reports/speed/smollm2_table.json"])
def test_readme_shows_the_generated_table(manifest, monkeypatch):
    monkeypatch.chdir(REPO)   # the table names its manifest as given
    readme = [line.strip() for line in (REPO / "README.md").read_text().splitlines()]
    generated = [line for line in speed_table.table(Path(manifest)).splitlines() if line]
    start = readme.index(generated[0])   # in order, line after line (the README may indent the table)
    assert [line for line in readme[start:] if line][:len(generated)] == generated


def test_runs_rows_group_and_compare(tmp_path):
    for name, seconds in {"a": 7.871, "b": 7.47, "c": 7.7, "d": 8.2}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"time_s": {"compression": seconds}}))
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"kind": "runs", "command": "run", "rows": [
        {"label": "first; then alternating", "host": "O", "runs": [["a.json"], ["b.json", "c.json"]], "against": ["d.json"]}]}))
    lines = speed_table.table(manifest).splitlines()
    assert lines[2] == "| code and condition (reports) | compression, s | host |"
    assert lines[4] == "| first; then alternating (`a.json`, `b.json`, `c.json`, `d.json`) | 7.87; 7.47, 7.70 against 8.20 | O |"
