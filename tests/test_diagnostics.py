"""The diagnostic scripts (scripts/stage_calls.py, scripts/profile_functions.py) on a tiny model."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, out: Path, data_dir: str) -> dict:
    args = ["synthetic:tiny", "c4", "--data_dir", data_dir, "--nsamples", "4", "--seqlen", "32", "--eval", "none", "--device", "cpu"]
    done = subprocess.run([sys.executable, str(REPO / "scripts" / script), str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_stage_calls_records_every_stage_call_in_order(tmp_path, data_dir):
    r = run("stage_calls.py", tmp_path / "calls.json", data_dir)
    stages = [stage for stage, _ in r["calls"]]
    assert stages[0] == "load" and stages.count("statistics") == 2 * 4   # 2 layers x 4 input groups
    assert stages.index("capture") < stages.index("statistics") < stages.index("propagate")
    per_stage = {}
    for stage, seconds in r["calls"]:
        per_stage[stage] = per_stage.get(stage, 0.0) + seconds
    for stage in ("statistics", "clustering", "allocation", "prune_quant"):
        assert abs(per_stage[stage] - r["time_s"][stage]) <= 0.05 + 0.1 * r["time_s"][stage]


def test_profile_functions_counts_the_calls(tmp_path, data_dir):
    r = run("profile_functions.py", tmp_path / "funcs.json", data_dir)
    assert r["funcs"]["channel_grouping.kmeans"][0] == 8   # one grouping per input group
    assert r["funcs"]["channel_grouping.allocate_bits_many"][0] == 8
    assert r["funcs"]["channel_grouping.kmeans"][1] > 0 and r["time_s"]["clustering"] > 0
