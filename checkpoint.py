"""Packed checkpoints of compressed models: pack, size, write, verify, decode; and the fp16 dense export.

A checkpoint directory (format ``vicuna_mi-packed``, version 1; safetensors only, never pickle):

    manifest.json             format, version, bit order, dtypes, the linears' layout, a sha256 and
                              the byte size of every other file, and the run's report
    layer_00000.safetensors   the packed decoder linears of decoder layer 0 (one file per layer)
    dense.safetensors         every other tensor (embeddings, norms, head, biases) in the model dtype
    config.json, tokenizer*   the model's config and tokenizer

A decoder linear ``NAME`` (e.g. ``model.layers.0.self_attn.q_proj``), W: [out, in], is stored as:

    NAME.group_bits   uint8 [G]              width of each column group (2..8, 16 = raw); nondecreasing
    NAME.col_group    uint8 [in]             group of each input column (int16 if G > 256, int32 if > 32768)
    NAME.scale        float16 [out, Gq]      scale per (row, quantized group); Gq = groups narrower than 16
    NAME.zero         uint8 [out, Gq]        integer zero point per (row, quantized group)
    NAME.codes_B      uint8 [ceil(n_B*B/8)]  one stream per width B < 16: the B-bit codes of the stored
                                             weights of all width-B columns
    NAME.raw          float16/bfloat16 [n_16]  the stored weights of 16-bit columns, as they are
    NAME.bitmap       uint8 [ceil(out*in/8)]   storage "bitmap": 1 bit per weight, 1 = stored (non-zero)
    NAME.nm_pattern   uint8 [ceil(out*in/M*P/8)]  storage "nm": per row and block of M consecutive input
                                             columns, the index (P = ceil(log2 C(M, N)) bits) of its
                                             kept set among the C(M, N) sets in lexicographic order

Columns are permuted by ``perm = argsort(col_group, stable)``: groups become contiguous, ordered by
width, so each width is one contiguous segment of the permuted matrix. Each stream runs row-major
over its segment ([out, n_cols_B]) and holds every position (storage "dense") or only the stored
ones ("bitmap": the non-zero weights; "nm": the M-N kept weights of every block, zero or not).
Bit order: little-endian, LSB first: value i of a B-bit stream is bits [i*B, i*B + B) of the stream,
and stream bit k is bit k % 8 of byte k // 8. Decoding is tensor operations (shifts, gathers and
masked scatters, one step per width, no loop over columns):

    W_perm[r, c] = float32(scale[r, g]) * (code - zero[r, g])    (float32, as the solver computes it)
    W[:, perm] = W_perm.to(model dtype)

so a reload gives the in-memory compressed weights bit for bit. Of the three storages the packer
writes the smallest (bitmap only for unstructured sparsity, nm only for N:M), and the sizes in the
report are the bytes of the tensors it builds (``PackedLinear.nbytes``).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import modelutils
import quant
from walker import get_decoder_layers

FORMAT = "vicuna_mi-packed"
FORMAT_VERSION = 1
PACKED = "packed"  # LoadedModel.weights_format of a reloaded checkpoint
DENSE_FORMAT = "vicuna_mi-dense"
MANIFEST = "manifest.json"
DENSE_MARKER = "vicuna_mi_export.json"  # written into a dense export so a later --save_dense may replace it
DENSE_FILE = "dense.safetensors"
LAYER_FILE = "layer_{:05d}.safetensors"
BIT_ORDER = "little-endian, LSB-first"
MAX_MANIFEST_BYTES = 64 << 20
MAX_NM_M = 16                    # N:M patterns are indexed through a 2^M table
_CHUNK = 1 << 20                 # values per step of packing/unpacking (a multiple of 8: steps start on bytes)
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_PARTS = ("group_bits", "col_group", "scale", "zero", "bitmap", "nm_pattern", "raw",
          *(f"codes_{b}" for b in quant.VALID_BITS if b < quant.NO_QUANT_BITS))
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CheckpointError(modelutils.ModelError):
    """A checkpoint that must not load (or a destination that must not be written); one line for the user."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def raw_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of 16-bit (unquantized) columns: the model dtype if it has 16 bits, else float16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def storable(W: torch.Tensor, col_bits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The solver's weights as a checkpoint stores them, in float32 and in the model ``dtype``.

    W: [out, in] float32, col_bits: [in]. Columns of width 16 are rounded through ``raw_dtype``
    (so "16 bits" is what is stored, on a float32 CPU model too; on a fp16 model this is the cast
    the model gets anyway), and -0.0 becomes +0.0 (codes have no signed zero).
    """
    passthrough = col_bits.to(W.device) >= quant.NO_QUANT_BITS
    if dtype not in (torch.float16, torch.bfloat16) and bool(passthrough.any()):
        W = W.clone()
        W[:, passthrough] = W[:, passthrough].to(raw_dtype(dtype)).float()
    W_model = W.to(dtype) + 0.0   # -0.0 + 0.0 = +0.0 (a new tensor: W may be the caller's)
    if not torch.isfinite(W_model).all():
        raise ValueError("compressed weights overflow the model's dtype (or float16 for 16-bit columns)")
    return W, W_model


# ---------------------------------------------------------------------------------------------------
# bit streams

def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers < 2^bits (any shape, read row-major) -> uint8 stream [ceil(n*bits/8)], LSB first.

    # word_i = sum_{t<g} v_{g i + t} << (bits t);  byte_{(L/8) i + j} = (word_i >> 8j) & 255,  L = lcm(bits, 8) = g bits

    g values fill exactly L/8 bytes, so while L <= 64 (every width up to 8, and 10, 12, 14, 16) each
    run of g values becomes one int64 word and then L/8 bytes: a few elementwise passes. Other widths
    (N:M patterns of 9, 11, 13 or 15 bits) expand to single bits first.
    """
    values = values.reshape(-1)
    n = values.numel()
    device = values.device
    L = math.lcm(bits, 8)
    out = [torch.zeros(0, dtype=torch.uint8, device=device)]
    if L <= 64:
        g = L // bits
        value_shifts = torch.arange(g, device=device, dtype=torch.int64) * bits      # [g]
        byte_shifts = torch.arange(L // 8, device=device, dtype=torch.int64) * 8     # [L/8]
        step = _CHUNK - _CHUNK % g
        for start in range(0, n, step):
            v = values[start:start + step].to(torch.int64)
            pad = (-v.numel()) % g
            if pad:
                v = torch.cat([v, v.new_zeros(pad)])
            word = (v.reshape(-1, g) << value_shifts).sum(dim=1)                     # [n/g] L bits each
            out.append(((word.unsqueeze(1) >> byte_shifts) & 255).to(torch.uint8).reshape(-1))
        return torch.cat(out)[:_stream_bytes(n, bits)]
    shifts = torch.arange(bits, device=device, dtype=torch.int32)
    byte_weights = torch.tensor([1 << k for k in range(8)], device=device, dtype=torch.int32)
    for start in range(0, n, _CHUNK):
        v = values[start:start + _CHUNK].to(torch.int32)
        stream = ((v.unsqueeze(1) >> shifts) & 1).reshape(-1)          # bit j of value i -> i*bits + j
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out.append((stream.reshape(-1, 8) * byte_weights).sum(dim=1).to(torch.uint8))
    return torch.cat(out)


def unpack_bits(stream: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: n values (int32) from a uint8 stream of exactly ceil(n*bits/8) bytes; bits <= 16.

    # word_i = sum_{j<L/8} byte_{(L/8) i + j} << 8j;  v_{g i + t} = (word_i >> bits t) & (2^bits - 1)
    """
    assert 1 <= bits <= 16 and stream.numel() == (n * bits + 7) // 8, (bits, n, stream.numel())
    device = stream.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int32, device=device)
    L = math.lcm(bits, 8)
    out = []
    if L <= 64:
        g, width = L // bits, L // 8
        value_shifts = torch.arange(g, device=device, dtype=torch.int64) * bits      # [g]
        byte_shifts = torch.arange(width, device=device, dtype=torch.int64) * 8      # [L/8]
        step = _CHUNK - _CHUNK % g                                   # values per step, whole words
        for start in range(0, n, step):
            count = min(step, n - start)
            b = stream[start * bits // 8:(start + count) * bits // 8 + (1 if (start + count) * bits % 8 else 0)]
            pad = (-b.numel()) % width
            if pad:
                b = torch.cat([b, b.new_zeros(pad)])
            word = (b.reshape(-1, width).to(torch.int64) << byte_shifts).sum(dim=1)   # [words]
            values = ((word.unsqueeze(1) >> value_shifts) & ((1 << bits) - 1)).reshape(-1)
            out.append(values[:count].to(torch.int32))
        return torch.cat(out)
    s = stream.to(torch.int32)
    last = s.numel() - 1
    for start in range(0, n, _CHUNK):
        offset = torch.arange(start, min(n, start + _CHUNK), device=device, dtype=torch.int64) * bits
        byte, shift = offset >> 3, (offset & 7).to(torch.int32)
        # a value spans at most 3 bytes (shift <= 7, bits <= 16); bytes past the end are masked off
        word = s[byte] | (s[(byte + 1).clamp(max=last)] << 8) | (s[(byte + 2).clamp(max=last)] << 16)
        out.append((word >> shift) & ((1 << bits) - 1))
    return torch.cat(out)


def _stream_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


@functools.lru_cache(maxsize=None)
def nm_table(n: int, m: int) -> torch.Tensor:
    """The C(M, N) kept sets of a block of M columns with N pruned: bool [C, M], lexicographic order."""
    sets = list(itertools.combinations(range(m), m - n))
    table = torch.zeros(len(sets), m, dtype=torch.bool)
    for i, kept in enumerate(sets):
        table[i, list(kept)] = True
    return table


def nm_pattern_bits(n: int, m: int) -> int:
    return math.ceil(math.log2(math.comb(m, n))) if math.comb(m, n) > 1 else 0


def _col_group_dtype(groups: int) -> torch.dtype:
    return torch.uint8 if groups <= 256 else torch.int16 if groups <= 32768 else torch.int32


# ---------------------------------------------------------------------------------------------------
# packing one linear

@dataclass
class PackedLinear:
    name: str                            # sub-layer name inside its decoder layer, e.g. self_attn.q_proj
    shape: tuple[int, int]               # [out, in]
    storage: str                         # dense | bitmap | nm
    nm: Optional[tuple[int, int]]        # (N, M) of storage "nm", else None
    tensors: dict[str, torch.Tensor] = field(repr=False)   # part -> tensor (see the module docstring)

    @property
    def nbytes(self) -> int:
        """Bytes the checkpoint stores for this linear: the size the report's effective bits come from."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def layout(self) -> dict:
        return {"shape": list(self.shape), "storage": self.storage, "nm": list(self.nm) if self.nm else None,
                "bytes": self.nbytes}


def pack_linear(name: str, W: torch.Tensor, W_model: torch.Tensor, mask: torch.Tensor, col_bits: torch.Tensor,
                labels: Optional[torch.Tensor], grid: Optional[quant.QGrid], prune_n: int = 0,
                prune_m: int = 0, verify: bool = True) -> PackedLinear:
    """Pack one compressed linear in its smallest storage, and (verify) check that it decodes to W_model bit for bit.

    W: [out, in] float32 weights as the solver left them (``storable``'s first output); W_model: the
    same in the model dtype (what the model holds); mask: [out, in] bool, True = pruned; col_bits:
    [in] width per column; labels: [in] group per column (None = one group); grid: the QGrid
    (scale, zero: [out, in]) the weights were quantized on, or None when no column is quantized.
    Raises RuntimeError if the weights are not on their grids (a bug, never a user error). The
    decode check (``verify``) is about half the packing's cost; the grid, range and size checks run
    always.
    """
    rows, cols = W.shape
    device = W.device
    col_bits = col_bits.to(device).long()
    labels = torch.zeros(cols, dtype=torch.long, device=device) if labels is None else labels.to(device).long()
    n_labels = int(labels.max()) + 1
    label_bits = torch.zeros(n_labels, dtype=torch.long, device=device).scatter_(0, labels, col_bits)
    if not torch.equal(label_bits[labels], col_bits):
        raise RuntimeError(f"{name}: columns of one group have different widths")
    present = (torch.bincount(labels, minlength=n_labels) > 0).nonzero().squeeze(1)
    order = present[torch.argsort(label_bits[present] * n_labels + present)]      # by (width, label)
    new_id = torch.zeros(n_labels, dtype=torch.long, device=device)
    new_id[order] = torch.arange(order.numel(), device=device)
    col_group = new_id[labels]
    group_bits = label_bits[order]
    G, Gq = order.numel(), int((group_bits < quant.NO_QUANT_BITS).sum())
    tensors: dict[str, torch.Tensor] = {"group_bits": group_bits.to(torch.uint8),
                                        "col_group": col_group.to(_col_group_dtype(G))}
    perm = torch.argsort(col_group, stable=True)
    counts = torch.bincount(col_group, minlength=G)
    starts = torch.cumsum(counts, 0) - counts
    if Gq:
        if grid is None:
            raise RuntimeError(f"{name}: quantized columns without a grid")
        first = perm[starts[:Gq]]                                   # one column per quantized group
        scale, zero = grid.scale[:, first].float(), grid.zero[:, first].float()   # [rows, Gq]
        maxq = (2 ** group_bits[:Gq]).float() - 1
        if not torch.equal(scale.half().float(), scale) or not (scale > 0).all():
            raise RuntimeError(f"{name}: scales are not positive float16 values (grids must come from quant.group_grid)")
        if not torch.equal(zero, zero.round()) or (zero < 0).any() or (zero > maxq).any():
            raise RuntimeError(f"{name}: zero points are not integers in [0, maxq]")
        tensors["scale"], tensors["zero"] = scale.half(), zero.to(torch.uint8)

    W_perm, W_model_perm = W[:, perm], W_model[:, perm]
    segments = _segments(group_bits, counts)                        # (width, first column, end column)
    # What each storage keeps (permuted order): all, the non-zero weights, or the N:M kept sets.
    candidates: dict[str, Optional[torch.Tensor]] = {"dense": None}
    nm = None
    if prune_n:
        kept = _nm_kept(~mask, W_model, prune_n, prune_m)
        if kept is not None:
            candidates["nm"], nm = kept[:, perm], (prune_n, prune_m)
    if "nm" not in candidates:
        candidates["bitmap"] = W_model_perm != 0
    common = sum(t.numel() * t.element_size() for t in tensors.values())
    raw_size = torch.tensor([], dtype=raw_dtype(W_model.dtype)).element_size()

    def size(storage: str, stored: Optional[torch.Tensor]) -> int:
        total = common + {"dense": 0, "bitmap": _stream_bytes(rows * cols, 1),
                          "nm": _stream_bytes(rows * cols // max(prune_m, 1), nm_pattern_bits(prune_n, prune_m))
                          }[storage]
        for b, s, e in segments:
            count = rows * (e - s) if stored is None else int(stored[:, s:e].sum())
            total += count * raw_size if b >= quant.NO_QUANT_BITS else _stream_bytes(count, b)
        return total

    sizes = {k: size(k, v) for k, v in candidates.items()}
    storage = min(sizes, key=lambda k: (sizes[k], k != "dense"))
    stored = candidates[storage]
    if storage == "bitmap":
        tensors["bitmap"] = pack_bits(stored, 1)
    elif storage == "nm":
        tensors["nm_pattern"] = _nm_encode(mask, prune_n, prune_m)
    for b, s, e in segments:
        sel = None if stored is None else stored[:, s:e]
        if b >= quant.NO_QUANT_BITS:
            values = W_model_perm[:, s:e]
            tensors["raw"] = (values.reshape(-1) if sel is None else values[sel]).to(raw_dtype(W_model.dtype))
            continue
        group = col_group[perm[s:e]]                                 # [n_cols] group of each column
        codes = torch.round(W_perm[:, s:e] / scale[:, group]) + zero[:, group]
        codes = codes.reshape(-1) if sel is None else codes[sel]
        if codes.numel() and (codes.min() < 0 or codes.max() > 2 ** b - 1):
            raise RuntimeError(f"{name}: weights of width-{b} columns are not on their grid")
        tensors[f"codes_{b}"] = pack_bits(codes.to(torch.int32), b)
    packed = PackedLinear(name, (rows, cols), storage, nm, tensors)
    assert packed.nbytes == sizes[storage], (packed.nbytes, sizes[storage])
    if not verify:
        return packed
    decoded = decode_linear(packed.tensors, packed.shape, storage, nm, W_model.dtype, raw_dtype(W_model.dtype), name)
    if not _bitwise_equal(decoded, W_model):
        raise RuntimeError(f"{name}: packed weights do not decode to the compressed weights")
    return packed


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(as_int), b.view(as_int))


def _segments(group_bits: torch.Tensor, counts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(width, start, end) of each width's contiguous run of permuted columns (groups sorted by width)."""
    segments: list[tuple[int, int, int]] = []
    start = 0
    for b, n in zip(group_bits.tolist(), counts.tolist()):
        if segments and segments[-1][0] == b:
            segments[-1] = (b, segments[-1][1], start + n)
        else:
            segments.append((b, start, start + n))
        start += n
    return segments


def _nm_kept(kept: torch.Tensor, W_model: torch.Tensor, n: int, m: int) -> Optional[torch.Tensor]:
    """kept [out, in] if it is an exact N:M pattern (N pruned of each M consecutive columns) with
    zeros at every pruned weight, else None (then the packer falls back to a bitmap)."""
    rows, cols = kept.shape
    if m > MAX_NM_M or cols % m or bool((W_model[~kept] != 0).any()):
        return None
    if not bool((kept.reshape(rows, cols // m, m).sum(dim=2) == m - n).all()):
        return None
    return kept


def _nm_encode(pruned: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = pruned.shape
    device = pruned.device
    table = nm_table(n, m).to(device)
    place = 1 << torch.arange(m, device=device, dtype=torch.int64)
    lookup = torch.full((1 << m,), -1, dtype=torch.int64, device=device)
    lookup[(table.long() * place).sum(dim=1)] = torch.arange(table.shape[0], device=device)
    index = lookup[((~pruned).reshape(rows, cols // m, m).long() * place).sum(dim=2)]   # [rows, blocks]
    assert bool((index >= 0).all())
    bits = nm_pattern_bits(n, m)
    return pack_bits(index, bits) if bits else torch.zeros(0, dtype=torch.uint8, device=device)


# ---------------------------------------------------------------------------------------------------
# decoding one linear (also the loader's validation of its tensors)

def decode_linear(parts: dict[str, torch.Tensor], shape: tuple[int, int], storage: str,
                  nm: Optional[tuple[int, int]], dtype: torch.dtype, raw: torch.dtype, where: str,
                  device: Optional[torch.device | str] = None) -> torch.Tensor:
    """W [out, in] in ``dtype`` from a linear's packed tensors; any inconsistency raises CheckpointError."""
    rows, cols = shape
    device = device or next(iter(parts.values())).device

    def need(part: str, want_dtype: torch.dtype, want_shape: tuple[int, ...]) -> torch.Tensor:
        t = parts[part]
        if t.dtype != want_dtype:
            raise CheckpointError(f"{where}.{part}: dtype {dtype_name(t.dtype)}, expected {dtype_name(want_dtype)}")
        if tuple(t.shape) != tuple(want_shape):
            raise CheckpointError(f"{where}.{part}: shape {list(t.shape)}, expected {list(want_shape)}")
        return t.to(device)

    if "group_bits" not in parts:
        raise CheckpointError(f"{where}: missing tensor {where}.group_bits")
    group_bits = parts["group_bits"]
    if group_bits.dtype != torch.uint8 or group_bits.dim() != 1 or not 1 <= group_bits.numel() <= cols:
        raise CheckpointError(f"{where}.group_bits: expected uint8 [1..{cols}], got {dtype_name(group_bits.dtype)} "
                              f"{list(group_bits.shape)}")
    widths = group_bits.to(device).long()
    if any(b not in quant.VALID_BITS for b in widths.unique().tolist()) or bool((widths[1:] < widths[:-1]).any()):
        raise CheckpointError(f"{where}.group_bits: widths must be nondecreasing values of {quant.VALID_BITS}")
    G = widths.numel()
    Gq = int((widths < quant.NO_QUANT_BITS).sum())
    distinct = sorted(set(widths.tolist()))
    expected = {"group_bits", "col_group"} | ({"scale", "zero"} if Gq else set())
    expected |= {f"codes_{b}" for b in distinct if b < quant.NO_QUANT_BITS}
    expected |= {"raw"} if quant.NO_QUANT_BITS in distinct else set()
    expected |= {"bitmap": {"bitmap"}, "nm": {"nm_pattern"}, "dense": set()}.get(storage, set())
    if storage not in ("dense", "bitmap", "nm"):
        raise CheckpointError(f"{where}: unknown storage {storage!r}")
    if parts.keys() != expected:
        missing, extra = sorted(expected - parts.keys()), sorted(parts.keys() - expected)
        raise CheckpointError(f"{where}: " + "; ".join(
            ([f"missing tensor {where}.{p}" for p in missing[:1]]) + ([f"unexpected tensor {where}.{p}" for p in extra[:1]])))

    col_group = need("col_group", _col_group_dtype(G), (cols,)).long()
    if bool((col_group < 0).any()) or bool((col_group >= G).any()):
        raise CheckpointError(f"{where}.col_group: group ids outside [0, {G})")
    counts = torch.bincount(col_group, minlength=G)
    if bool((counts == 0).any()):
        raise CheckpointError(f"{where}.col_group: a group has no columns")
    perm = torch.argsort(col_group, stable=True)

    kept: Optional[torch.Tensor] = None        # [rows, cols] bool in permuted order; None = all stored
    if storage == "bitmap":
        kept = unpack_bits(need("bitmap", torch.uint8, (_stream_bytes(rows * cols, 1),)), 1, rows * cols)
        kept = kept.bool().reshape(rows, cols)
    elif storage == "nm":
        if not (isinstance(nm, (list, tuple)) and len(nm) == 2 and all(isinstance(v, int) for v in nm)
                and 0 < nm[0] <= nm[1] <= MAX_NM_M and cols % nm[1] == 0):
            raise CheckpointError(f"{where}: bad N:M {nm} for {cols} columns")
        n, m = nm
        table = nm_table(n, m).to(device)
        bits, blocks = nm_pattern_bits(n, m), rows * cols // m
        stream = need("nm_pattern", torch.uint8, (_stream_bytes(blocks, bits),))
        index = unpack_bits(stream, bits, blocks).long() if bits else torch.zeros(blocks, dtype=torch.long, device=device)
        if bool((index >= table.shape[0]).any()):
            raise CheckpointError(f"{where}.nm_pattern: pattern index outside the {table.shape[0]} {n}:{m} patterns")
        kept = table[index].reshape(rows, cols)[:, perm]

    if Gq:
        scale = need("scale", torch.float16, (rows, Gq)).float()
        zero = need("zero", torch.uint8, (rows, Gq)).float()
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise CheckpointError(f"{where}.scale: scales must be finite and positive")
        if bool((zero > (2 ** widths[:Gq]).float() - 1).any()):
            raise CheckpointError(f"{where}.zero: a zero point exceeds its group's largest code")
    out = torch.zeros(rows, cols, dtype=dtype, device=device)   # permuted columns
    for b, s, e in _segments(widths, counts):
        sel = None if kept is None else kept[:, s:e]
        count = rows * (e - s) if sel is None else int(sel.sum())
        if b >= quant.NO_QUANT_BITS:
            values = need("raw", raw, (count,)).to(dtype)
        else:
            codes = unpack_bits(need(f"codes_{b}", torch.uint8, (_stream_bytes(count, b),)), b, count).float()
            group = col_group[perm[s:e]]
            sc, zp = scale[:, group], zero[:, group]
            if sel is None:
                values = (sc * (codes.reshape(rows, e - s) - zp)).to(dtype)   # scale * (code - zero), float32
            else:
                values = (sc[sel] * (codes - zp[sel])).to(dtype)
        if sel is None:
            out[:, s:e] = values.reshape(rows, e - s)
        else:
            segment = out[:, s:e]
            segment[sel] = values
    W = torch.empty_like(out)
    W[:, perm] = out
    return W


# ---------------------------------------------------------------------------------------------------
# model-level helpers

def decoder_prefix(model: nn.Module) -> str:
    """Module name of the decoder layer list, e.g. ``model.layers``."""
    layers = get_decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ValueError("decoder layers not found among the model's modules")


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers, by full module name (what the compressor packs)."""
    prefix = decoder_prefix(model)
    return {f"{prefix}.{i}.{sub}": m for i, layer in enumerate(get_decoder_layers(model))
            for sub, m in layer.named_modules() if isinstance(m, nn.Linear)}


def other_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a checkpoint stores besides the decoder linears' weights (a tied weight once)."""
    packed = {f"{n}.weight" for n in decoder_linears(model)}
    params = dict(model.named_parameters())                      # deduplicated: tied weights once
    all_params = dict(model.named_parameters(remove_duplicate=False))
    return {k: v for k, v in model.state_dict().items()
            if k not in packed and (k in params or k not in all_params)}


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(iter(decoder_linears(model).values())).weight.dtype


def size_report(model: nn.Module, records: list[dict]) -> dict:
    """The checkpoint's tensor bytes (packed decoder linears + other tensors in the model dtype) next to fp16."""
    dtype = model_dtype(model)
    others = other_tensors(model)
    other_bytes = sum(t.numel() for t in others.values()) * torch.tensor([], dtype=dtype).element_size()
    packed = sum(r["packed_bytes"] for r in records)
    params = sum(t.numel() for t in others.values()) + sum(m.weight.numel() for m in decoder_linears(model).values())
    total = packed + other_bytes
    return {"packed_linear_bytes": packed, "other_tensor_bytes": other_bytes, "other_tensor_dtype": dtype_name(dtype),
            "tensor_bytes": total, "fp16_bytes": 2 * params, "ratio_to_fp16": total / (2 * params)}


# ---------------------------------------------------------------------------------------------------
# writing

def _is_packed_checkpoint(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return isinstance(manifest, dict) and manifest.get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _is_dense_export(path: Path) -> bool:
    try:
        marker = json.loads((path / DENSE_MARKER).read_text())
        return isinstance(marker, dict) and marker.get("format") == DENSE_FORMAT
    except (OSError, ValueError):
        return False


def check_destination(path: str, flag: str, dense: bool = False, model: Optional[str] = None) -> None:
    """Refuse, before any work, a destination that is a file, a foreign non-empty directory, the
    model being compressed, or not writable. A previous checkpoint of the same kind may be replaced."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"{flag} {path}: exists and is not a directory")
    if p.is_dir() and any(p.iterdir()):
        previous = _is_dense_export(p) if dense else _is_packed_checkpoint(p)
        if not previous:
            kind = "dense export" if dense else "packed checkpoint"
            raise CheckpointError(f"{flag} {path}: directory is not empty and holds no previous {kind}; "
                                  f"refusing to overwrite it")
    if model is not None and Path(model).exists():
        src, dst = Path(model).resolve(), p.resolve()
        if src == dst or dst in src.parents:
            raise CheckpointError(f"{flag} {path}: would overwrite the model being compressed")
    ancestor = unwritable_ancestor(p)
    if ancestor is not None:
        raise CheckpointError(f"{flag} {path}: {ancestor} is not a writable directory")


def unwritable_ancestor(path: str | Path) -> Optional[Path]:
    """The nearest existing ancestor of ``path`` when no new entry can be made in it, else None.

    Tried rather than guessed: root passes ``os.access`` on read-only file systems such as /proc.
    """
    ancestor = Path(path).resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return ancestor
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".vicuna_mi-probe-", dir=ancestor))
    except OSError:
        return ancestor
    return None


class _AtomicDir:
    """A temporary sibling directory renamed onto ``dest`` when complete.

    Until then ``dest`` is untouched; the temporary directory is removed by ``abort``, or when this
    object is dropped (an exception unwinding the caller) or the interpreter exits without a commit.
    """

    def __init__(self, dest: str | Path):
        self.dest = Path(dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dest.parent / f".{self.dest.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.tmp), ignore_errors=True)

    def commit(self) -> None:
        self._cleanup.detach()
        old = None
        if self.dest.exists():
            old = self.dest.parent / f".{self.dest.name}.old-{os.getpid()}"
            self.dest.rename(old)
        self.tmp.rename(self.dest)
        if old is not None:
            shutil.rmtree(old)

    def abort(self) -> None:
        self._cleanup()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointWriter:
    """Writes a packed checkpoint layer by layer into a temporary directory, renamed into place by ``finish``.

    Only one decoder layer's packed bytes are in memory at a time.
    """

    def __init__(self, dest: str | Path, model: nn.Module):
        from safetensors.torch import save_file

        self._save_file = save_file
        self.prefix = decoder_prefix(model)
        self.expected = {n: tuple(m.weight.shape) for n, m in decoder_linears(model).items()}
        self.dir = _AtomicDir(dest)
        self.linears: dict[str, dict] = {}

    def add_layer(self, index: int, packed: list[PackedLinear]) -> None:
        file = LAYER_FILE.format(index)
        tensors = {}
        for p in packed:
            name = f"{self.prefix}.{index}.{p.name}"
            if self.expected.get(name) != p.shape:
                raise ValueError(f"{name}: not a decoder linear of shape {list(p.shape)} in this model")
            tensors.update({f"{name}.{part}": t.detach().contiguous().cpu() for part, t in p.tensors.items()})
            self.linears[name] = {"file": file, **p.layout()}
        self._save_file(tensors, str(self.dir.tmp / file))

    def finish(self, model: nn.Module, tokenizer: Any, report: dict, fold_vocab: Optional[int] = None) -> Path:
        """Write the other tensors, config, tokenizer and manifest; then move the directory into place."""
        missing = sorted(set(self.expected) - set(self.linears))
        if missing:
            raise ValueError(f"checkpoint incomplete: {missing[0]} was never packed")
        dtype = model_dtype(model)
        others = {k: v.detach().to("cpu", dtype).contiguous() for k, v in other_tensors(model).items()}
        self._save_file(others, str(self.dir.tmp / DENSE_FILE))
        model.config.save_pretrained(self.dir.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.dir.tmp))
        files = {}
        for f in sorted(self.dir.tmp.iterdir()):
            if not f.is_file() or not _FILE_NAME.fullmatch(f.name):
                raise ValueError(f"unexpected entry {f.name} in the checkpoint being written")
            files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "bit_order": BIT_ORDER + ": value i of a B-bit stream is bits [i*B, i*B+B); stream bit k is bit k%8 of byte k//8",
            "dtype": dtype_name(dtype), "raw_dtype": dtype_name(raw_dtype(dtype)), "fold_vocab": fold_vocab,
            "decoder_layers": self.prefix, "dense_file": DENSE_FILE, "linears": self.linears, "files": files,
            "report": report}
        (self.dir.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        self.dir.commit()
        return self.dir.dest

    def abort(self) -> None:
        self.dir.abort()


def save_dense(model: nn.Module, tokenizer: Any, dest: str | Path, info: dict) -> Path:
    """An ordinary Hugging Face checkpoint (safetensors, float16) plus the tokenizer, written atomically.

    The model is converted to float16 in place (the caller is done with it).
    """
    out = _AtomicDir(dest)
    try:
        model.to(torch.float16)
        use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = True   # an ordinary checkpoint for generation too
        try:
            model.save_pretrained(out.tmp, safe_serialization=True)
        finally:
            model.config.use_cache = use_cache
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out.tmp))
        (out.tmp / DENSE_MARKER).write_text(json.dumps({"format": DENSE_FORMAT, **info}, indent=1, default=str))
        out.commit()
    except BaseException:
        out.abort()
        raise
    return out.dest


# ---------------------------------------------------------------------------------------------------
# loading

def is_checkpoint(path: str | Path) -> bool:
    """A directory with a manifest: loaded (and verified) as a packed checkpoint."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).exists()


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{root}: checkpoint format version {version!r} is not supported "
                              f"(this code reads version {FORMAT_VERSION})")
    if manifest.get("bit_order", "").split(":")[0] != BIT_ORDER:
        raise CheckpointError(f"{path}: bit order {manifest.get('bit_order')!r}, expected {BIT_ORDER!r}")
    for key, kind in (("files", dict), ("linears", dict), ("dtype", str), ("raw_dtype", str), ("dense_file", str)):
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"{path}: missing or malformed {key!r}")
    for key in ("dtype", "raw_dtype"):
        if manifest[key] not in _DTYPES:
            raise CheckpointError(f"{path}: {key} {manifest[key]!r} not one of {', '.join(_DTYPES)}")
    if manifest["raw_dtype"] != dtype_name(raw_dtype(_DTYPES[manifest["dtype"]])):
        raise CheckpointError(f"{path}: raw_dtype {manifest['raw_dtype']} does not match dtype {manifest['dtype']}")
    fold = manifest.get("fold_vocab")
    if fold is not None and not (isinstance(fold, int) and fold > 0):
        raise CheckpointError(f"{path}: malformed fold_vocab")
    return manifest


def _verify_files(root: Path, manifest: dict) -> None:
    """Every listed file exists with its size and sha256, and nothing unlisted lies beside them."""
    files = manifest["files"]
    for name, entry in files.items():
        if not _FILE_NAME.fullmatch(name) or name == MANIFEST:
            raise CheckpointError(f"{root}: manifest lists a bad file name {name!r}")
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"{root}: manifest entry of {name} is malformed")
    present = {p.name for p in root.iterdir()} - {MANIFEST}
    extra = sorted(present - files.keys())
    if extra:
        raise CheckpointError(f"{root / extra[0]}: file not listed in the manifest")
    for name, entry in files.items():
        path = root / name
        if not path.exists():
            raise CheckpointError(f"{path}: missing (listed in the manifest)")
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path}: not a regular file")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or altered)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 does not match the manifest (corrupted or altered)")


def _load_tensors(root: Path, name: str, manifest: dict) -> dict[str, torch.Tensor]:
    """Read a verified tensor file once: check its sha256 on the bytes read, then parse those bytes."""
    from safetensors.torch import load

    if name not in manifest["files"] or not name.endswith(".safetensors"):
        raise CheckpointError(f"{root}: tensor file {name!r} is not a listed .safetensors file")
    data = (root / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
        raise CheckpointError(f"{root / name}: sha256 does not match the manifest (changed while loading)")
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error type
        raise CheckpointError(f"{root / name}: not a valid safetensors file ({' '.join(str(e).split())})") from None


def load_compressed(path: str | Path, dtype: Optional[torch.dtype] = None,
                    decode_device: str | torch.device = "cpu") -> modelutils.LoadedModel:
    """Verify and decode a packed checkpoint into a model on the CPU (tokenizer included).

    The weights are exactly the compressed model's (in the checkpoint's dtype); ``dtype`` casts them
    afterwards (None = keep the checkpoint's). Decoding runs on ``decode_device``. Anything that
    disagrees with the manifest (hash, size, name, shape, dtype, version) raises CheckpointError.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = Path(path)
    manifest = _read_manifest(root)
    _verify_files(root, manifest)                                   # every sha256 before any parsing
    if "config.json" not in manifest["files"]:
        raise CheckpointError(f"{root}: manifest lists no config.json")
    stored_dtype = _DTYPES[manifest["dtype"]]
    raw = _DTYPES[manifest["raw_dtype"]]
    try:
        config = AutoConfig.from_pretrained(root, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{root}: cannot build the model from config.json ({str(e).splitlines()[0]})") from None
    linears = {n: tuple(m.weight.shape) for n, m in decoder_linears(skeleton).items()}
    others = {k: tuple(v.shape) for k, v in other_tensors(skeleton).items()}
    listed = manifest["linears"]
    missing = sorted(linears.keys() - listed.keys())
    extra = sorted(listed.keys() - linears.keys())
    if missing or extra:
        raise CheckpointError(f"{root}: " + (f"manifest lacks the decoder linear {missing[0]}" if missing
                                             else f"manifest lists {extra[0]}, not a decoder linear of this model"))

    state: dict[str, torch.Tensor] = {}
    dense = _load_tensors(root, manifest["dense_file"], manifest)
    for name, shape in others.items():
        if name not in dense:
            raise CheckpointError(f"{root / manifest['dense_file']}: missing tensor {name}")
        t = dense.pop(name)
        if t.dtype != stored_dtype or tuple(t.shape) != shape:
            raise CheckpointError(f"{root / manifest['dense_file']}: tensor {name} is {dtype_name(t.dtype)} "
                                  f"{list(t.shape)}, expected {manifest['dtype']} {list(shape)}")
        state[name] = t
    if dense:
        raise CheckpointError(f"{root / manifest['dense_file']}: unexpected tensor {sorted(dense)[0]}")
    del dense

    by_file: dict[str, list[str]] = {}
    for name, entry in listed.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise CheckpointError(f"{root}: manifest entry of {name} is malformed")
        if entry.get("shape") != list(linears[name]):
            raise CheckpointError(f"{root}: {name} has shape {entry.get('shape')} in the manifest, "
                                  f"the model needs {list(linears[name])}")
        if entry["file"] == manifest["dense_file"]:
            raise CheckpointError(f"{root}: {name} points to the dense tensor file")
        by_file.setdefault(entry["file"], []).append(name)
    for file, names in by_file.items():
        tensors = _load_tensors(root, file, manifest)
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            linear, _, part = key.rpartition(".")
            if linear not in names or part not in _PARTS:
                raise CheckpointError(f"{root / file}: unexpected tensor {key}")
            grouped.setdefault(linear, {})[part] = t
        for name in names:
            entry = listed[name]
            nm = tuple(entry["nm"]) if isinstance(entry.get("nm"), list) else entry.get("nm")
            W = decode_linear(grouped.get(name, {}), linears[name], entry.get("storage"), nm, stored_dtype, raw,
                              name, device=decode_device)
            state[f"{name}.weight"] = W.cpu()
        del tensors, grouped

    if dtype is not None and dtype != stored_dtype:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # The skeleton's own class (Auto* needs a path); it builds on meta, takes ``state`` and ties weights.
    model = type(skeleton).from_pretrained(None, config=config, state_dict=state, dtype=dtype or stored_dtype)
    model.config.use_cache = False
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{root}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    return modelutils.LoadedModel(model.eval(), tokenizer, str(root), fold_vocab=manifest.get("fold_vocab"),
                                  weights_format=PACKED, checkpoint_dtype=str(stored_dtype).removeprefix("torch."))
