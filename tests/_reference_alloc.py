"""Frozen copies of channel_grouping.column_errors / allocate_bits and quant.group_grid as of commit 4b72a47.

The optimised versions must reproduce these exactly (tests/test_channel_grouping.py, tests/test_quant.py).
Do not edit: they are the reference, slow on purpose (many small torch ops).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

import quant
from channel_grouping import BitAllocation, _check_bits, _check_finite


def reference_minmax(xmin: torch.Tensor, xmax: torch.Tensor, maxq: torch.Tensor, sym: bool
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
    scale = quant.fp16_ceil((xmax - xmin) / safe_maxq)  # fp16 scales: a checkpoint stores them losslessly
    if sym:
        zero = torch.floor((safe_maxq + 1) / 2).expand_as(scale)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def reference_group_grid(W: torch.Tensor, labels: torch.Tensor, group_bits: list[int], sym: bool = False) -> quant.QGrid:
    """Per-row grids for each group of input channels.

    W: [out, in]; labels: [in] group id of each column (any set of columns, not only contiguous
    blocks); group_bits[g]: width of group g (16 = unquantized). Ranges are taken over the group's
    columns of each row (static grids, computed before the SparseGPT pass).
    """
    assert W.dim() == 2 and labels.shape == (W.shape[1],), (W.shape, labels.shape)
    if torch.isnan(W).any():
        raise ValueError("NaN in weights")
    n_groups = len(group_bits)
    W = W.float()
    rows = W.shape[0]
    idx = labels.to(W.device).long().unsqueeze(0).expand(rows, -1)
    xmin = torch.zeros(rows, n_groups, device=W.device).scatter_reduce(1, idx, W, "amin", include_self=False)
    xmax = torch.zeros(rows, n_groups, device=W.device).scatter_reduce(1, idx, W, "amax", include_self=False)
    bits = torch.tensor([quant.check_bits(int(b)) for b in group_bits], device=W.device, dtype=torch.float32)
    maxq_g = torch.where(bits >= quant.NO_QUANT_BITS, torch.zeros_like(bits), 2 ** bits - 1)  # [groups]
    scale, zero = reference_minmax(xmin, xmax, maxq_g.unsqueeze(0), sym)  # [rows, groups]
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
    """Hessian-diagonal-weighted quantisation error of each input channel at each width.

    # E[j, b] = h_j sum_r (W_rj - q_b(W_rj))^2,  q_b: grid of reference_group_grid(W, labels, [b] * n_groups, sym)

    The grid of each (row, group) spans the group's columns of that row (and 0): the static grids
    SparseGPT gets from ``quant.group_grid`` when the whole group has width b. Width 16 =
    unquantised (0). With keep_mask, pruned weights are left out of the sum only; the grid range
    still covers the dense W. A group's error is the sum of its columns' errors. Computed in
    float32, summed in float64.

    Args:
        W: [out, in]; h_diag: [in] (>= 0); labels: [in] int64 in [0, n_groups);
        keep_mask: [out, in] bool or None.
    Returns:
        errors: [in, len(bit_choices)] float64.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be [out, in], got {tuple(W.shape)}")
    out_f, in_f = W.shape
    if h_diag.shape != (in_f,):
        raise ValueError(f"h_diag must be [{in_f}], got {tuple(h_diag.shape)}")
    if labels.shape != (in_f,) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [{in_f}], got {labels.dtype} {tuple(labels.shape)}")
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    if in_f > 0 and (int(labels.min()) < 0 or int(labels.max()) >= n_groups):
        raise ValueError(f"labels must lie in [0, {n_groups})")
    if keep_mask is not None and (keep_mask.shape != W.shape or keep_mask.dtype != torch.bool):
        raise ValueError(f"keep_mask must be bool [{out_f}, {in_f}], got {keep_mask.dtype} {tuple(keep_mask.shape)}")
    bits = _check_bits(bit_choices)
    _check_finite("W", W)
    _check_finite("h_diag", h_diag)
    if in_f > 0 and float(h_diag.min()) < 0:
        raise ValueError("h_diag must be non-negative")

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
    """One width per group, minimum summed error at every exact total cost (multiple-choice knapsack).

    # dp_h[x] = min_c dp_{h-1}[x - costs[h, c]] + errors[h, c],  dp_0 = [0, inf, inf, ...]

    Args:
        costs: [H, C] int64 >= 0; errors: [H, C] float64; cap: largest total cost kept.
    Returns:
        dp: [cap + 1] float64 (inf where no combination costs exactly x); choice: [H, cap + 1] int64
        width index of group h in the best combination of groups 0..h at each cost.
    """
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
    """Widths per group, one group split between two widths, minimising the summed column errors at a target.

    # min sum_j col_errors[j, b_j]  s.t.  sum_j b_j ~= target * d,  b_j = b_g in each group g but one split group

    Exact over "integral widths + one split" on the column errors (up to the choice of m below):
    for every split group g, a multiple-choice knapsack by exact cost (``_min_error_by_cost``)
    gives the other groups' least error at each total cost x; for every pair of widths a < b, g
    sits at a and its m channels with the largest own error reduction move to b under a new label
    G. Totals are accepted in [target * d - 0.01 d, target * d + min(0.5, 0.01 d)] (rounding above,
    at most 0.01 bits below):
    m is the most channels that keep the total in it (the best m when moving a channel up never
    raises its error), and the least error among accepted candidates wins. Only when no candidate
    is accepted (a small layer) does the one closest to the target win, never above it by > 0.01 bits.

    The split's error is not linear in m: an outlier channel can hold most of its group's error,
    and moving it alone removes that. The LP relaxation (groups mixing widths linearly, solved by
    a greedy over the groups' lower convex hulls) misses this; its optimum with the fractional
    group split is one of the candidates here (when it is accepted), so this is never worse, and
    equal to it when all channels of a group share the group's error equally. The target acts as
    an equality: a zero-error group takes budget only when nothing else can lower the error with it.

    Cost: G knapsacks of G - 1 groups over ~target * d costs, O(G^2 * C * target * d) vector work.
    Guarantee: avg <= target + 0.01; |avg - target| <= 0.01 whenever one channel's step between
    consecutive widths is <= 0.02 * d bits (e.g. d >= 400 with an 8 -> 16 step).

    Args:
        col_errors: [d, len(bit_choices)] float (``column_errors``); labels: [d] int64, groups
        0..G-1 all non-empty; target_avg: in [min, max] of bit_choices.
    """
    bits_in = _check_bits(bit_choices)
    if labels.dim() != 1 or labels.is_floating_point() or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty integer tensor [d], got {labels.dtype} {tuple(labels.shape)}")
    d = labels.shape[0]
    if col_errors.shape != (d, len(bits_in)):
        raise ValueError(f"col_errors must be [{d}, {len(bits_in)}], got {tuple(col_errors.shape)}")
    _check_finite("col_errors", col_errors)
    if not math.isfinite(target_avg):
        raise ValueError(f"target_avg must be finite, got {target_avg}")
    if not min(bits_in) <= target_avg <= max(bits_in):
        raise ValueError(f"target_avg {target_avg} outside [min, max] of bit_choices = [{min(bits_in)}, {max(bits_in)}]")
    lab = labels.detach().cpu().to(torch.int64)  # lab: [d]
    if int(lab.min()) < 0:
        raise ValueError("labels must be non-negative")
    G = int(lab.max()) + 1
    sizes = torch.bincount(lab, minlength=G)  # sizes: [G]
    if not bool((sizes > 0).all()):
        raise ValueError(f"every group 0..{G - 1} must be non-empty, sizes {sizes.tolist()}")

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
