"""Evaluation and calibration data for LM compression (SparseGPT / GPTQ conventions).

Texts come either from local offline copies (``data_dir``, see ``../shared/data/README.md``)
or from the Hugging Face hub. Local files are mapped onto rows exactly as the hub loaders
produce them, so the joined evaluation strings are byte-identical either way.
"""

from __future__ import annotations

import json
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch

SPLITS: tuple[str, ...] = ("train", "validation", "test")
CALIB_SPLITS: tuple[str, ...] = ("train", "validation")  # never "test": the split perplexity is measured on
C4_EVAL_DOCS = 1100  # SparseGPT: validation[:1100]
C4_EVAL_WINDOWS = 256  # SparseGPT: eval stream cut to 256 * seqlen tokens


class DataError(ValueError):
    """A user-facing data problem; the message is one clear line."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a corpus lives (locally and on the hub) and how its rows are read."""

    kind: str  # row mapping: "wikitext" | "ptb" | "c4"
    local_files: Mapping[str, str]  # split -> path relative to data_dir
    hub_path: str
    hub_config: str | None
    field: str  # column holding the text
    hub_data_files: Mapping[str, str] = dataclasses.field(default_factory=dict)  # split -> file in the hub repo


DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        "wikitext2": DatasetSpec(
            kind="wikitext",
            local_files=MappingProxyType(
                {
                    "train": "wikitext-2-raw/wiki.train.raw",
                    "validation": "wikitext-2-raw/wiki.valid.raw",
                    "test": "wikitext-2-raw/wiki.test.raw",
                }
            ),
            hub_path="wikitext",
            hub_config="wikitext-2-raw-v1",
            field="text",
        ),
        "ptb": DatasetSpec(
            kind="ptb",
            local_files=MappingProxyType(
                {
                    "train": "ptb/ptb.train.txt",
                    "validation": "ptb/ptb.valid.txt",
                    "test": "ptb/ptb.test.txt",
                }
            ),
            hub_path="ptb_text_only",
            hub_config="penn_treebank",
            field="sentence",
        ),
        "c4": DatasetSpec(
            kind="c4",
            local_files=MappingProxyType(
                {
                    "train": "c4/c4-train.00000-of-01024.head1041.jsonl",
                    "validation": "c4/c4-validation.00000-of-00008.head1025.jsonl",
                }
            ),
            hub_path="allenai/c4",
            hub_config=None,
            field="text",
            # SparseGPT reads only shard 0 of each split.
            hub_data_files=MappingProxyType(
                {
                    "train": "en/c4-train.00000-of-01024.json.gz",
                    "validation": "en/c4-validation.00000-of-00008.json.gz",
                }
            ),
        ),
    }
)


def _spec(name: str) -> DatasetSpec:
    """Look up a dataset spec or raise DataError listing the valid names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}"
        ) from None


def _check_split(name: str, spec: DatasetSpec, split: str) -> None:
    """Raise DataError if the split is not one this dataset has."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if split not in spec.local_files:
        raise DataError(
            f"dataset {name!r} has no {split!r} split; available: {', '.join(spec.local_files)}"
        )


def _read_local(spec: DatasetSpec, path: Path) -> list[str]:
    """Read one local file into rows, mirroring the hub loader for this dataset."""
    # Text mode, "\n" line splitting only (not str.splitlines, which also breaks on
    # \x0b, \x1c, \u2028 ...): this is what the hub's builder scripts iterate over.
    with path.open(encoding="utf-8") as f:
        if spec.kind == "wikitext":
            # Hub wikitext: a row per line, trailing "\n" kept; whitespace-only lines -> "".
            return [line if line.strip() else "" for line in f]
        if spec.kind == "ptb":
            # Hub ptb_text_only: a row per line, stripped of surrounding whitespace.
            return [line.strip() for line in f]
        # C4 jsonl: one document per non-empty line; the row is its "text" field.
        return [json.loads(line)[spec.field] for line in f if line.strip()]


def _load_hub(spec: DatasetSpec, split: str) -> list[str]:
    """Load one split from the Hugging Face hub (needs network)."""
    from datasets import load_dataset  # heavy import, only on the online path

    kwargs: dict[str, Any] = {"split": split}
    if split in spec.hub_data_files:
        kwargs["data_files"] = {split: spec.hub_data_files[split]}
    args = (spec.hub_path,) if spec.hub_config is None else (spec.hub_path, spec.hub_config)
    return list(load_dataset(*args, **kwargs)[spec.field])


