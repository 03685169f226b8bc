"""Grouping of input channels (columns of W [out, in]) and per-group bit-width allocation.

* ``spectral_cluster``: normalised spectral clustering (Ng-Jordan-Weiss) of an MI affinity matrix.
* ``random_groups`` / ``contiguous_groups``: baselines.
* ``group_errors``: Hessian-diagonal-weighted quantisation error of each group at each width.
* ``allocate_bits``: multiple-choice knapsack (DP) over groups + one boundary-group split so that
  the average width hits the target.

All functions are pure and device-agnostic (CPU or CUDA tensors in, tensors of the same device out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import quant

__all__ = [
    "Grouping",
    "BitAllocation",
    "VALID_BITS",
    "spectral_cluster",
    "top_eigenvectors",
    "kmeans",
    "silhouette_score",
    "random_groups",
    "contiguous_groups",
    "group_errors",
    "knapsack_min_error",
    "allocate_bits",
]

VALID_BITS = frozenset(quant.VALID_BITS)  # 16 = keep in half precision (no quantisation)


@dataclass(frozen=True)
class Grouping:
    labels: Tensor  # [d] int64 group id per input channel, 0..n_groups-1, every group non-empty
    silhouette: float  # clustering quality in [-1, 1] (nan where undefined, e.g. 1 group)


@dataclass(frozen=True)
class BitAllocation:
    col_bits: Tensor  # [d] int64 width of each input channel (after any boundary split)
    labels: Tensor  # [d] int64 labels after a split (split part gets label n_groups)
    group_bits: list[int]  # width per label (len = number of labels incl. a split one)
    avg_bits: float  # mean of col_bits (= weight-weighted average: all columns have `out` rows)
    est_error: float  # estimated total error (split group's error shared by importance)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _check_finite(name: str, t: Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")


def _check_k(d: int, n_groups: int) -> None:
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    if n_groups > d:
        raise ValueError(f"n_groups ({n_groups}) exceeds the number of channels ({d})")


def _canonical(labels: Tensor, k: int) -> Tensor:
    """Relabel clusters in order of first appearance (deterministic ids).

    # new[c] = rank of min{i : labels_i = c}
    """
    d = labels.numel()
    first = torch.full((k,), d, dtype=torch.int64, device=labels.device)
    first.scatter_reduce_(0, labels, torch.arange(d, device=labels.device), "amin")  # first: [k]
    order = torch.argsort(first)
    remap = torch.empty_like(order)
    remap[order] = torch.arange(k, device=labels.device)
    return remap[labels]  # [d]


def _sq_dists(X: Tensor, C: Tensor) -> Tensor:
    """Squared Euclidean distances.

    # D_ic = |x_i|^2 + |c_c|^2 - 2 x_i . c_c
    """
    d2 = (X * X).sum(1, keepdim=True) + (C * C).sum(1)[None, :] - 2.0 * (X @ C.T)
    return d2.clamp_min_(0.0)  # [n, k]


# ----------------------------------------------------------------------------------------------
# spectral clustering
# ----------------------------------------------------------------------------------------------


QR_EVERY = 5  # subspace-iteration steps between re-orthonormalisations


def top_eigenvectors(
    M: Tensor,
    k: int,
    seed: int = 0,
    eigh_max_dim: int = 2048,
    n_iter: int = 50,
    oversample: int = 10,
) -> Tensor:
    """Eigenvectors of the k algebraically largest eigenvalues of a symmetric M.

    # M V = V diag(lambda_1..k),  lambda_1 >= ... >= lambda_k

    d <= eigh_max_dim: dense ``torch.linalg.eigh``. Otherwise randomised subspace iteration on the
    shifted operator M + I (spectrum of a normalised affinity lies in [-1, 1], so the shift makes
    the wanted eigenvalues the largest in magnitude) with a block of k + oversample vectors, QR
    re-orthonormalisation every step and a final Rayleigh-Ritz projection.

    Args:
        M: [d, d] symmetric float.
    Returns:
        V: [d, k] orthonormal columns (same dtype/device as M).
    """
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be square [d, d], got {tuple(M.shape)}")
    d = M.shape[0]
    if not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    _check_finite("M", M)
    b = min(d, k + max(oversample, 0))
    if d <= eigh_max_dim or b >= d:
        _, vecs = torch.linalg.eigh(M)  # ascending eigenvalues
        return vecs[:, -k:].flip(1).contiguous()
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(d, b, generator=g, dtype=torch.float32).to(device=M.device, dtype=M.dtype)
    Q, _ = torch.linalg.qr(Q)  # Q: [d, b]
    # The shifted spectrum lies in [0, 2], so a few steps without re-orthonormalisation can't
    # overflow; a QR every QR_EVERY steps keeps the block well conditioned at a fifth of the cost.
    for it in range(n_iter):
        Q = M @ Q + Q
        if (it + 1) % QR_EVERY == 0 or it == n_iter - 1:
            Q, _ = torch.linalg.qr(Q)
    T = Q.T @ (M @ Q)  # T: [b, b] Rayleigh quotient
    T = 0.5 * (T + T.T)
    _, U = torch.linalg.eigh(T)
    return (Q @ U[:, -k:].flip(1)).contiguous()  # [d, k]


def kmeans(
    X: Tensor,
    k: int,
    seed: int = 0,
    n_init: int = 4,
    max_iter: int = 100,
) -> Tensor:
    """k-means (k-means++ init, Lloyd iterations, ``n_init`` restarts, best inertia kept).

    # argmin_labels sum_i |x_i - c_{label_i}|^2

    Empty clusters are repaired inside every Lloyd step by moving the point farthest from its
    centre (taken from a cluster with >= 2 members) into the empty cluster, so all k clusters
    are non-empty even when X has fewer than k distinct rows. Randomness comes from a CPU
    ``torch.Generator(seed)`` (device-independent).

    Args:
        X: [n, f] points (n >= k).
    Returns:
        labels: [n] int64 in [0, k), every cluster non-empty, ids in order of first appearance.
    """
    if X.dim() != 2:
        raise ValueError(f"X must be [n, f], got {tuple(X.shape)}")
    n = X.shape[0]
    _check_k(n, k)
    _check_finite("X", X)
    X = X.to(torch.float32) if X.dtype not in (torch.float32, torch.float64) else X
    device = X.device
    g = torch.Generator().manual_seed(seed)
    if k == 1:
        return torch.zeros(n, dtype=torch.int64, device=device)

    best_labels: Tensor | None = None
    best_inertia = math.inf
    for _ in range(max(n_init, 1)):
        # k-means++ seeding: sample proportional to squared distance to the nearest chosen centre
        first = int(torch.randint(n, (1,), generator=g))
        idx = [first]
        d2 = _sq_dists(X, X[first : first + 1]).squeeze(1)  # d2: [n]
        for _c in range(1, k):
            u = float(torch.rand((), generator=g))
            total = d2.sum()
            if float(total) <= 0.0:
                nxt = int(torch.randint(n, (1,), generator=g))
            else:
                cdf = torch.cumsum(d2, 0)
                nxt = int(torch.searchsorted(cdf, (u * total).reshape(1), right=True).clamp_max(n - 1))
            idx.append(nxt)
            d2 = torch.minimum(d2, _sq_dists(X, X[nxt : nxt + 1]).squeeze(1))
        C = X[torch.tensor(idx, device=device)].clone()  # C: [k, f]

        labels = torch.full((n,), -1, dtype=torch.int64, device=device)
        for _it in range(max_iter):
            D = _sq_dists(X, C)  # D: [n, k]
            dmin, new = D.min(1)
            counts = torch.bincount(new, minlength=k)
            if bool((counts == 0).any()):
                new, dmin = _repair_empty(new, dmin, counts, k)
            converged = torch.equal(new, labels)
            labels = new
            counts = torch.bincount(labels, minlength=k).to(X.dtype)
            C = torch.zeros_like(C).index_add_(0, labels, X) / counts[:, None]
            if converged:
                break
        inertia = float(((X - C[labels]) ** 2).sum())
        if inertia < best_inertia - 1e-12 or best_labels is None:
            best_inertia, best_labels = inertia, labels
    assert best_labels is not None
    return _canonical(best_labels, k)


def _repair_empty(labels: Tensor, dmin: Tensor, counts: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Fill every empty cluster with the farthest point of a cluster that has >= 2 members.

    # i* = argmax_{i : |cluster(i)| >= 2} |x_i - c_{label_i}|^2
    """
    labels = labels.clone()  # labels: [n]
    dmin = dmin.clone()  # dmin: [n]
    counts = counts.clone()  # counts: [k]
    for c in torch.nonzero(counts == 0).flatten().tolist():
        movable = counts[labels] > 1
        score = torch.where(movable, dmin, torch.full_like(dmin, -1.0))
        i = int(torch.argmax(score))
        counts[labels[i]] -= 1
        counts[c] += 1
        labels[i] = c
        dmin[i] = -2.0  # never move the same point twice
    return labels, dmin


