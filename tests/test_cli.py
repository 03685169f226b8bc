"""The entry script end to end on a tiny model, its JSON report, and one-line errors for bad input."""
import json
from pathlib import Path

import pytest
import torch

import vicuna_mi

TINY = ["synthetic:tiny", "c4", "--nsamples", "4", "--seqlen", "32", "--eval", "wikitext2", "--eval_samples", "2"]


def run_main(capsys, args):
    code = vicuna_mi.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err):
    """The error report: exactly one line, the last one (a progress bar may precede it), no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("vicuna_mi: error: ")
    assert sum(line.startswith("vicuna_mi: error") for line in lines) == 1
    return lines[-1]


@pytest.mark.parametrize("extra", [
    ["--n_groups", "4", "--target_avg_bits", "3.5"],
    ["--use_mi_grouping", "0", "--wbits", "4", "--prunen", "2", "--prunem", "4", "--sparsity", "0"],
    ["--use_mi_grouping", "0", "--wbits", "16", "--method", "wanda"],
])
def test_end_to_end_report(capsys, tmp_path, data_dir, extra):
    out = tmp_path / "r.json"
    code, stdout, err = run_main(capsys, TINY + ["--data_dir", data_dir, "--out", str(out)] + extra)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["config"]["model"] == "synthetic:tiny"
    assert report["ppl"]["wikitext2"] > 1 and report["eval_windows"]["wikitext2"] == 2
    t = report["time_s"]
    assert t["total"] > 0 and "prune_quant" in t
    # compression is the layer walk's wall time: no less than its stages (none counted twice), within the total
    assert sum(t.get(k, 0.0) for k in vicuna_mi.COMPRESS_STAGES) <= t["compression"] < t["total"]
    assert len(report["layers"]) == 2 * 7
    for rec in report["layers"]:
        assert {"name", "shape", "time_s", "sparsity", "bits", "effective_bits"} <= rec.keys()
        assert rec["mask_sparsity"] == pytest.approx(0.5, abs=1e-9)
    target = 3.5 if "--target_avg_bits" in extra else float(extra[extra.index("--wbits") + 1])
    assert abs(report["avg_bits"]["actual"] - target) <= 0.01
    assert report["sparsity"]["actual"] >= 0.5
    assert "perplexity" in stdout and str(out) in stdout


def test_dense_run_compresses_nothing(capsys, tmp_path, data_dir):
    out = tmp_path / "dense.json"
    code, _, err = run_main(capsys, TINY + ["--data_dir", data_dir, "--out", str(out), "--sparsity", "0",
                                            "--use_mi_grouping", "0", "--wbits", "16"])
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["layers"] == [] and "avg_bits" not in report


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.0"], "--sparsity must lie in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity must lie in [0, 1)"),
    (["--use_mi_grouping", "0", "--wbits", "9"], "--wbits must be 2..8 or 16"),
    (["--sparsity", "0", "--prunen", "4", "--prunem", "2"], "N:M sparsity needs 0 < N <= M"),
    (["--target_avg_bits", "9"], "outside the range of --bit_choices [2, 8]"),
    (["--target_avg_bits", "1.5"], "outside the range of --bit_choices [2, 8]"),
    (["--bit_choices", "2,11"], "width 11 not supported"),
    (["--n_groups", "65"], "exceeds the 64 input channels"),
    (["--eval", "wikitext3"], "unknown data set 'wikitext3'"),
    (["--method", "obc"], "--method must be"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, data_dir, extra, message):
    code, _, err = run_main(capsys, TINY + ["--data_dir", data_dir] + extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_missing_model_and_data(capsys, tmp_path, data_dir):
    code, _, err = run_main(capsys, ["/no/model/here", "c4", "--data_dir", data_dir])
    assert code == 2 and "model not found" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(capsys, TINY + ["--data_dir", str(tmp_path)])
    assert code == 2 and "missing data file" in err and str(tmp_path) in err


def test_cholesky_failure_after_retries_is_one_line(capsys, monkeypatch, data_dir):
    real = torch.linalg.cholesky_ex

    def always_indefinite(A, *args, **kwargs):
        L, info = real(A, *args, **kwargs)
        return L, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", always_indefinite)
    code, _, err = run_main(capsys, TINY + ["--data_dir", data_dir, "--use_mi_grouping", "0", "--wbits", "4"])
    assert code == 2
    line = error_lines(err)
    assert "not positive definite" in line and "layer 0 self_attn.q_proj" in line


def test_nan_activations_are_a_clear_error(capsys, monkeypatch, data_dir):
    import sparsegpt
    real_add = sparsegpt.InputStats.add

    def poisoned(self, x):
        real_add(self, torch.full_like(x, float("nan")))

    monkeypatch.setattr(sparsegpt.InputStats, "add", poisoned)
    code, _, err = run_main(capsys, TINY + ["--data_dir", data_dir])
    assert code == 2 and "NaN" in error_lines(err)


@pytest.mark.parametrize("extra, message", [
    (["--batch_size", "0"], "--batch_size must be >= 1 or auto"),
    (["--blocksize", "0"], "--blocksize must be >= 1"),
    (["--eval_samples", "0"], "--eval_samples must be >= 1"),
    (["--percdamp", "-1"], "--percdamp must be a positive"),
    (["--percdamp", "nan"], "--percdamp must be a positive"),
    (["--sparsity", "nan"], "--sparsity must lie in [0, 1)"),
    (["--target_avg_bits", "nan"], "--target_avg_bits must be a number"),
    (["--nsamples", "0"], "--nsamples must be >= 1"),
    (["--seqlen", "1"], "--seqlen >= 2"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--n_groups", "0"], "--n_groups must be >= 1"),
    (["--bit_choices", "2,4,4"], "repeated width"),
    (["--bit_choices", "2,x"], "comma list of integers"),
    (["--device", "tpu"], "--device must be"),
    (["--batch_size", "two"], "--batch_size must be a positive integer or auto"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--eval", ""], "--eval is empty"),
    (["--save", ""], "--save is empty"),
    (["--out", " "], "--out is empty"),
    (["--data_dir", ""], "--data_dir is empty"),
    (["--eval", "wikitext2,wikitext2"], "--eval has a repeated data set"),
    (["--prunen", "2", "--prunem", "3", "--sparsity", "0"], "--blocksize 128 must be a multiple of --prunem 3"),
])
def test_bad_numbers_fail_before_loading(capsys, monkeypatch, data_dir, extra, message):
    import modelutils

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(modelutils, "load_model", no_loading)
    code, _, err = run_main(capsys, TINY + ["--data_dir", data_dir] + extra)
    assert code == 2
    line = error_lines(err)
    assert len(err.strip().splitlines()) == 1 and message in line, line


@pytest.mark.parametrize("extra, message", [
    (["--method", "wanda", "--sparsity", "0", "--prunen", "1", "--prunem", "3"], "not a multiple of M=3"),
    (["--method", "magnitude", "--sparsity", "0", "--prunen", "2", "--prunem", "3"], "not a multiple of M=3"),
    (["--seqlen", "400000"], "fewer than one window of --seqlen 400000"),
])
def test_shape_errors_fail_before_calibration(capsys, monkeypatch, data_dir, extra, message):
    import datautils

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started before the shapes were checked")

    monkeypatch.setattr(datautils, "calibration_windows", no_calibration)
    code, _, err = run_main(capsys, TINY + ["--data_dir", data_dir] + extra)
    assert code == 2
    assert message in error_lines(err)


def _no_loading(monkeypatch):
    import modelutils

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(modelutils, "load_model", no_loading)


@pytest.mark.parametrize("case, message", [
    ("dataset foo", "unknown dataset 'foo'"),
    ("dataset c4+", "has an empty name"),
    ("data_dir missing", "not a directory"),
    ("data_dir empty", "missing data file for wikitext2 test"),
    ("calibration file missing", "missing data file for c4 train"),
    ("out is a directory", "is a directory"),
    ("out under a file", "is not a writable directory"),
    ("out unwritable", "is not a writable directory"),
    ("save unwritable", "--save"),
])
def test_bad_sources_and_destinations_fail_before_loading(capsys, monkeypatch, tmp_path, data_dir, case, message):
    """Data names and files, and where the report and checkpoint go, are checked before the model loads."""
    import shutil
    import tempfile

    _no_loading(monkeypatch)
    args = list(TINY) + ["--data_dir", data_dir, "--out", str(tmp_path / "report.json")]
    if case.startswith("dataset"):
        args[1] = case.split()[1]
    elif case == "data_dir missing":
        args += ["--data_dir", str(tmp_path / "none")]
    elif case == "data_dir empty":
        args += ["--data_dir", str(tmp_path)]
    elif case == "calibration file missing":   # the evaluated wikitext2 is there, c4's train file is not
        shutil.copytree(f"{data_dir}/wikitext-2-raw", tmp_path / "wikitext-2-raw")
        args += ["--data_dir", str(tmp_path)]
    elif case == "out is a directory":
        args += ["--out", str(tmp_path)]
    elif case == "out under a file":
        (tmp_path / "plain").write_text("x")
        args += ["--out", str(tmp_path / "plain" / "report.json")]
    else:   # a directory that refuses new entries (as /proc does, even for root)
        locked = tmp_path / "locked"
        locked.mkdir()
        real = tempfile.mkdtemp

        def refuse(*a, **k):
            if Path(k.get("dir", "")) == locked:
                raise PermissionError(13, "Permission denied")
            return real(*a, **k)

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
        args += ["--out", str(locked / "report.json")] if case == "out unwritable" else ["--save", str(locked / "ckpt")]
    code, _, err = run_main(capsys, args)
    assert code == 2
    line = error_lines(err)
    assert len(err.strip().splitlines()) == 1 and message in line, line
    assert not (tmp_path / "report.json").exists()


def test_unwritable_ancestor_tries_the_directory(tmp_path):
    import os

    import checkpoint

    assert checkpoint.unwritable_ancestor(tmp_path / "a" / "b" / "report.json") is None
    assert list(tmp_path.iterdir()) == []   # the probe leaves nothing behind, and makes no parents
    (tmp_path / "f").write_text("x")
    assert checkpoint.unwritable_ancestor(tmp_path / "f" / "report.json") == tmp_path / "f"
    if os.path.isdir("/proc"):   # root passes os.access here; the probe still fails
        assert checkpoint.unwritable_ancestor("/proc/new/report.json") == Path("/proc")


def test_activation_bytes_is_what_a_walk_holds():
    import modelutils
    from walker import LayerWalker, activation_bytes

    model = modelutils.load_model("synthetic:tiny", device="cpu").model
    ids = torch.randint(0, model.config.vocab_size, (3, 16))
    walker = LayerWalker(model, "cpu", batch_size=2)
    acts = walker.capture(ids)
    outs = walker.run(walker.decoder_layers[0], acts)
    held = sum(t.hidden.numel() * t.hidden.element_size() for t in (acts, outs))
    assert activation_bytes(model, 3, 16) == held


def test_too_many_windows_for_memory_fail_before_calibration(capsys, monkeypatch, data_dir):
    import datautils

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started before the memory was checked")

    monkeypatch.setattr(datautils, "calibration_windows", no_calibration)
    monkeypatch.setattr(vicuna_mi, "free_memory_bytes", lambda device: 1 << 20)   # 1 MiB free
    code, _, err = run_main(capsys, TINY + ["--data_dir", data_dir, "--nsamples", "64", "--seqlen", "64"])
    assert code == 2
    line = error_lines(err)
    # 2 buffers x 64 windows x 64 tokens x 64 channels x 4 bytes = 2 MiB
    assert "--nsamples 64 x --seqlen 64 need 2.0 MiB of activations on cpu, more than the 1.0 MiB free" in line


def test_a_late_file_system_error_is_one_line(capsys, monkeypatch, tmp_path, data_dir):
    import checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "size_report", full_disk)
    code, _, err = run_main(capsys, TINY + ["--data_dir", data_dir, "--out", str(tmp_path / "r.json")])
    assert code == 2 and "No space left on device" in error_lines(err)


@pytest.mark.parametrize("extra, message", [
    (["--model", "synthetic:foo"], "unknown synthetic model 'foo'"),
    (["--model", "synthetic:tiny", "--device", "tpu"], "--device must be"),
    (["--model", "synthetic:tiny", "--layers", "0"], "--layers must be >= 1"),
    (["--model", "synthetic:tiny", "--nsamples", "0"], "--nsamples must be >= 1"),
    (["--model", "synthetic:tiny", "--out", "/dev/null/x.json"], "--out"),
])
def test_bench_speed_bad_input_is_one_line(tmp_path, extra, message):
    import subprocess
    import sys

    args = ["--device", "cpu", "--out", str(tmp_path / "b.json")] + extra
    done = subprocess.run([sys.executable, "scripts/bench_speed.py", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("bench_speed: error: ") and message in lines[-1] and "Traceback" not in done.stderr
    assert not (tmp_path / "b.json").exists()
