"""The entry script end to end on a tiny model, its JSON report, and one-line errors for bad input."""
import json

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