def silhouette_score(X: Tensor, labels: Tensor, max_samples: int = 2048, seed: int = 0) -> float:
    """Mean silhouette (Euclidean) over a random subsample of at most ``max_samples`` points.

    # s_i = (b_i - a_i) / max(a_i, b_i);  a_i = mean dist to own cluster, b_i = min mean dist to another

    Same definition as sklearn's ``silhouette_score`` (s_i = 0 for singleton clusters); the
    subsample (CPU ``torch.Generator(seed)``) is used both as the points and as the reference set.
    nan when the (sub)sample has fewer than 2 or as many clusters as points.

    Args:
        X: [n, f], labels: [n] int64.
    """
    if X.dim() != 2 or labels.dim() != 1 or labels.shape[0] != X.shape[0]:
        raise ValueError(f"X [n, f] and labels [n] mismatch: {tuple(X.shape)} vs {tuple(labels.shape)}")
    _check_finite("X", X)
    n = X.shape[0]
    if n > max_samples:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=g)[:max_samples].to(X.device)
        X, labels = X[idx], labels[idx]
        n = max_samples
    _, lab = torch.unique(labels, return_inverse=True)  # lab: [n] compact ids
    k = int(lab.max()) + 1 if n > 0 else 0
    if k < 2 or k >= n:
        return float("nan")
    Xf = X.to(torch.float64)
    D = _sq_dists(Xf, Xf).sqrt_()  # D: [n, n]
    D.fill_diagonal_(0.0)
    onehot = torch.nn.functional.one_hot(lab, k).to(torch.float64)  # onehot: [n, k]
    cnt = onehot.sum(0)  # cnt: [k]
    S = D @ onehot  # S: [n, k] summed distance of point i to cluster c
    own_cnt = cnt[lab]
    a = S.gather(1, lab[:, None]).squeeze(1) / (own_cnt - 1).clamp_min(1)
    mean_other = S / cnt[None, :]
    mean_other.scatter_(1, lab[:, None], math.inf)
    b = mean_other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-300)
    s = torch.where(own_cnt > 1, s, torch.zeros_like(s))
    return float(s.mean())


