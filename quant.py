"""Min-max quantization grids per output row and per group of input channels (any set of columns).

    q(w) = scale * (clamp(round(w / scale) + zero, 0, maxq) - zero),   maxq = 2^bits - 1

The grid always contains 0 exactly (xmin <= 0 <= xmax and an integer zero point), so weights that
pruning set to zero stay zero after quantization. A width of 16 means "not quantized". Scales are
float16 values (rounded up, then the zero point is taken with the rounded scale), so a checkpoint
that stores fp16 scales and integer codes reproduces every quantized weight exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

NO_QUANT_BITS = 16
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, NO_QUANT_BITS)


def check_bits(bits: int) -> int:
    if bits not in VALID_BITS:
        raise ValueError(f"bit width {bits} not supported: use 2..8 or 16 (= not quantized)")
    return bits


@dataclass(frozen=True)
class QGrid:
    """A quantization grid for every weight of W [out, in] (elements of one (row, group) share values).

    scale, zero, maxq: [out, in] float32. maxq == 0 marks a weight that is not quantized (16 bits).
    """
    scale: torch.Tensor
    zero: torch.Tensor
    maxq: torch.Tensor

    def columns(self, start: int, end: int) -> "QGrid":
        return QGrid(self.scale[:, start:end], self.zero[:, start:end], self.maxq[:, start:end])


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """Round x onto its grid (elementwise, broadcasting); entries with maxq == 0 pass through unchanged."""
    q = scale * (torch.clamp(torch.round(x / scale) + zero, torch.zeros_like(maxq), maxq) - zero)
    return torch.where(maxq > 0, q, x)


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= x, as float32 (x > 0; capped at the float16 maximum, 65504).

    Rounding a scale up, never down, keeps the grid covering the range it was built from.
    """
    x = x.float().clamp(max=torch.finfo(torch.float16).max)
    h = x.half()
    up = (h.view(torch.int16) + 1).view(torch.float16)  # next float16 above a non-negative h
    return torch.where(h.float() < x, up, h).float()


