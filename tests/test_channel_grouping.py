"""Tests for channel_grouping: spectral clustering, baselines, group errors, bit allocation."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from channel_grouping import (  # noqa: E402
    allocate_bits,
    contiguous_groups,
    group_errors,
    knapsack_min_error,
    random_groups,
    spectral_cluster,
    top_eigenvectors,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _planted(sizes: list[int], seed: int, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinity with high in-block values (~1) plus uniform noise everywhere; channels shuffled."""
    g = _gen(seed)
    truth = torch.cat([torch.full((s,), i, dtype=torch.int64) for i, s in enumerate(sizes)])
    truth = truth[torch.randperm(truth.numel(), generator=g)]
    d = truth.numel()
    A = (truth[:, None] == truth[None, :]).float() * (0.8 + 0.4 * torch.rand(d, d, generator=g))
    A = A + noise * torch.rand(d, d, generator=g)
    A = 0.5 * (A + A.T)
    A.fill_diagonal_(0.0)
    return A, truth


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Labels equal up to a permutation of ids (contingency table is a permutation matrix)."""
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    if ka != kb:
        return False
    table = torch.zeros(ka, kb, dtype=torch.int64)
    table.index_put_((a, b), torch.ones_like(a), accumulate=True)
    return bool(((table > 0).sum(0) == 1).all() and ((table > 0).sum(1) == 1).all())


def _assert_valid(labels: torch.Tensor, d: int, k: int) -> None:
    assert labels.dtype == torch.int64 and labels.shape == (d,)
    counts = torch.bincount(labels, minlength=k)
    assert counts.numel() == k and bool((counts > 0).all()), counts


# ------------------------------------------------------------------ spectral clustering


def test_spectral_recovers_planted_blocks_eigh_path() -> None:
    A, truth = _planted([50, 120, 80], seed=0)
    grp = spectral_cluster(A, 3, seed=0)
    _assert_valid(grp.labels, 250, 3)
    assert _same_partition(grp.labels, truth)
    assert grp.silhouette > 0.9  # blocks collapse to 3 nearly-orthogonal points in the embedding


def test_spectral_random_affinity_has_lower_silhouette() -> None:
    A_planted, _ = _planted([100, 100, 100], seed=1)
    R = torch.rand(300, 300, generator=_gen(2))
    R = 0.5 * (R + R.T)
    s_planted = spectral_cluster(A_planted, 3).silhouette
    s_random = spectral_cluster(R, 3).silhouette
    assert s_planted > 0.9
    assert s_random < s_planted - 0.3


def test_spectral_recovers_planted_blocks_subspace_path_forced() -> None:
    A, truth = _planted([40, 70, 90, 100], seed=3)
    grp = spectral_cluster(A, 4, seed=1, eigh_max_dim=64)  # d = 300 > 64 -> subspace iteration
    assert _same_partition(grp.labels, truth)
    assert grp.silhouette > 0.9


def test_spectral_subspace_path_above_default_threshold() -> None:
    A, truth = _planted([700, 600, 800], seed=4)  # d = 2100 > the default eigh_max_dim on the CPU
    grp = spectral_cluster(A, 3, seed=0)
    assert _same_partition(grp.labels, truth)
    assert grp.silhouette > 0.9


def test_top_eigenvectors_subspace_matches_eigh() -> None:
    # symmetric matrix with known spectrum: 5 eigenvalues in [0.8, 1], the rest in [-0.9, 0.3]
    d, k = 400, 5
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(5), dtype=torch.float64))
    lam = torch.cat([torch.linspace(1.0, 0.8, k, dtype=torch.float64), torch.linspace(0.3, -0.9, d - k, dtype=torch.float64)])
    M = ((Q * lam) @ Q.T).float()
    V = top_eigenvectors(M, k, eigh_max_dim=10)
    assert V.shape == (d, k)
    torch.testing.assert_close(V.T @ V, torch.eye(k), atol=1e-4, rtol=0)
    ritz = torch.linalg.eigvalsh(V.T @ M @ V).flip(0)
    torch.testing.assert_close(ritz.double(), lam[:k], atol=1e-4, rtol=0)
    # spans the same subspace as the true top-k eigenvectors
    P_true = Q[:, :k].float()
    assert float(torch.linalg.svdvals(P_true.T @ V).min()) > 0.999


def test_spectral_degenerate_inputs_still_give_k_nonempty_groups() -> None:
    # all-zero affinity
    grp = spectral_cluster(torch.zeros(20, 20), 5)
    _assert_valid(grp.labels, 20, 5)
    # all-identical affinity (every channel indistinguishable)
    grp = spectral_cluster(torch.ones(12, 12), 4)
    _assert_valid(grp.labels, 12, 4)
    # two distinct blocks but 6 groups requested
    A, _ = _planted([30, 30], seed=6, noise=0.0)
    grp = spectral_cluster(A, 6)
    _assert_valid(grp.labels, 60, 6)
    # k == d
    grp = spectral_cluster(torch.zeros(5, 5), 5)
    assert sorted(grp.labels.tolist()) == [0, 1, 2, 3, 4]
    # isolated (zero-degree) channels alongside blocks
    A, _ = _planted([40, 40], seed=7)
    A[:5] = 0
    A[:, :5] = 0
    grp = spectral_cluster(A, 3)
    _assert_valid(grp.labels, 80, 3)
    assert math.isfinite(grp.silhouette)
    # one group: silhouette undefined
    grp = spectral_cluster(A, 1)
    assert bool((grp.labels == 0).all()) and math.isnan(grp.silhouette)


def test_spectral_is_deterministic_and_validates() -> None:
    A, _ = _planted([30, 40, 50], seed=8, noise=1.0)
    a = spectral_cluster(A, 3, seed=3)
    b = spectral_cluster(A, 3, seed=3)
    assert torch.equal(a.labels, b.labels) and a.silhouette == b.silhouette
    with pytest.raises(ValueError, match=r"n_groups \(11\) exceeds the number of channels \(10\)"):
        spectral_cluster(torch.rand(10, 10), 11)
    with pytest.raises(ValueError):
        spectral_cluster(torch.rand(10, 9), 2)
    bad = torch.zeros(4, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        spectral_cluster(bad, 2)


# ------------------------------------------------------------------ baselines


def test_random_and_contiguous_groups() -> None:
    r = random_groups(103, 10, seed=0)
    counts = torch.bincount(r.labels, minlength=10)
    assert int(counts.min()) == 10 and int(counts.max()) == 11 and math.isnan(r.silhouette)
    assert not torch.equal(r.labels, random_groups(103, 10, seed=1).labels)
    assert torch.equal(r.labels, random_groups(103, 10, seed=0).labels)
    c = contiguous_groups(10, 3)
    assert c.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError):
        contiguous_groups(3, 4)
    with pytest.raises(ValueError):
        random_groups(3, 4, seed=0)


# ------------------------------------------------------------------ group_errors


def _ref_group_errors(W, h, labels, k, bits, mask=None):  # float64, explicit loop over groups
    W = W.double()
    h = h.double()
    m = torch.ones_like(W) if mask is None else mask.double()  # grid from dense W, sum over kept only
    out = torch.zeros(k, len(bits), dtype=torch.float64)
    for g in range(k):
        cols = torch.nonzero(labels == g).flatten()
        Wg, mg = W[:, cols], m[:, cols]
        xmin = torch.clamp(Wg.min(1).values, max=0.0)[:, None]
        xmax = torch.clamp(Wg.max(1).values, min=0.0)[:, None]
        for c, b in enumerate(bits):
            if b == 16:
                continue
            maxq = 2**b - 1
            scale = (xmax - xmin) / maxq
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.round(-xmin / scale)
            q = scale * (torch.clamp(torch.round(Wg / scale) + zero, 0, maxq) - zero)
            out[g, c] = float((h[cols][None, :] * mg * (Wg - q) ** 2).sum())
    return out


BITS = [2, 3, 4, 8, 16]


def test_group_errors_matches_reference_and_decreases() -> None:
    g = _gen(10)
    W = torch.randn(48, 200, generator=g) * torch.rand(200, generator=g) * 3  # per-column scale
    h = torch.rand(200, generator=g)
    labels = torch.randint(0, 6, (200,), generator=g)
    W[:, labels == 4] = W[:, labels == 4].abs() + 0.5  # all-positive group: grid must still include 0
    W[:, labels == 5] = -W[:, labels == 5].abs() - 0.5  # all-negative group
    E = group_errors(W, h, labels, 6, BITS)
    assert E.shape == (6, len(BITS))
    torch.testing.assert_close(E, _ref_group_errors(W, h, labels, 6, BITS), rtol=1e-5, atol=1e-9)
    assert bool((E[:, :-1] > 0).all()) and bool((E[:, -1] == 0).all())
    assert bool((E[:, 1:] < E[:, :-1]).all())  # strictly decreasing in width


def test_group_errors_keep_mask_excludes_pruned() -> None:
    g = _gen(11)
    W = torch.randn(32, 120, generator=g)
    h = torch.rand(120, generator=g) + 0.1
    labels = torch.arange(120) % 4
    mask = torch.rand(32, 120, generator=g) > 0.5
    E = group_errors(W, h, labels, 4, BITS, keep_mask=mask)
    torch.testing.assert_close(E, _ref_group_errors(W, h, labels, 4, BITS, mask), rtol=1e-5, atol=1e-9)
    # an all-True mask is the same as no mask
    torch.testing.assert_close(group_errors(W, h, labels, 4, BITS, keep_mask=torch.ones_like(mask)), group_errors(W, h, labels, 4, BITS), rtol=0, atol=0)
    # changing only pruned weights' h has no effect (they do not enter the sum)
    h2 = h.clone()
    h2[0] = 1e6
    mask2 = mask.clone()
    mask2[:, 0] = False
    torch.testing.assert_close(group_errors(W, h2, labels, 4, BITS, keep_mask=mask2), group_errors(W, h, labels, 4, BITS, keep_mask=mask2), rtol=0, atol=0)
    # and masking reduces the error versus the dense layer
    E_dense = group_errors(W, h, labels, 4, BITS)
    assert bool((E[:, :-1] < E_dense[:, :-1]).all())
    # fully pruned group -> zero error
    mask[:, labels == 2] = False
    assert bool((group_errors(W, h, labels, 4, BITS, keep_mask=mask)[2] == 0).all())


def test_group_errors_validates() -> None:
    W, h, lab = torch.randn(4, 6), torch.rand(6), torch.zeros(6, dtype=torch.int64)
    with pytest.raises(ValueError):
        group_errors(W, h, lab, 1, [2, 9])
    with pytest.raises(ValueError):
        group_errors(W, h[:5], lab, 1, BITS)
    with pytest.raises(ValueError):
        group_errors(W, h, lab + 1, 1, BITS)
    with pytest.raises(ValueError):
        group_errors(W, h, lab, 1, BITS, keep_mask=torch.ones(4, 6))
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError):
        group_errors(Wn, h, lab, 1, BITS)


# ------------------------------------------------------------------ allocation


def _synthetic(sizes: list[int], bits: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group sizes, error curves ~ size * s_g * 4^-b (strictly decreasing, 0 at 16), labels, importance."""
    g = _gen(seed)
    G = len(sizes)
    sz = torch.tensor(sizes, dtype=torch.int64)
    b = torch.tensor(bits, dtype=torch.float64)
    scale = torch.exp(3 * torch.rand(G, 1, generator=g, dtype=torch.float64))
    jitter = 1 + 0.3 * torch.rand(G, len(bits), generator=g, dtype=torch.float64)
    err = sz[:, None] * scale * jitter * 4.0 ** (-b)
    err[:, b == 16] = 0.0
    labels = torch.repeat_interleave(torch.arange(G), sz)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    importance = torch.rand(labels.numel(), generator=g, dtype=torch.float64)
    return sz, err, labels, importance