def load_rows(name: str, split: str, data_dir: str | None) -> list[str]:
    """Rows of one split of a dataset, exactly as the hub gives them.

    With ``data_dir`` the local offline copies are read; without it, the hub is used.
    """
    spec = _spec(name)
    _check_split(name, spec, split)
    if data_dir is None:
        return _load_hub(spec, split)
    path = Path(data_dir) / spec.local_files[split]
    if not path.is_file():
        raise DataError(f"missing data file for {name} {split}: {path}")
    return _read_local(spec, path)


def _join_train(name: str, rows: list[str]) -> str:
    """The train text that wikitext2/ptb calibration windows are drawn from."""
    if name == "wikitext2":
        # SparseGPT's get_wikitext2 joins the train rows with " " (only its test string uses "\n\n").
        return " ".join(rows)
    # ptb: " ".join(sentences), as SparseGPT / GPTQ ptb-new.
    return " ".join(rows)


def _eval_split(name: str) -> str:
    """The split perplexity is measured on: test, except c4's validation (SparseGPT's c4-new)."""
    _spec(name)
    return "validation" if name == "c4" else "test"


def eval_text(name: str, data_dir: str | None) -> str:
    """The evaluation string of a dataset, following SparseGPT's conventions."""
    rows = load_rows(name, _eval_split(name), data_dir)
    if name == "wikitext2":
        # SparseGPT/GPTQ: "\n\n".join(test["text"]); rows already end in "\n", so a
        # paragraph break becomes "\n\n\n" and a blank row adds "\n\n".
        return "\n\n".join(rows)
    if name == "ptb":
        # SparseGPT / GPTQ ptb-new: " ".join(test["sentence"]) (old GPTQ ptb used validation + "\n\n").
        return " ".join(rows)
    # c4 (SparseGPT = GPTQ c4-new): " ".join(validation[:1100]["text"]); the local copy
    # holds only 1025 documents, and slicing simply uses what there is.
    return " ".join(rows[:C4_EVAL_DOCS])


def eval_tokens(name: str, tokenizer: Any, seqlen: int, data_dir: str | None) -> torch.LongTensor:
    """Tokenized evaluation stream, shape [1, N]; c4 is cut to 256 * seqlen tokens."""
    if seqlen < 1:
        raise DataError(f"seqlen must be positive, got {seqlen}")
    ids = tokenizer(eval_text(name, data_dir), return_tensors="pt").input_ids.long()
    if name == "c4":
        # SparseGPT: valenc[:, :256 * seqlen]; shorter streams are kept whole.
        ids = ids[:, : C4_EVAL_WINDOWS * seqlen]
    return ids