def _minmax(xmin: torch.Tensor, xmax: torch.Tensor, maxq: torch.Tensor, sym: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """scale and zero from per-(row, group) ranges; maxq broadcasts against them."""
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    degenerate = (xmax - xmin) == 0
    xmin = torch.where(degenerate, -torch.ones_like(xmin), xmin)
    xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
    safe_maxq = torch.clamp(maxq, min=1)
    scale = fp16_ceil((xmax - xmin) / safe_maxq)  # fp16 scales: a checkpoint stores them losslessly
    if sym:
        zero = torch.floor((safe_maxq + 1) / 2).expand_as(scale)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def group_ranges(W: torch.Tensor, labels: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each row over each group's columns (0 for a group with no columns).

    # xmin[r, g] = min_{j : labels_j = g} W[r, j],  xmax[r, g] = max_{j : labels_j = g} W[r, j]

    W: [out, in] float; labels: [in] group ids in [0, n_groups). Returns xmin, xmax: [out, n_groups] float32.
    """
    W = W.float()
    rows = W.shape[0]
    idx = labels.to(W.device).long().unsqueeze(0).expand(rows, -1)
    xmin = torch.zeros(rows, n_groups, device=W.device).scatter_reduce(1, idx, W, "amin", include_self=False)
    xmax = torch.zeros(rows, n_groups, device=W.device).scatter_reduce(1, idx, W, "amax", include_self=False)
    return xmin, xmax


def scales_from_ranges(xmin: torch.Tensor, xmax: torch.Tensor, maxq: torch.Tensor, sym: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The grids of several widths at once: scale, zero [widths, out, groups] from ranges [out, groups], maxq [widths].

    Elementwise, so each width's slice is bitwise what ``group_scales`` gives for that width alone.
    """
    return _minmax(xmin.unsqueeze(0), xmax.unsqueeze(0), maxq.view(-1, 1, 1), sym)


def group_scales(xmin: torch.Tensor, xmax: torch.Tensor, group_bits: Sequence[int], sym: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid parameters of each (row, group) from its range (``group_ranges``).

    # maxq_g = 2^bits_g - 1 (0 for 16 bits);  scale, zero = _minmax(xmin, xmax, maxq_g, sym)

    xmin, xmax: [out, groups]; group_bits[g]: width of group g. Returns scale, zero: [out, groups]
    (zero may be an expanded view) and maxq_g: [groups] float32.
    """
    # Built on the host and copied without waiting for the device (a blocking copy is a host sync).
    bits = torch.tensor([check_bits(int(b)) for b in group_bits], dtype=torch.float32).to(xmin.device, non_blocking=True)
    maxq_g = torch.where(bits >= NO_QUANT_BITS, torch.zeros_like(bits), 2 ** bits - 1)  # [groups]
    scale, zero = _minmax(xmin, xmax, maxq_g.unsqueeze(0), sym)  # [rows, groups]
    return scale, zero, maxq_g


def group_grid(W: torch.Tensor, labels: torch.Tensor, group_bits: Sequence[int], sym: bool = False) -> QGrid:
    """Per-row grids for each group of input channels.

    W: [out, in]; labels: [in] group id of each column (any set of columns, not only contiguous
    blocks); group_bits[g]: width of group g (16 = unquantized). Ranges are taken over the group's
    columns of each row (static grids, computed before the SparseGPT pass).
    """
    assert W.dim() == 2 and labels.shape == (W.shape[1],), (W.shape, labels.shape)
    return stacked_group_grid(W, [W.shape[0]], [labels], [group_bits], sym)


def stacked_group_grid(W: torch.Tensor, row_splits: Sequence[int], labels: Sequence[torch.Tensor],
                       group_bits: Sequence[Sequence[int]], sym: bool = False) -> QGrid:
    """``group_grid`` of stacked sub-layers (W's rows split by ``row_splits``), each with its own labels and widths.

    Rows r0:r1 of the result are bitwise group_grid(W[r0:r1], labels[s], group_bits[s], sym): each
    row's grid depends on that row alone. One grid for the fused SparseGPT call (no concatenation)
    and one NaN check (a host read) for all sub-layers.
    """
    assert W.dim() == 2 and sum(row_splits) == W.shape[0] and len(row_splits) == len(labels) == len(group_bits)
    if torch.isnan(W).any():
        raise ValueError("NaN in weights")
    W = W.float()
    scale, zero, maxq = (torch.empty_like(W) for _ in range(3))   # [out, in] each
    r0 = 0
    for rows, lab, bits in zip(row_splits, labels, group_bits):
        assert lab.shape == (W.shape[1],), (W.shape, lab.shape)
        r1 = r0 + rows
        xmin, xmax = group_ranges(W[r0:r1], lab, len(bits))  # [rows, groups]
        s_g, z_g, maxq_g = group_scales(xmin, xmax, bits, sym)  # [rows, groups], [groups]
        lab = lab.to(W.device).long()
        idx = lab.unsqueeze(0).expand(rows, -1)
        torch.gather(s_g, 1, idx, out=scale[r0:r1])
        torch.gather(z_g, 1, idx, out=zero[r0:r1])
        maxq[r0:r1] = maxq_g[lab]
        r0 = r1
    return QGrid(scale, zero, maxq)


def uniform_grid(W: torch.Tensor, bits: int, sym: bool = False) -> QGrid:
    """One width for all columns, one grid per row."""
    return group_grid(W, torch.zeros(W.shape[1], dtype=torch.long, device=W.device), [bits], sym)


def quantize_weight(W: torch.Tensor, grid: QGrid) -> torch.Tensor:
    """Round-to-nearest of a whole weight matrix on its grid (no error feedback)."""
    return quantize(W.float(), grid.scale, grid.zero, grid.maxq).to(W.dtype)