def _check_consistent(alloc, labels: torch.Tensor, G: int) -> None:
    nl = len(alloc.group_bits)
    assert nl in (G, G + 1)
    assert int(alloc.labels.min()) >= 0 and int(alloc.labels.max()) < nl
    assert bool((torch.bincount(alloc.labels, minlength=nl) > 0).all())
    assert torch.equal(alloc.col_bits, torch.tensor(alloc.group_bits)[alloc.labels])
    # channels that were not moved keep their label
    kept = alloc.labels < G
    assert torch.equal(alloc.labels[kept], labels[kept])
    assert alloc.avg_bits == pytest.approx(float(alloc.col_bits.double().mean()), abs=1e-12)


SIZE_CASES = [
    [1, 1, 997],
    [72] * 8,
    [5, 300, 17, 64, 128, 900, 33, 2],
    [4096],
    [1000, 24],
]


@pytest.mark.parametrize("bits", [[2, 3, 4, 8], [2, 3, 4, 5, 6, 8, 16], [2, 4, 8, 16]])
@pytest.mark.parametrize("target", [3.0, 3.5, 4.0, 5.0])
def test_allocate_hits_target(bits: list[int], target: float) -> None:
    cases = SIZE_CASES + [torch.randint(1, 400, (int(n),), generator=_gen(20 + i)).tolist() for i, n in enumerate([3, 6, 12, 24])]
    for seed, sizes in enumerate(cases):
        sz, err, labels, imp = _synthetic(sizes, bits, seed)
        alloc = allocate_bits(sz, err, bits, target, labels, imp)
        assert abs(alloc.avg_bits - target) <= 0.01, (sizes, alloc.avg_bits, alloc.group_bits)
        _check_consistent(alloc, labels, len(sizes))
        assert alloc.est_error >= 0