def _flat(token_ids: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a token stream given as [N] or [1, N]."""
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        return token_ids[0]
    if token_ids.dim() != 1:
        raise DataError(f"expected a 1-D token stream (or [1, N]), got shape {tuple(token_ids.shape)}")
    return token_ids


def sample_windows(
    token_ids: torch.LongTensor, n: int, seqlen: int, generator: torch.Generator
) -> torch.LongTensor:
    """``n`` random contiguous windows of ``seqlen`` tokens, shape [n, seqlen].

    Starts are uniform in [0, len - seqlen] (inclusive).
    """
    stream = _flat(token_ids)
    if seqlen < 1 or n < 0:
        raise DataError(f"need seqlen >= 1 and n >= 0, got seqlen={seqlen}, n={n}")
    if stream.numel() < seqlen:
        raise DataError(f"token stream has {stream.numel()} tokens, shorter than seqlen={seqlen}")
    starts = torch.randint(0, stream.numel() - seqlen + 1, (n,), generator=generator)
    offsets = torch.arange(seqlen)
    return stream[starts[:, None] + offsets[None, :]].long()


def _c4_windows(
    docs: list[str], tokenizer: Any, n: int, seqlen: int, generator: torch.Generator
) -> torch.LongTensor:
    """SparseGPT's C4 sampling: random doc with > seqlen tokens, then a random window of it."""
    if n == 0:
        return torch.empty((0, seqlen), dtype=torch.long)
    if not docs:
        raise DataError("no c4 train documents to sample from")
    cache: dict[int, torch.Tensor] = {}  # doc index -> token ids (local, avoids re-tokenizing)
    windows = []
    while len(windows) < n:
        i = int(torch.randint(0, len(docs), (1,), generator=generator))
        if i not in cache:
            cache[i] = tokenizer(docs[i], return_tensors="pt").input_ids[0].long()
        ids = cache[i]
        if ids.numel() <= seqlen:
            if len(cache) == len(docs) and all(t.numel() <= seqlen for t in cache.values()):
                raise DataError(f"no c4 train document has more than seqlen={seqlen} tokens")
            continue
        # SparseGPT: randint(0, len - seqlen - 1) inclusive == torch.randint(0, len - seqlen).
        start = int(torch.randint(0, ids.numel() - seqlen, (1,), generator=generator))
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def _calib_split(name: str, split: str) -> str:
    """The split of ``name`` that calibration windows for ``split`` are drawn from.

    c4 always calibrates on train: its validation split is the one c4 perplexity reads.
    """
    if split not in CALIB_SPLITS:
        raise DataError(f"calibration split must be one of {', '.join(CALIB_SPLITS)}, got {split!r} "
                        f"(test is the evaluated split)")
    return "train" if name == "c4" else split


def _calib_sources(names: str, split: str, data_dir: str | None) -> list[tuple[str, str]]:
    """The (dataset, split) pairs a calibration mix such as "c4+ptb" reads, checked to exist locally."""
    parts = [p.strip() for p in names.split("+")]
    for part in parts:
        if not part:
            raise DataError(f"calibration mix {names!r} has an empty name; join names with '+', as in c4+ptb")
        _spec(part)
    sources = [(part, _calib_split(part, split)) for part in parts]
    if data_dir is not None:
        for part, part_split in sources:
            path = Path(data_dir) / DATASETS[part].local_files[part_split]
            if not path.is_file() and part != "c4":  # c4 has no other split to offer
                other = "validation" if part_split == "train" else "train"
                raise DataError(f"{part} has no {part_split} split in {data_dir} (missing {path}): "
                                f"pass --calib_split {other}")
    return sources


def check_sources(calibration: str, evaluation: Sequence[str], split: str, data_dir: str | None,
                  calibrates: bool = True) -> None:
    """Raise DataError, before a model is loaded, for an unknown name or split or a missing local file.

    ``calibration`` is the calibration mix (its files are checked only if ``calibrates``), ``evaluation``
    the sets whose perplexity is measured. Without ``data_dir`` the hub is read later: names only.
    """
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data_dir {data_dir}: not a directory")
    sources = [(name, _eval_split(name)) for name in evaluation]
    calib = _calib_sources(calibration, split, data_dir if calibrates else None)   # names always; files if read
    sources += calib if calibrates else []
    if data_dir is not None:
        for name, name_split in sources:
            path = Path(data_dir) / DATASETS[name].local_files[name_split]
            if not path.is_file():
                raise DataError(f"missing data file for {name} {name_split}: {path}")


def calibration_windows(
    names: str,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    data_dir: str | None,
    split: str = "train",
) -> torch.LongTensor:
    """``nsamples`` calibration windows [nsamples, seqlen] from ``split`` of ``names``.

    ``names`` is one dataset or a "+"-joined mix; samples are split as evenly as possible,
    earlier sets taking the remainder. ``split`` is "train" or "validation" (the offline copies
    of wikitext2 and ptb have no train split); c4 always uses its train split. Reproducible
    from ``seed`` (own generator, no global RNG).
    """
    if nsamples < 0 or seqlen < 1:
        raise DataError(f"need nsamples >= 0 and seqlen >= 1, got nsamples={nsamples}, seqlen={seqlen}")
    sources = _calib_sources(names, split, data_dir)
    parts = [part for part, _ in sources]
    # Load every split first so a missing file fails before any tokenizing.
    rows = [load_rows(part, part_split, data_dir) for part, part_split in sources]
    base, extra = divmod(nsamples, len(parts))
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for k, (part, part_rows) in enumerate(zip(parts, rows)):
        count = base + (1 if k < extra else 0)
        if part == "c4":
            chunks.append(_c4_windows(part_rows, tokenizer, count, seqlen, generator))
        else:
            # Validation rows are joined like train rows (SparseGPT's train convention).
            stream = tokenizer(_join_train(part, part_rows), return_tensors="pt").input_ids
            chunks.append(sample_windows(stream, count, seqlen, generator))
    return torch.cat(chunks, dim=0)
