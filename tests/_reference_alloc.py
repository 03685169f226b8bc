"""Frozen copies of channel_grouping.column_errors / allocate_bits and quant.group_grid as of commit 4b72a47.

The optimised versions must reproduce these exactly (tests/test_channel_grouping.py).
Do not edit: they are the reference, slow on purpose (many small torch ops).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

import quant
from channel_grouping import BitAllocation


def reference_group_grid(W: torch.Tensor, labels: torch.Tensor, group_bits: list[int], sym: bool = False) -> quant.QGrid:
    """quant.group_grid as of 4b72a47 (inputs assumed valid)."""
    n_groups = len(group_bits)
    W = W.float()
    rows = W.shape[0]
    idx = labels.to(W.device).long().unsqueeze(0).expand(rows, -1)
    xmin = torch.zeros(rows, n_groups, device=W.device).scatter_reduce(1, idx, W, "amin", include_self=False)
    xmax = torch.zeros(rows, n_groups, device=W.device).scatter_reduce(1, idx, W, "amax", include_self=False)
    bits = torch.tensor([quant.check_bits(int(b)) for b in group_bits], device=W.device, dtype=torch.float32)
    maxq_g = torch.where(bits >= quant.NO_QUANT_BITS, torch.zeros_like(bits), 2 ** bits - 1)  # [groups]
    scale, zero = quant._minmax(xmin, xmax, maxq_g.unsqueeze(0), sym)  # [rows, groups]
    maxq = maxq_g[labels.to(W.device).long()].unsqueeze(0).expand(rows, -1)
    return quant.QGrid(scale.gather(1, idx), zero.gather(1, idx), maxq.contiguous())


def reference_column_errors(
    W: Tensor,
    h_diag: Tensor,
    labels: Tensor,
    n_groups: int,
    bit_choices: list[int],
    keep_mask: Tensor | None = None,
    sym: bool = False,
) -> Tensor:
    """column_errors as of 4b72a47 (inputs assumed valid): one group_grid and quantize per width."""
    out_f, in_f = W.shape
    bits = list(bit_choices)
    device = W.device
    Wf = W.to(torch.float32)  # Wf: [out, in]
    lab = labels.to(device=device, dtype=torch.int64)
    weight = h_diag.to(device=device, dtype=torch.float32)[None, :]  # weight: [1, in]
    if keep_mask is not None:
        weight = weight * keep_mask
    errors = torch.zeros(in_f, len(bits), dtype=torch.float64, device=device)
    for c, b in enumerate(bits):
        if b >= quant.NO_QUANT_BITS:
            continue
        q = quant.quantize_weight(Wf, reference_group_grid(Wf, lab, [b] * n_groups, sym))  # the grids SparseGPT will use
        errors[:, c] = (weight * (Wf - q) ** 2).sum(0, dtype=torch.float64)
    return errors


def _reference_min_error_by_cost(costs: Tensor, errors: Tensor, cap: int) -> tuple[Tensor, Tensor]:
    """channel_grouping._min_error_by_cost as of 4b72a47, in torch."""
    H, C = costs.shape
    dp = torch.full((cap + 1,), math.inf, dtype=torch.float64)
    dp[0] = 0.0
    choice = torch.zeros(H, cap + 1, dtype=torch.int64)
    for h in range(H):
        cand = torch.full((C, cap + 1), math.inf, dtype=torch.float64)  # cand: [C, cap + 1]
        for c in range(C):
            w = int(costs[h, c])
            if w <= cap:
                cand[c, w:] = dp[: cap + 1 - w] + errors[h, c]
        dp, choice[h] = cand.min(0)  # ties: the first (narrowest) width
    return dp, choice


def reference_allocate_bits(col_errors: Tensor, labels: Tensor, bit_choices: list[int], target_avg: float) -> BitAllocation:
    """allocate_bits as of 4b72a47 (inputs assumed valid): per split group a torch knapsack, then a
    Python loop over width pairs and both choices of m."""
    bits_in = list(bit_choices)
    d = labels.shape[0]
    lab = labels.detach().cpu().to(torch.int64)  # lab: [d]
    G = int(lab.max()) + 1
    sizes = torch.bincount(lab, minlength=G)  # sizes: [G]

    order = sorted(range(len(bits_in)), key=lambda c: bits_in[c])
    bits = torch.tensor([bits_in[c] for c in order], dtype=torch.int64)  # bits: [C] ascending
    col_err = col_errors.detach().cpu().to(torch.float64)[:, order]  # col_err: [d, C]
    E = torch.zeros(G, len(order), dtype=torch.float64).index_add_(0, lab, col_err)  # E: [G, C]
    costs = sizes[:, None] * bits[None, :]  # costs: [G, C] bits of a whole group at each width
    target = target_avg * d  # total bits asked for
    lo, hi = target - 0.01 * d, target + min(0.5, 0.01 * d)  # accepted totals
    zero = torch.zeros(1, dtype=torch.float64)

    # best: (distance to the target unless accepted, error, g, a, b, x, m, others, knapsack choice)
    best: tuple[float, float, int, int, int, int, int, list[int], Tensor] | None = None
    for g in range(G):
        n_g = int(sizes[g])
        others = [h for h in range(G) if h != g]
        cap = math.floor(target + 0.01 * d) - n_g * int(bits[0])  # most bits the other groups may take
        if cap < 0:
            continue
        dp, choice = _reference_min_error_by_cost(costs[others], E[others], cap)  # dp: [cap + 1]
        x = torch.arange(cap + 1, dtype=torch.float64)  # x: [cap + 1] bits of the other groups
        cols = torch.nonzero(lab == g).flatten()  # cols: [n_g]
        for a, b in itertools.combinations(range(len(order)), 2):  # g at width a, m of its channels at b
            step = int(bits[b] - bits[a])
            saved = torch.cat([zero, torch.cumsum((col_err[cols, a] - col_err[cols, b]).sort(descending=True).values, 0)])
            base = x + n_g * int(bits[a])  # base: [cap + 1] bits before the split
            m_top = torch.floor((hi - base) / step)  # most channels keeping the total <= hi
            for m in (m_top.clamp(0, n_g), (m_top + 1).clamp(0, n_g)):  # the second: closest above when m_top < lo
                total = base + m * step  # total: [cap + 1] integers
                miss = torch.where((total >= lo) & (total <= hi), 0.0, (total - target).abs())
                miss = torch.where((total <= target + 0.01 * d) & (dp < math.inf), miss, math.inf)
                err = dp + E[g, a] - saved[m.long()]  # err: [cap + 1] summed column errors of each candidate
                p = int(torch.argmin(torch.where(miss == miss.min(), err, math.inf)))
                if best is None or (float(miss[p]), float(err[p])) < best[:2]:
                    best = (float(miss[p]), float(err[p]), g, a, b, p, int(m[p]), others, choice)

    width = torch.zeros(G, dtype=torch.int64)  # width: [G] index into bits (all 0 when there is one width)
    new_labels = lab.clone()
    split_bits: list[int] = []
    if best is not None:
        _, _, g, a, b, x_left, m, others, choice = best
        for i in range(len(others) - 1, -1, -1):  # backtrack the knapsack
            width[others[i]] = choice[i, x_left]
            x_left -= int(costs[others[i], width[others[i]]])
        cols = torch.nonzero(lab == g).flatten()
        width[g] = b if m == cols.numel() else a
        if 0 < m < cols.numel():
            moved = cols[torch.argsort(col_err[cols, a] - col_err[cols, b], descending=True, stable=True)[:m]]
            new_labels[moved] = G
            split_bits = [int(bits[b])]
    group_bits = bits[width].tolist() + split_bits
    col_bits = torch.tensor(group_bits, dtype=torch.int64)[new_labels]  # col_bits: [d]
    est_error = float(col_err.gather(1, torch.searchsorted(bits, col_bits)[:, None]).sum())  # sum_j E[j, b_j]
    device = labels.device
    return BitAllocation(col_bits=col_bits.to(device), labels=new_labels.to(device), group_bits=group_bits, est_error=est_error)