def test_allocate_never_overshoots_small_layer() -> None:
    # d = 16 with a 8-bit step: the target may be unreachable, but the average must not exceed it by > 0.01
    bits = [2, 4, 8, 16]
    sz, err, labels, imp = _synthetic([3, 5, 8], bits, 0)
    for target in [2.0, 2.3, 3.1, 4.45, 7.9, 12.0, 16.0]:
        alloc = allocate_bits(sz, err, bits, target, labels, imp)
        assert alloc.avg_bits <= target + 0.01
        _check_consistent(alloc, labels, 3)


@pytest.mark.parametrize("seed", range(6))
def test_dp_is_optimal_against_brute_force(seed: int) -> None:
    bits = [2, 3, 4, 6, 8]
    sizes = torch.randint(1, 120, (4,), generator=_gen(100 + seed)).tolist()
    sz, err, labels, imp = _synthetic(sizes, bits, seed)
    d = sum(sizes)
    for target in [2.4, 3.0, 3.7, 5.2]:
        budget = math.floor(target * d + 1e-9)
        best = math.inf
        for combo in itertools.product(range(len(bits)), repeat=4):
            if sum(sizes[g] * bits[c] for g, c in enumerate(combo)) <= budget:
                best = min(best, sum(float(err[g, c]) for g, c in enumerate(combo)))
        costs = sz[:, None] * torch.tensor(bits)[None, :]
        choice = knapsack_min_error(costs, err, budget)
        assert int((costs[torch.arange(4), choice]).sum()) <= budget
        assert float(err[torch.arange(4), choice].sum()) == pytest.approx(best, rel=1e-12)
        # allocate_bits keeps the DP widths on the original labels (the split only adds a label)
        alloc = allocate_bits(sz, err, bits, target, labels, imp)
        dp_err = sum(float(err[g, bits.index(alloc.group_bits[g])]) for g in range(4))
        assert dp_err == pytest.approx(best, rel=1e-12)
        # the split can only lower the estimated error
        assert alloc.est_error <= best + 1e-12