def spectral_cluster(
    affinity: Tensor,
    n_groups: int,
    seed: int = 0,
    *,
    eigh_max_dim: int | None = None,
    n_iter: int = 50,
    oversample: int = 10,
    n_init: int = 2,
    silhouette_samples: int = 2048,
) -> Grouping:
    """Normalised spectral clustering (Ng-Jordan-Weiss) of channels from an MI affinity.

    # M = D^-1/2 (A + eps) D^-1/2,  D = diag((A + eps) 1);  rows of top-k eigvecs of M -> k-means

    Steps: symmetrise, clamp >= 0 and zero the diagonal of A (self-affinity unused; binned MI puts
    entropies there); add eps = 1e-3 * mean(A) (1 if A == 0) to every entry so isolated /
    zero-degree channels are still connected; top-n_groups eigenvectors (``top_eigenvectors``:
    dense eigh for d <= eigh_max_dim (default 512 on the CPU, 256 on a GPU), randomised subspace
    iteration above); row-normalise;
    k-means (``kmeans``). The silhouette is computed in that row-normalised spectral embedding
    on a random subsample of at most ``silhouette_samples`` channels (deterministic from seed).

    Args:
        affinity: [d, d] symmetric, non-negative (e.g. gaussian_mi output).
    Returns:
        Grouping with labels [d] (every group non-empty) and silhouette (nan if n_groups == 1).
    """
    if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"affinity must be square [d, d], got {tuple(affinity.shape)}")
    d = affinity.shape[0]
    _check_k(d, n_groups)
    _check_finite("affinity", affinity)
    device = affinity.device
    if n_groups == 1:
        return Grouping(torch.zeros(d, dtype=torch.int64, device=device), float("nan"))
    A = affinity.to(torch.float32)
    lo, hi = (float(v) for v in torch.aminmax(A))
    amax = max(hi, -lo)
    if lo < -1e-6 * amax - 1e-12:
        raise ValueError("affinity must be non-negative")
    asym = A - A.T  # asym: [d, d] (the only transposed pass; matters for d ~ 1e4 on CPU)
    alo, ahi = (float(v) for v in torch.aminmax(asym))
    if max(ahi, -alo) > 1e-4 * amax + 1e-6:
        raise ValueError("affinity must be symmetric")
    A = torch.sub(A, asym, alpha=0.5).clamp_min_(0.0)  # A: [d, d] = (A + A^T) / 2, a fresh tensor
    del asym
    A.fill_diagonal_(0.0)
    mean = float(A.mean())
    eps = 1e-3 * mean if mean > 0 else 1.0
    A.add_(eps)
    s = A.sum(1).rsqrt()  # s: [d] = D^-1/2 (degrees >= d * eps > 0)
    A.mul_(s[:, None]).mul_(s[None, :])  # A is now M: [d, d]
    if eigh_max_dim is None:  # a dense eigh is cheap on the CPU but slow on a GPU, where matmuls are cheap
        eigh_max_dim = 512 if device.type == "cpu" else 256
    V = top_eigenvectors(A, n_groups, seed=seed, eigh_max_dim=eigh_max_dim, n_iter=n_iter, oversample=oversample)
    del A
    # The embedding is small ([d, k]): k-means and the silhouette run on the CPU, where their many
    # tiny steps cost no device synchronisation.
    Y = (V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu()  # Y: [d, k] row-normalised embedding
    labels = kmeans(Y, n_groups, seed=seed, n_init=n_init)
    sil = silhouette_score(Y, labels, max_samples=silhouette_samples, seed=seed)
    return Grouping(labels.to(device), sil)


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------


def random_groups(d: int, n_groups: int, seed: int, device: torch.device | str = "cpu") -> Grouping:
    """Random groups of equal size (sizes differ by at most one).

    # labels = perm(arange(d) mod k)
    """
    _check_k(d, n_groups)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(d, generator=g)
    labels = torch.empty(d, dtype=torch.int64)
    labels[perm] = torch.arange(d) % n_groups
    return Grouping(labels.to(device), float("nan"))


def contiguous_groups(d: int, n_groups: int, device: torch.device | str = "cpu") -> Grouping:
    """Contiguous blocks of channels.

    # labels = floor(arange(d) * k / d)
    """
    _check_k(d, n_groups)
    labels = torch.arange(d, dtype=torch.int64, device=device) * n_groups // d
    return Grouping(labels, float("nan"))


# ----------------------------------------------------------------------------------------------
# quantisation error per group and width
# ----------------------------------------------------------------------------------------------


def _check_bits(bit_choices: list[int]) -> list[int]:
    if not bit_choices:
        raise ValueError("bit_choices must be a non-empty list")
    bits = [int(b) for b in bit_choices]
    if any(b != bc for b, bc in zip(bits, bit_choices)) or any(b not in VALID_BITS for b in bits):
        raise ValueError(f"bit_choices must be widths in {{2..8, 16}}, got {bit_choices}")
    if len(set(bits)) != len(bits):
        raise ValueError(f"bit_choices must be distinct, got {bit_choices}")
    return bits


def group_errors(
    W: Tensor,
    h_diag: Tensor,
    labels: Tensor,
    n_groups: int,
    bit_choices: list[int],
    keep_mask: Tensor | None = None,
) -> Tensor:
    """Hessian-diagonal-weighted quantisation error of each group at each width.

    # E[g, b] = sum_r sum_{j in g} h_j (W_rj - q_b(W_rj))^2,  q_b: asymmetric min-max grid per (row, group) incl. 0

    Grid per (row r, group g) with 2^b levels: xmin = min(min W, 0), xmax = max(max W, 0),
    scale = (xmax - xmin) / (2^b - 1), zero = round(-xmin / scale),
    q = scale * (clamp(round(w / scale) + zero, 0, 2^b - 1) - zero). Width 16 = unquantised (0).
    With keep_mask, pruned weights are excluded from the sum only; the grid range is taken over
    the whole (dense) W, like the static grids of quant.group_grid that are fixed before the
    SparseGPT pass. Computed in float32, summed in float64.

    Args:
        W: [out, in]; h_diag: [in] (>= 0); labels: [in] int64 in [0, n_groups);
        keep_mask: [out, in] bool or None.
    Returns:
        errors: [n_groups, len(bit_choices)] float64.
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
    errors = torch.zeros(n_groups, len(bits), dtype=torch.float64, device=device)
    for c, b in enumerate(bits):
        if b >= quant.NO_QUANT_BITS:
            continue
        q = quant.quantize_weight(Wf, quant.group_grid(Wf, lab, [b] * n_groups))  # the grids SparseGPT will use
        err_col = (weight * (Wf - q) ** 2).sum(0, dtype=torch.float64)  # err_col: [in]
        errors[:, c].index_add_(0, lab, err_col)
    return errors


# ----------------------------------------------------------------------------------------------
# bit allocation
# ----------------------------------------------------------------------------------------------


def knapsack_min_error(costs: Tensor, errors: Tensor, budget: int) -> Tensor:
    """Multiple-choice knapsack: one choice per group, minimum total error within an integer budget.

    # min sum_g errors[g, c_g]  s.t.  sum_g costs[g, c_g] <= budget

    DP over the exact-cost axis (vectorised with torch), loop over groups only; costs are divided
    by their gcd first. Ties prefer the cheaper solution.

    Args:
        costs: [G, C] non-negative integers; errors: [G, C] float.
    Returns:
        choice: [G] int64 column index per group (ValueError if nothing fits).
    """
    if costs.dim() != 2 or costs.shape != errors.shape:
        raise ValueError(f"costs and errors must both be [G, C], got {tuple(costs.shape)} and {tuple(errors.shape)}")
    _check_finite("errors", errors)
    G, C = costs.shape
    cost_list = [[int(x) for x in row] for row in costs.cpu().tolist()]
    if any(x < 0 for row in cost_list for x in row):
        raise ValueError("costs must be non-negative")
    if budget < sum(min(row) for row in cost_list):
        raise ValueError(f"budget {budget} is below the cheapest combination")
    gcd = 0
    for row in cost_list:
        for x in row:
            gcd = math.gcd(gcd, x)
    gcd = max(gcd, 1)
    cost_list = [[x // gcd for x in row] for row in cost_list]
    cap = budget // gcd
    cap = min(cap, sum(max(row) for row in cost_list))
    device = errors.device
    err = errors.to(torch.float64)
    dp = torch.full((cap + 1,), math.inf, dtype=torch.float64, device=device)  # dp[b]: min err at cost exactly b
    dp[0] = 0.0
    choices = torch.empty(G, cap + 1, dtype=torch.int64, device=device)
    inf_pad = torch.full((cap + 1,), math.inf, dtype=torch.float64, device=device)
    for gi in range(G):
        cand = torch.empty(C, cap + 1, dtype=torch.float64, device=device)  # cand: [C, cap+1]
        for c in range(C):
            w = cost_list[gi][c]
            if w > cap:
                cand[c] = inf_pad
            else:
                cand[c, :w] = math.inf
                cand[c, w:] = dp[: cap + 1 - w] + err[gi, c]
        dp, choices[gi] = cand.min(0)
    b = int(torch.argmin(dp))  # first minimum = cheapest among equal errors
    if not math.isfinite(float(dp[b])):
        raise ValueError("no feasible combination within budget")
    choice = torch.empty(G, dtype=torch.int64)
    for gi in range(G - 1, -1, -1):
        c = int(choices[gi, b])
        choice[gi] = c
        b -= cost_list[gi][c]
    return choice.to(device)


def allocate_bits(
    group_sizes: Tensor,
    errors: Tensor,
    bit_choices: list[int],
    target_avg: float,
    labels: Tensor,
    importance: Tensor,
) -> BitAllocation:
    """Choose a width per group minimising estimated error at a target average width.

    # min sum_g E[g, b_g]  s.t.  sum_g n_g b_g <= target * sum_g n_g

    1. Multiple-choice knapsack DP (``knapsack_min_error``) on integer bit-columns,
       budget = floor(target * d).
    2. Fill: while a whole group can move one width step up inside the budget without increasing
       the estimated error (or when no single split could otherwise reach the target), move it.
    3. Split: if the average is still below the target by > 0.005 bits, move the m most important
       channels (``importance``, e.g. h_diag * ||W[:, j]||^2) of ONE group one width step up,
       under a new label n_groups. m is chosen so the average lands closest to the target without
       exceeding it by more than 0.01; among (group, step) candidates landing within 0.01 the one
       with the largest estimated error reduction per added bit wins, the moved channels' share of
       the group error being taken proportional to their importance.

    Guarantee: avg <= target + 0.01 always; |avg - target| <= 0.01 whenever one channel's width
    step is <= 0.02 * d bits (e.g. d >= 400 with a 8->16 step) and min(bits) <= target <= max(bits).

    Args:
        group_sizes: [G] int64 (> 0); errors: [G, len(bit_choices)]; labels: [d] int64 in [0, G)
        with bincount == group_sizes; importance: [d] >= 0.
    """
    bits_in = _check_bits(bit_choices)
    if group_sizes.dim() != 1 or group_sizes.is_floating_point():
        raise ValueError(f"group_sizes must be an integer tensor [G], got {group_sizes.dtype} {tuple(group_sizes.shape)}")
    G = group_sizes.shape[0]
    if G == 0:
        raise ValueError("group_sizes must be non-empty")
    if errors.shape != (G, len(bits_in)):
        raise ValueError(f"errors must be [{G}, {len(bits_in)}], got {tuple(errors.shape)}")
    _check_finite("errors", errors)
    if not math.isfinite(target_avg):
        raise ValueError(f"target_avg must be finite, got {target_avg}")
    lo, hi = min(bits_in), max(bits_in)
    if not lo <= target_avg <= hi:
        raise ValueError(f"target_avg {target_avg} outside [min, max] of bit_choices = [{lo}, {hi}]")
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [d], got {labels.dtype} {tuple(labels.shape)}")
    d = labels.shape[0]
    if importance.shape != (d,):
        raise ValueError(f"importance must be [{d}], got {tuple(importance.shape)}")
    _check_finite("importance", importance)
    sizes = [int(x) for x in group_sizes.cpu().tolist()]
    if any(s <= 0 for s in sizes):
        raise ValueError("every group size must be positive")
    if sum(sizes) != d or int(labels.min()) < 0 or int(labels.max()) >= G:
        raise ValueError(f"labels [{d}] inconsistent with group_sizes (sum {sum(sizes)}, {G} groups)")
    if torch.bincount(labels.cpu(), minlength=G).tolist() != sizes:
        raise ValueError("bincount(labels) does not match group_sizes")
    if float(importance.min()) < 0:
        raise ValueError("importance must be non-negative")

    device = labels.device
    order = sorted(range(len(bits_in)), key=lambda c: bits_in[c])
    bits = [bits_in[c] for c in order]  # ascending widths
    err = errors.detach().to(torch.float64).cpu()[:, order]  # err: [G, C] ascending widths
    E = err.tolist()
    C = len(bits)
    budget = int(math.floor(target_avg * d + 1e-9))
    costs = torch.tensor([[s * b for b in bits] for s in sizes], dtype=torch.int64)
    choice = knapsack_min_error(costs, err, budget).cpu().tolist()
    used = sum(sizes[g] * bits[choice[g]] for g in range(G))

    def split_plan(g: int, slack: int) -> tuple[int, float] | None:
        """Channels m to move in group g one step up, and landing |avg - target|."""
        c = choice[g]
        if c + 1 >= C:
            return None
        step = bits[c + 1] - bits[c]
        best = None
        for m in {slack // step, -(-slack // step)}:
            m = min(max(m, 1), sizes[g])
            land = (used + m * step) / d
            if land > target_avg + 0.01 + 1e-12:
                continue
            dev = abs(land - target_avg)
            if best is None or dev < best[1]:
                best = (m, dev)
        return best

    # 2. fill
    while True:
        slack = budget - used
        if slack / d <= 0.005:
            break
        fits = [g for g in range(G) if choice[g] + 1 < C and sizes[g] * (bits[choice[g] + 1] - bits[choice[g]]) <= slack]
        if not fits:
            break

        def gain(g: int) -> float:  # error change per added bit-column (negative = better)
            c = choice[g]
            return (E[g][c + 1] - E[g][c]) / (sizes[g] * (bits[c + 1] - bits[c]))

        g_best = min(fits, key=gain)
        reachable = any((p := split_plan(g, slack)) is not None and p[1] <= 0.01 for g in range(G))
        if gain(g_best) > 0 and reachable:
            break
        used += sizes[g_best] * (bits[choice[g_best] + 1] - bits[choice[g_best]])
        choice[g_best] += 1

    group_bits = [bits[c] for c in choice]
    est_error = sum(E[g][choice[g]] for g in range(G))
    new_labels = labels.clone()
    col_bits = torch.tensor(group_bits, dtype=torch.int64, device=device)[labels]

    # 3. split one boundary group
    slack = budget - used
    if (target_avg * d - used) / d > 0.005 and slack > 0:
        imp = importance.detach().to(torch.float64)
        lab = labels.to(torch.int64)
        best: tuple[bool, float, float, int, int, float, Tensor] | None = None  # (off, -score, dev, g, m, share, idx)
        for g in range(G):
            plan = split_plan(g, slack)
            if plan is None:
                continue
            m, dev = plan
            c = choice[g]
            step = bits[c + 1] - bits[c]
            cols = torch.nonzero(lab == g).flatten()
            imp_g = imp[cols]
            top = torch.argsort(imp_g, descending=True, stable=True)[:m]
            tot = float(imp_g.sum())
            share = float(imp_g[top].sum()) / tot if tot > 0 else m / sizes[g]
            reduction = share * (E[g][c] - E[g][c + 1])
            score = reduction / (m * step)
            key = (dev > 0.01, -score, dev)
            if best is None or key < best[:3]:
                best = (dev > 0.01, -score, dev, g, m, share, cols[top])
        if best is not None:
            _, _, _, g, m, share, moved = best
            c = choice[g]
            est_error += share * (E[g][c + 1] - E[g][c])
            new_labels[moved] = G
            col_bits[moved] = bits[c + 1]
            group_bits.append(bits[c + 1])
            if m == sizes[g]:  # whole group moved: keep its label, drop the empty new one
                new_labels[moved] = g
                group_bits.pop()
                group_bits[g] = bits[c + 1]

    avg = float(col_bits.to(torch.float64).mean())
    return BitAllocation(col_bits=col_bits, labels=new_labels, group_bits=group_bits, avg_bits=avg, est_error=float(est_error))