def test_allocate_split_moves_most_important_channels() -> None:
    bits = [2, 3, 4, 8]
    sz, err, labels, imp = _synthetic([1, 1, 997], bits, 3)
    alloc = allocate_bits(sz, err, bits, 3.5, labels, imp)
    assert len(alloc.group_bits) == 4  # the big group had to be split
    moved = alloc.labels == 3
    src = int(labels[moved][0])
    assert bool((labels[moved] == src).all())
    rest = (labels == src) & ~moved
    assert float(imp[moved].min()) >= float(imp[rest].max())
    assert alloc.group_bits[3] > alloc.group_bits[src]


def test_allocate_edge_targets_and_validation() -> None:
    bits = [2, 3, 4, 8, 16]
    sz, err, labels, imp = _synthetic([10, 20, 30, 40], bits, 1)
    lo = allocate_bits(sz, err, bits, 2.0, labels, imp)
    assert lo.group_bits == [2, 2, 2, 2] and lo.avg_bits == 2.0
    assert bool((lo.col_bits == 2).all())
    hi = allocate_bits(sz, err, bits, 16.0, labels, imp)
    assert hi.group_bits == [16, 16, 16, 16] and hi.est_error == 0.0
    with pytest.raises(ValueError, match="outside"):
        allocate_bits(sz, err, bits, 1.9, labels, imp)
    with pytest.raises(ValueError, match="outside"):
        allocate_bits(sz, err, bits, 16.5, labels, imp)
    with pytest.raises(ValueError):
        allocate_bits(sz, err[:, :0], [], 3.0, labels, imp)
    with pytest.raises(ValueError):
        allocate_bits(sz, err, [2, 3, 4, 8, 12], 3.0, labels, imp)
    with pytest.raises(ValueError):
        allocate_bits(sz, err[:, :4], [1, 3, 4, 8], 3.0, labels, imp)
    with pytest.raises(ValueError):
        allocate_bits(sz, err[:, :3], [2, 2, 4], 3.0, labels, imp)
    with pytest.raises(ValueError):
        allocate_bits(sz, err[:, :4], bits, 3.0, labels, imp)  # errors shape mismatch
    with pytest.raises(ValueError):
        allocate_bits(sz + 1, err, bits, 3.0, labels, imp)  # sizes inconsistent with labels
