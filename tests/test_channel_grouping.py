"""Tests for channel_grouping: spectral clustering, baselines, column errors, bit allocation."""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quant  # noqa: E402
from channel_grouping import (  # noqa: E402
    _fill_empty,
    allocate_bits,
    allocate_bits_many,
    column_errors,
    contiguous_groups,
    kmeans,
    random_groups,
    silhouette_score,
    spectral_cluster,
    subspace_eigenvectors,
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


def _with_spectrum(lam: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric float32 M = Q diag(lam) Q^T with a random orthogonal Q (float64 Q returned)."""
    d = lam.numel()
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return ((Q * lam) @ Q.T).float(), Q


def _realistic_spectrum(d: int, k: int) -> torch.Tensor:
    """Like a normalised MI affinity: top k in [0.32, 1], the rest in [-0.3, 0.27] (gap 0.32 -> 0.27)."""
    rest = torch.linspace(0.27, -0.3, d - k, dtype=torch.float64)
    return torch.cat([torch.linspace(1.0, 0.32, k, dtype=torch.float64), rest])


def _min_cos(A: torch.Tensor, B: torch.Tensor) -> float:
    """Smallest principal cosine between the column spans of A and B (orthonormal columns)."""
    return float(torch.linalg.svdvals(A.double().T @ B.double()).min())


def test_subspace_iteration_converges_on_a_realistic_spectrum() -> None:
    d, k = 800, 8
    lam = _realistic_spectrum(d, k)
    M, Q = _with_spectrum(lam, seed=5)
    V = subspace_eigenvectors(M, k)  # default iteration cap: must converge, not give up
    assert V is not None and V.shape == (d, k)
    torch.testing.assert_close(V.T @ V, torch.eye(k), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.linalg.eigvalsh(V.T @ M @ V).flip(0).double(), lam[:k], atol=1e-4, rtol=0)
    V_eigh = torch.linalg.eigh(M.double())[1][:, -k:]
    assert _min_cos(V, V_eigh) > 0.999
    assert _min_cos(V, Q[:, :k]) > 0.999
    # top_eigenvectors takes the same path above eigh_max_dim
    assert _min_cos(top_eigenvectors(M, k, eigh_max_dim=100), V_eigh) > 0.999


def test_subspace_iteration_is_seed_independent() -> None:
    d, k = 640, 8
    M, _ = _with_spectrum(_realistic_spectrum(d, k), seed=6)
    V0 = top_eigenvectors(M, k, seed=0, eigh_max_dim=100)
    V1 = top_eigenvectors(M, k, seed=1, eigh_max_dim=100)
    assert _min_cos(V0, V1) > 0.999


def test_top_eigenvectors_falls_back_to_eigh_when_not_converged() -> None:
    d, k = 600, 8
    lam = _realistic_spectrum(d, k)
    M, Q = _with_spectrum(lam, seed=7)
    assert subspace_eigenvectors(M, k, n_iter=4) is None  # too few steps for a 0.32 -> 0.27 gap
    assert _min_cos(top_eigenvectors(M, k, eigh_max_dim=100, n_iter=4), Q[:, :k]) > 0.9999


def test_negative_eigenvalues_larger_than_the_wanted_ones() -> None:
    d, k = 600, 8
    lam = torch.cat([torch.linspace(1.0, 0.5, k, dtype=torch.float64), torch.full((20,), -0.9, dtype=torch.float64),
                     torch.linspace(0.2, -0.2, d - k - 20, dtype=torch.float64)])
    M, Q = _with_spectrum(lam, seed=8)
    # the shift centres the unwanted eigenvalues, so the wanted ones win the block quickly
    V = subspace_eigenvectors(M, k, n_iter=40)
    assert V is not None and _min_cos(V, Q[:, :k]) > 0.9999
    # without room in the block (no oversampling, no shift) the negative eigenvectors take it:
    # small residuals, wrong vectors. The iteration must say so, and top_eigenvectors still be right.
    assert subspace_eigenvectors(M, k, oversample=0) is None
    assert _min_cos(top_eigenvectors(M, k, eigh_max_dim=100, oversample=0), Q[:, :k]) > 0.9999


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


def test_kmeans_fills_empty_clusters_without_warnings_and_is_deterministic() -> None:
    X = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]]).repeat(4, 1)  # 12 points, 3 distinct
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's duplicate-points ConvergenceWarning is handled
        labels = kmeans(X, 5, seed=0)
    _assert_valid(labels, 12, 5)
    assert labels[0] == 0  # ids in order of first appearance
    assert torch.equal(labels, kmeans(X, 5, seed=0))
    # well separated blobs are recovered
    g = _gen(9)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    truth = torch.arange(90) % 3
    Y = centres[truth] + 0.1 * torch.randn(90, 2, generator=g)
    assert _same_partition(kmeans(Y, 3, seed=1), truth)


def _blobs(sizes: list[int], f: int, seed: int, spread: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs of the given sizes around well separated random centres; points shuffled."""
    g = _gen(seed)
    centres = 4.0 * torch.randn(len(sizes), f, generator=g, dtype=torch.float64)
    while torch.pdist(centres).min() < 2.0:  # keep the blobs apart (resample the whole set)
        centres = 4.0 * torch.randn(len(sizes), f, generator=g, dtype=torch.float64)
    truth = torch.cat([torch.full((m,), i, dtype=torch.int64) for i, m in enumerate(sizes)])
    truth = truth[torch.randperm(truth.numel(), generator=g)]
    return centres[truth] + spread * torch.randn(truth.numel(), f, generator=g, dtype=torch.float64), truth


def _inertia(X: torch.Tensor, labels: torch.Tensor) -> float:
    """sum_i |x_i - mean of its cluster|^2 in float64."""
    X = X.double()
    k = int(labels.max()) + 1
    means = torch.zeros(k, X.shape[1], dtype=torch.float64).index_add_(0, labels, X)
    means /= torch.bincount(labels, minlength=k).clamp_min(1).unsqueeze(1).double()
    return float((X - means[labels]).square().sum())


@pytest.mark.parametrize("k", range(2, 10))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_separated_blobs_like_sklearn(k: int, seed: int) -> None:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    sizes = [int(v) for v in torch.randint(5, 200, (k,), generator=_gen(100 * k + seed))]  # unequal sizes
    X, truth = _blobs(sizes, f=k, seed=100 * k + seed)
    labels = kmeans(X, k, seed=seed)
    sk = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(X.numpy()).labels_
    _assert_valid(labels, X.shape[0], k)
    assert adjusted_rand_score(sk, labels.numpy()) == 1.0
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == 1.0
    assert torch.equal(labels, kmeans(X.float(), k, seed=seed))  # float32 input: same labels (float64 inside)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_inertia_on_structureless_data_is_close_to_sklearn(seed: int) -> None:
    from sklearn.cluster import KMeans

    X = torch.randn(2000, 8, generator=_gen(seed), dtype=torch.float64)
    X /= X.norm(dim=1, keepdim=True)  # points on the sphere: no cluster structure
    labels = kmeans(X, 8, seed=seed, n_init=4)
    _assert_valid(labels, 2000, 8)
    sk = KMeans(n_clusters=8, n_init=4, random_state=seed).fit(X.numpy())
    assert _inertia(X, labels) <= 1.02 * float(sk.inertia_)


def test_kmeans_is_deterministic_and_fills_clusters_of_duplicates() -> None:
    X = torch.randn(500, 4, generator=_gen(11))
    a = kmeans(X, 6, seed=5)
    assert torch.equal(a, kmeans(X, 6, seed=5))
    assert not torch.equal(a, kmeans(X, 6, seed=6)) or not torch.equal(a, kmeans(X, 6, seed=7))
    # fewer distinct points than clusters: 2 distinct points, 8 clusters; all points equal
    two = torch.tensor([[1.0, 2.0], [-3.0, 0.5]]).repeat_interleave(10, 0)
    for seed in range(3):
        _assert_valid(kmeans(two, 8, seed=seed), 20, 8)
        _assert_valid(kmeans(torch.ones(9, 3), 9, seed=seed), 9, 9)
    # n == k: every point its own cluster
    assert sorted(kmeans(torch.randn(7, 2, generator=_gen(12)), 7).tolist()) == list(range(7))


def test_lloyd_relocates_an_empty_cluster_and_freezing_makes_checks_irrelevant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import channel_grouping as cg

    X, _ = _blobs([30, 40], f=2, seed=13, spread=0.3)
    X = X - X.mean(0)
    far = torch.stack([X[0], X[1], torch.tensor([1e3, 1e3], dtype=torch.float64)])  # no point nearest to c_2
    C0 = torch.stack([far, X[:3]])  # C0: [2 restarts, 3, 2]
    labels, _ = cg._lloyd(X, C0, max_iter=30, tol=-1.0)  # never converged: relocation at the checks
    assert int((torch.bincount(labels[0], minlength=3) > 0).sum()) == 3
    # without empty clusters the result is the same whatever the check interval
    Y = torch.randn(300, 3, generator=_gen(14), dtype=torch.float64)
    C1 = cg._kmeans_plusplus(Y, 5, 3, _gen(0))
    tol = 1e-4 * float(Y.var(0, unbiased=False).mean())
    ref = cg._lloyd(Y, C1, 300, tol)
    for every in (1, 3, 7):
        monkeypatch.setattr(cg, "KMEANS_CHECK_EVERY", every)
        out = cg._lloyd(Y, C1, 300, tol)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_fill_empty_moves_the_farthest_point_of_a_shared_cluster() -> None:
    X = torch.tensor([[0.0], [0.1], [3.0], [10.0], [10.0]], dtype=torch.float64)
    centers = torch.tensor([[1.0], [10.0], [0.0], [0.0]], dtype=torch.float64)
    labels = _fill_empty(X, torch.tensor([0, 0, 0, 1, 1]), centers, 4)  # clusters 2 and 3 empty
    assert torch.bincount(labels, minlength=4).tolist() == [1, 2, 1, 1]
    assert labels[2] == 2  # x = 3 is the farthest from its centre (distance 2)
    assert labels[0] == 3  # then x = 0 (distance 1); cluster 1's points sit on their centre
    assert labels.tolist() == [3, 0, 2, 1, 1]


def test_silhouette_matches_sklearn_and_is_nan_where_undefined() -> None:
    from sklearn.metrics import silhouette_score as sk_silhouette

    g = _gen(10)
    X = torch.randn(60, 3, generator=g)
    labels = torch.arange(60) % 3
    assert silhouette_score(X, labels) == pytest.approx(float(sk_silhouette(X.double().numpy(), labels.numpy())), abs=1e-12)
    # subsample: deterministic for a seed, and a real subsample
    assert silhouette_score(X, labels, max_samples=20, seed=3) == silhouette_score(X, labels, max_samples=20, seed=3)
    assert silhouette_score(X, labels, max_samples=20, seed=3) != silhouette_score(X, labels)
    assert math.isnan(silhouette_score(X, torch.zeros(60, dtype=torch.int64)))  # one cluster
    assert math.isnan(silhouette_score(X[:4], torch.arange(4)))  # as many clusters as points
    assert math.isnan(silhouette_score(X, labels, max_samples=1))  # a one-point sample
    assert math.isnan(silhouette_score(X[:3], torch.tensor([0, 1, 2])))  # as many clusters as points


@pytest.mark.parametrize("seed", range(4))
def test_silhouette_matches_sklearn_on_random_labels_and_subsamples(seed: int) -> None:
    from sklearn.metrics import silhouette_score as sk_silhouette

    g = _gen(20 + seed)
    n, k = 300, 2 + seed * 2
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=g)
    labels[:3] = k  # a small cluster, and ids that need not be contiguous in a subsample
    labels[3] = k + 1  # a singleton (s = 0)
    ref = float(sk_silhouette(X.numpy(), labels.numpy()))
    assert silhouette_score(X, labels, max_samples=n) == pytest.approx(ref, abs=1e-9)
    ref = float(sk_silhouette(X.numpy(), labels.numpy(), sample_size=100, random_state=seed))
    assert silhouette_score(X, labels, max_samples=100, seed=seed) == pytest.approx(ref, abs=1e-9)
    # duplicate points: a = b = 0 gives s = 0, as sklearn
    D = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    lab = torch.tensor([0, 0, 1, 1, 1])
    assert silhouette_score(D, lab) == pytest.approx(float(sk_silhouette(D.numpy(), lab.numpy())), abs=1e-12)


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


# ------------------------------------------------------------------ column_errors


def _ref_column_errors(W, h, labels, k, bits, mask=None, sym=False):  # loop over groups, one grid per group's columns
    m = torch.ones_like(W) if mask is None else mask.float()  # grid from dense W, sum over kept only
    out = torch.zeros(W.shape[1], len(bits), dtype=torch.float64)
    for g in range(k):
        cols = torch.nonzero(labels == g).flatten()
        Wg = W[:, cols]
        for c, b in enumerate(bits):
            q = quant.quantize_weight(Wg, quant.group_grid(Wg, torch.zeros(cols.numel(), dtype=torch.int64), [b], sym))
            out[cols, c] = (h[cols].double() * (m[:, cols] * (Wg - q) ** 2).double()).sum(0)
    return out


BITS = [2, 3, 4, 8, 16]


def test_column_errors_match_reference_and_decrease() -> None:
    g = _gen(10)
    W = torch.randn(48, 200, generator=g) * torch.rand(200, generator=g) * 3  # per-column scale
    h = torch.rand(200, generator=g)
    labels = torch.randint(0, 6, (200,), generator=g)
    W[:, labels == 4] = W[:, labels == 4].abs() + 0.5  # all-positive group: grid must still include 0
    W[:, labels == 5] = -W[:, labels == 5].abs() - 0.5  # all-negative group
    E = column_errors(W, h, labels, 6, BITS)
    assert E.shape == (200, len(BITS)) and E.dtype == torch.float64
    torch.testing.assert_close(E, _ref_column_errors(W, h, labels, 6, BITS), rtol=1e-5, atol=1e-9)
    assert bool((E[:, -1] == 0).all()) and bool((E[:, :-1] > 0).any(0).all())
    group = torch.zeros(6, len(BITS), dtype=torch.float64).index_add_(0, labels, E)  # a group's error = sum of its columns'
    assert bool((group[:, 1:] < group[:, :-1]).all())  # strictly decreasing in width


def test_column_errors_of_stacked_rows_are_each_sublayers_own() -> None:
    """row_splits: one pass over stacked sub-layers (shared labels and h), bitwise each one's own call."""
    g = _gen(12)
    W = torch.randn(50, 40, generator=g)
    h = torch.rand(40, generator=g)
    labels = torch.randint(0, 5, (40,), generator=g)
    keep = torch.rand(50, 40, generator=g) > 0.5
    for mask in (None, keep):
        E = column_errors(W, h, labels, 5, BITS, mask, row_splits=[20, 10, 20])
        assert E.shape == (3, 40, len(BITS))
        for s, (r0, r1) in enumerate([(0, 20), (20, 30), (30, 50)]):
            alone = column_errors(W[r0:r1], h, labels, 5, BITS, None if mask is None else mask[r0:r1])
            assert torch.equal(E[s], alone)
    for bad in ([20, 10], [50, 0], [-1, 51]):
        with pytest.raises(ValueError, match="row_splits"):
            column_errors(W, h, labels, 5, BITS, row_splits=bad)


def test_allocate_bits_many_is_each_tables_own_allocation() -> None:
    g = _gen(13)
    d = 700
    labels = torch.randint(0, 8, (d,), generator=g)
    tables = torch.rand(3, d, 5, generator=g, dtype=torch.float64).sort(dim=2, descending=True).values
    for device in (None, "cpu") + (("cuda",) if torch.cuda.is_available() else ()):
        many = allocate_bits_many(tables, labels, [2, 3, 4, 6, 8], 3.7, device=device)
        for t, res in zip(tables, many):
            alone = allocate_bits(t, labels, [2, 3, 4, 6, 8], 3.7)
            assert torch.equal(res.col_bits, alone.col_bits) and torch.equal(res.labels, alone.labels)
            assert res.group_bits == alone.group_bits and res.est_error == alone.est_error
    with pytest.raises(ValueError, match="col_errors must be"):
        allocate_bits_many([tables[0], tables[1, :10]], labels, [2, 3, 4, 6, 8], 3.7)


def test_column_errors_symmetric_grids() -> None:
    g = _gen(12)
    W = torch.randn(16, 60, generator=g)
    h = torch.rand(60, generator=g)
    labels = torch.arange(60) % 3
    E = column_errors(W, h, labels, 3, [3, 4], sym=True)
    torch.testing.assert_close(E, _ref_column_errors(W, h, labels, 3, [3, 4], sym=True), rtol=1e-5, atol=1e-9)
    assert not torch.equal(E, column_errors(W, h, labels, 3, [3, 4]))


def test_column_errors_keep_mask_excludes_pruned() -> None:
    g = _gen(11)
    W = torch.randn(32, 120, generator=g)
    h = torch.rand(120, generator=g) + 0.1
    labels = torch.arange(120) % 4
    mask = torch.rand(32, 120, generator=g) > 0.5
    E = column_errors(W, h, labels, 4, BITS, keep_mask=mask)
    torch.testing.assert_close(E, _ref_column_errors(W, h, labels, 4, BITS, mask), rtol=1e-5, atol=1e-9)
    # an all-True mask is the same as no mask
    torch.testing.assert_close(column_errors(W, h, labels, 4, BITS, keep_mask=torch.ones_like(mask)), column_errors(W, h, labels, 4, BITS), rtol=0, atol=0)
    # masking reduces the error versus the dense layer, and a fully pruned column has none
    assert bool((E[:, :-1] <= column_errors(W, h, labels, 4, BITS)[:, :-1]).all())
    mask[:, 7] = False
    assert bool((column_errors(W, h, labels, 4, BITS, keep_mask=mask)[7] == 0).all())


def test_column_errors_validates() -> None:
    W, h, lab = torch.randn(4, 6), torch.rand(6), torch.zeros(6, dtype=torch.int64)
    with pytest.raises(ValueError):
        column_errors(W, h, lab, 1, [2, 9])
    with pytest.raises(ValueError):
        column_errors(W, h[:5], lab, 1, BITS)
    with pytest.raises(ValueError):
        column_errors(W, h, lab + 1, 1, BITS)
    with pytest.raises(ValueError):
        column_errors(W, h, lab, 1, BITS, keep_mask=torch.ones(4, 6))
    with pytest.raises(ValueError):
        column_errors(W, -h, lab, 1, BITS)
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError):
        column_errors(Wn, h, lab, 1, BITS)


# ------------------------------------------------------------------ allocation


def _shuffled_labels(sizes: list[int], g: torch.Generator) -> torch.Tensor:
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return labels[torch.randperm(labels.numel(), generator=g)]


def _synthetic(sizes: list[int], bits: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column errors ~ s_j * 4^-b (0 at 16) with log-normal s_j and a per-group scale; shuffled labels."""
    g = _gen(seed)
    labels = _shuffled_labels(sizes, g)
    b = torch.tensor(bits, dtype=torch.float64)
    group_scale = torch.exp(3 * torch.rand(len(sizes), generator=g, dtype=torch.float64))
    s = group_scale[labels] * torch.exp(torch.randn(labels.numel(), generator=g, dtype=torch.float64))
    col = s[:, None] * (1 + 0.3 * torch.rand(labels.numel(), len(bits), generator=g, dtype=torch.float64)) * 4.0 ** (-b)
    col[:, b == 16] = 0.0
    return col, labels


def _check_consistent(alloc, labels: torch.Tensor, col: torch.Tensor, bits: list[int]) -> None:
    G = int(labels.max()) + 1
    nl = len(alloc.group_bits)
    assert nl in (G, G + 1)
    assert int(alloc.labels.min()) >= 0 and int(alloc.labels.max()) < nl
    assert bool((torch.bincount(alloc.labels, minlength=nl) > 0).all())
    assert torch.equal(alloc.col_bits, torch.tensor(alloc.group_bits)[alloc.labels])
    kept = alloc.labels < G  # channels that were not moved keep their label
    assert torch.equal(alloc.labels[kept], labels[kept])
    if nl == G + 1:  # the split part comes from one group
        assert torch.unique(labels[~kept]).numel() == 1
    chosen = torch.tensor([bits.index(int(b)) for b in alloc.col_bits])
    assert alloc.est_error == pytest.approx(float(col[torch.arange(col.shape[0]), chosen].sum()), rel=1e-12, abs=1e-300)


def _brute_force(col: torch.Tensor, labels: torch.Tensor, bits: list[int], budget: int) -> tuple[float, float]:
    """Least error over integral widths + one split at total cost == budget: (column errors, LP model).

    The split group g sits at width a with m channels at b; its error is either the m largest
    own reductions (column errors) or E_g(a) + m / n_g (E_g(b) - E_g(a)) (the LP's linear model).
    """
    G, C = int(labels.max()) + 1, len(bits)
    sizes = torch.bincount(labels).tolist()
    E = torch.zeros(G, C, dtype=torch.float64).index_add_(0, labels, col).tolist()
    best_col = best_lin = math.inf
    for combo in itertools.product(range(C), repeat=G):
        if sum(sizes[h] * bits[c] for h, c in enumerate(combo)) == budget:
            err = sum(E[h][c] for h, c in enumerate(combo))
            best_col, best_lin = min(best_col, err), min(best_lin, err)
    for g in range(G):
        others = [h for h in range(G) if h != g]
        cols = torch.nonzero(labels == g).flatten()
        for a, b in itertools.combinations(range(C), 2):
            saved = torch.cumsum((col[cols, a] - col[cols, b]).sort(descending=True).values, 0).tolist()
            for combo in itertools.product(range(C), repeat=G - 1):
                rest = budget - sum(sizes[h] * bits[c] for h, c in zip(others, combo)) - sizes[g] * bits[a]
                m, r = divmod(rest, bits[b] - bits[a])
                if r or not 0 < m < sizes[g]:
                    continue
                others_err = sum(E[h][c] for h, c in zip(others, combo))
                best_col = min(best_col, others_err + E[g][a] - saved[m - 1])
                best_lin = min(best_lin, others_err + E[g][a] + m / sizes[g] * (E[g][b] - E[g][a]))
    return best_col, best_lin


def _small_instance(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """3-4 groups of 12 or 24 channels, 3-4 widths whose steps divide 12, a budget that is a multiple of 12.

    Column errors are arbitrary (non-monotone, non-convex curves) on odd seeds, decreasing in
    width on even ones; every fourth instance has one group with zero error at every width.
    """
    g = _gen(1000 + seed)
    bits = [[2, 3, 4], [2, 4, 6, 8], [2, 3, 4, 6]][seed % 3]
    sizes = (12 * torch.randint(1, 3, (int(torch.randint(3, 5, (1,), generator=g)),), generator=g)).tolist()
    labels = _shuffled_labels(sizes, g)
    d = labels.numel()
    col = torch.rand(d, len(bits), generator=g, dtype=torch.float64) * torch.exp(2 * torch.randn(d, 1, generator=g, dtype=torch.float64))
    if seed % 2 == 0:
        col = col.sort(dim=1, descending=True).values
    if seed % 4 == 0:
        col[labels == 0] = 0.0
    budget = 12 * int(torch.randint(d * bits[0] // 12, d * bits[-1] // 12 + 1, (1,), generator=g))
    return col, labels, bits, budget


@pytest.mark.parametrize("seed", range(120))
def test_allocation_is_optimal_against_brute_force(seed: int) -> None:
    col, labels, bits, budget = _small_instance(seed)
    d = labels.numel()
    alloc = allocate_bits(col, labels, bits, budget / d)
    _check_consistent(alloc, labels, col, bits)
    assert int(alloc.col_bits.sum()) == budget  # d < 100: only the exact total is within 0.01 bits
    best_col, best_lin = _brute_force(col, labels, bits, budget)
    assert alloc.est_error == pytest.approx(best_col, rel=1e-9, abs=1e-12)
    assert alloc.est_error <= best_lin * (1 + 1e-9) + 1e-12  # never worse than the LP optimum
    G = int(labels.max()) + 1
    if len(alloc.group_bits) == G + 1:  # the split's own error is at most its linear share
        g = int(labels[alloc.labels == G][0])
        a, b = bits.index(alloc.group_bits[g]), bits.index(alloc.group_bits[G])
        cols = labels == g
        m, n = int((alloc.labels == G).sum()), int(cols.sum())
        split_err = float(col[cols & (alloc.labels == g), a].sum() + col[alloc.labels == G, b].sum())
        E_a, E_b = float(col[cols, a].sum()), float(col[cols, b].sum())
        assert split_err <= E_a + m / n * (E_b - E_a) + 1e-12


@pytest.mark.parametrize("seed", range(30))
def test_allocation_equals_the_lp_optimum_when_channels_share_errors_equally(seed: int) -> None:
    col, labels, bits, budget = _small_instance(seed)
    G = int(labels.max()) + 1
    E = torch.zeros(G, len(bits), dtype=torch.float64).index_add_(0, labels, col)
    col = (E / torch.bincount(labels)[:, None])[labels]  # col: [d, C] every channel 1/n_g of its group
    alloc = allocate_bits(col, labels, bits, budget / labels.numel())
    best_col, best_lin = _brute_force(col, labels, bits, budget)
    assert alloc.est_error == pytest.approx(best_lin, rel=1e-9, abs=1e-12)
    assert best_col == pytest.approx(best_lin, rel=1e-9, abs=1e-12)


def test_allocation_takes_widths_off_a_non_convex_curve() -> None:
    # one group, error 10 / 9.9 / 1 / 0.5 at 2 / 3 / 4 / 8 bits: 3 bits sits above the chord 2 -> 4
    bits = [2, 3, 4, 8]
    d = 400
    col = torch.tensor([10.0, 9.9, 1.0, 0.5], dtype=torch.float64).repeat(d, 1) / d
    alloc = allocate_bits(col, torch.zeros(d, dtype=torch.int64), bits, 3.0)
    assert sorted(alloc.group_bits) == [2, 4] and torch.bincount(alloc.col_bits)[[2, 4]].tolist() == [200, 200]
    assert alloc.est_error == pytest.approx(5.5)
    # a non-monotone curve: 4 bits worse than 3 -> whole group at 3 rather than 2/4
    col = torch.tensor([10.0, 2.0, 6.0, 0.5], dtype=torch.float64).repeat(d, 1) / d
    assert allocate_bits(col, torch.zeros(d, dtype=torch.int64), bits, 3.0).group_bits == [3]


def test_zero_error_group_stays_at_the_lowest_width() -> None:
    bits = [2, 3, 4, 6, 8]
    col, labels = _synthetic([120, 200, 80, 100], bits, seed=4)
    col[labels == 1] = 0.0  # e.g. a group of dead channels
    for target in [2.5, 3.0, 3.7, 4.2, 5.5]:
        alloc = allocate_bits(col, labels, bits, target)
        _check_consistent(alloc, labels, col, bits)
        assert alloc.group_bits[1] == 2
        assert abs(float(alloc.col_bits.double().mean()) - target) <= 0.01
        if len(alloc.group_bits) == 5:  # the split is on a group that has error
            assert int(labels[alloc.labels == 4][0]) != 1


def test_allocation_split_moves_the_channels_with_the_largest_error_reduction() -> None:
    bits = [2, 3, 4, 8]
    col, labels = _synthetic([1, 1, 997], bits, seed=3)
    alloc = allocate_bits(col, labels, bits, 3.5)
    assert len(alloc.group_bits) == 4  # the big group had to be split
    moved = alloc.labels == 3
    src = int(labels[moved][0])
    a, b = bits.index(alloc.group_bits[src]), bits.index(alloc.group_bits[3])
    assert b > a
    reduction = col[:, a] - col[:, b]
    rest = (labels == src) & ~moved
    assert float(reduction[moved].min()) >= float(reduction[rest].max())


def test_an_outlier_channel_is_split_off() -> None:
    # one channel holds most of its group's error: moving it alone up beats any linear share
    bits = [2, 4, 8]
    d = 600
    labels = torch.arange(d) % 3
    col = torch.tensor([16.0, 1.0, 1 / 16], dtype=torch.float64).repeat(d, 1)
    col[0] *= 1000.0  # 16000 / 1000 / 62.5
    alloc = allocate_bits(col, labels, bits, 2.01)  # 6 spare bits: 3 channels 2 -> 4 or 1 channel 2 -> 8
    assert alloc.col_bits[0] == 8 and int((alloc.col_bits > 2).sum()) == 1
    assert alloc.est_error == pytest.approx(599 * 16 + 62.5)


SIZE_CASES = [
    [1, 1, 997],
    [72] * 8,
    [5, 300, 17, 64, 128, 900, 33, 2],
    [4096],
    [1000, 24],
    [133, 140, 150],
]


@pytest.mark.parametrize("bits", [[2, 3, 4, 8], [2, 3, 4, 5, 6, 8, 16], [2, 4, 8, 16], [2, 3, 4, 6, 8]])
def test_allocation_lands_within_001_bits_of_any_target(bits: list[int]) -> None:
    cases = SIZE_CASES + [torch.randint(60, 400, (int(n),), generator=_gen(20 + i)).tolist() for i, n in enumerate([3, 6, 12])]
    targets = [min(bits), max(bits)] + torch.empty(4).uniform_(min(bits), max(bits), generator=_gen(30)).tolist()
    for seed, sizes in enumerate(cases):
        assert sum(sizes) >= 400
        col, labels = _synthetic(sizes, bits, seed)
        if seed % 2:  # non-convex, non-monotone curves
            col = torch.rand(col.shape, generator=_gen(seed), dtype=torch.float64)
        for target in targets:
            alloc = allocate_bits(col, labels, bits, target)
            assert abs(float(alloc.col_bits.double().mean()) - target) <= 0.01, (sizes, target, alloc.group_bits)
            _check_consistent(alloc, labels, col, bits)


def test_allocation_never_overshoots_a_small_layer() -> None:
    # d = 16 with an 8-bit step: the target may be unreachable, but the average must not exceed it by > 0.01
    bits = [2, 4, 8, 16]
    col, labels = _synthetic([3, 5, 8], bits, 0)
    for target in [2.0, 2.3, 3.1, 4.45, 7.9, 12.0, 16.0]:
        alloc = allocate_bits(col, labels, bits, target)
        assert float(alloc.col_bits.double().mean()) <= target + 0.01
        _check_consistent(alloc, labels, col, bits)


def test_allocation_edge_targets_and_validation() -> None:
    bits = [2, 3, 4, 8, 16]
    col, labels = _synthetic([10, 20, 30, 40], bits, 1)
    lo = allocate_bits(col, labels, bits, 2.0)
    assert lo.group_bits == [2, 2, 2, 2] and bool((lo.col_bits == 2).all())
    hi = allocate_bits(col, labels, bits, 16.0)
    assert hi.group_bits == [16, 16, 16, 16] and hi.est_error == 0.0
    one = allocate_bits(col[:, 2:3], labels, [4], 4.0)  # a single width
    assert one.group_bits == [4, 4, 4, 4] and one.est_error == pytest.approx(float(col[:, 2].sum()))
    single = allocate_bits(col, torch.zeros(100, dtype=torch.int64), bits, 3.5)  # one group: split it
    assert single.group_bits == [3, 4] and float(single.col_bits.double().mean()) == 3.5
    with pytest.raises(ValueError, match="outside"):
        allocate_bits(col, labels, bits, 1.9)
    with pytest.raises(ValueError, match="outside"):
        allocate_bits(col, labels, bits, 16.5)
    with pytest.raises(ValueError):
        allocate_bits(col, labels, bits, float("nan"))
    with pytest.raises(ValueError):
        allocate_bits(col[:, :0], labels, [], 3.0)
    with pytest.raises(ValueError):
        allocate_bits(col, labels, [2, 3, 4, 8, 12], 3.0)
    with pytest.raises(ValueError):
        allocate_bits(col[:, :4], labels, [1, 3, 4, 8], 3.0)
    with pytest.raises(ValueError):
        allocate_bits(col[:, :3], labels, [2, 2, 4], 3.0)
    with pytest.raises(ValueError):
        allocate_bits(col[:, :4], labels, bits, 3.0)  # col_errors shape mismatch
    with pytest.raises(ValueError, match="non-empty"):
        allocate_bits(col, torch.where(labels == 1, 2, labels), bits, 3.0)  # group 1 empty
    bad = col.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError):
        allocate_bits(bad, labels, bits, 3.0)


def test_cholesky_qr_is_orthonormal_and_spans_the_block():
    """The GPU's Cholesky QR (run here on the CPU): orthonormal, the same span as Householder QR,
    and Householder QR when the block is rank deficient."""
    from channel_grouping import _orthonormalize
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(2000, 28, generator=g) * torch.logspace(0, 2.5, 28)   # columns 300x apart in scale
    Q = _orthonormalize(Y, cholesky=True)
    eye = torch.eye(28, dtype=torch.float64)
    assert (Q.double().T @ Q.double() - eye).abs().max() < 1e-6
    P = torch.linalg.qr(Y.double())[0]
    assert (P @ (P.T @ Q.double()) - Q.double()).abs().max() < 1e-5     # span(Q) = span(Y)
    Y[:, 5] = Y[:, 4]                                                    # rank deficient: no Cholesky
    R = _orthonormalize(Y, cholesky=True)
    assert torch.equal(R, torch.linalg.qr(Y)[0])


# ----------------------------------------------------------------------------------------------
# the fast allocator and column errors against frozen copies of the earlier (slow) versions
# ----------------------------------------------------------------------------------------------


def _reference():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _reference_alloc

    return _reference_alloc


def _random_instance(seed: int, d: int, G: int, C_bits: list[int], zero_groups: int = 0, ties: bool = False):
    g = _gen(seed)
    labels = torch.cat([torch.arange(G), torch.randint(0, G, (d - G,), generator=g)])
    labels = labels[torch.randperm(d, generator=g)]
    scale = torch.exp(2 * torch.randn(d, 1, generator=g, dtype=torch.float64))
    bits = torch.tensor(C_bits, dtype=torch.float64)
    col = scale * 4.0 ** -bits * (1 + 0.3 * torch.rand(d, len(C_bits), generator=g, dtype=torch.float64))
    if ties:  # equal errors within groups: many equal gains and equal knapsack totals
        col = torch.round(col * 4) / 4
    col[torch.isin(labels, torch.arange(zero_groups)), :] = 0.0
    return col, labels


@pytest.mark.parametrize("seed", range(40))
def test_fast_allocator_equals_the_reference_allocator(seed: int) -> None:
    ref = _reference()
    rng = np.random.default_rng(seed)
    d = int(rng.choice([9, 24, 100, 333, 1000, 2048]))
    G = int(rng.integers(1, min(d, 9) + 1))
    C_bits = sorted(rng.choice([2, 3, 4, 5, 6, 8, 16], size=int(rng.integers(1, 5)), replace=False).tolist())
    col, labels = _random_instance(seed, d, G, C_bits, zero_groups=int(rng.integers(0, 2)), ties=bool(seed % 3 == 0))
    lo_b, hi_b = min(C_bits), max(C_bits)
    for target in {lo_b, hi_b, float(rng.uniform(lo_b, hi_b)), round(float(rng.uniform(lo_b, hi_b)), 1)}:
        new = allocate_bits(col, labels, C_bits, target)
        old = ref.reference_allocate_bits(col, labels, C_bits, target)
        assert new.group_bits == old.group_bits, (d, G, C_bits, target)
        assert torch.equal(new.labels, old.labels) and torch.equal(new.col_bits, old.col_bits)
        assert new.est_error == pytest.approx(old.est_error, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_column_errors_are_bitwise_the_reference(sym: bool, masked: bool, monkeypatch) -> None:
    import channel_grouping

    ref = _reference()
    g = _gen(7)
    W = torch.randn(300, 97, generator=g) * torch.exp(torch.randn(1, 97, generator=g))
    W[:, 3] = 0.0  # a dead column
    h = torch.rand(97, generator=g)
    labels = torch.randint(0, 5, (97,), generator=g)
    mask = (torch.rand(300, 97, generator=g) > 0.5) if masked else None
    monkeypatch.setattr(channel_grouping, "COLUMN_ERRORS_BLOCK", 97 * 64)  # several row blocks, a ragged last one
    new = column_errors(W, h, labels, 5, [2, 3, 4, 8, 16], keep_mask=mask, sym=sym)
    old = ref.reference_column_errors(W, h, labels, 5, [2, 3, 4, 8, 16], mask, sym=sym)
    assert torch.equal(new, old)


def test_fast_allocator_equals_the_reference_when_no_total_is_accepted() -> None:
    ref = _reference()
    col, labels = _random_instance(3, 9, 3, [2, 16])
    for target in (2.5, 3.3, 9.0, 15.9):  # steps of 14 bits on 9 channels: no total within 0.01 bits
        new = allocate_bits(col, labels, [2, 16], target)
        old = ref.reference_allocate_bits(col, labels, [2, 16], target)
        assert abs(new.col_bits.double().mean() - target) > 0.01  # the closest-total fallback
        assert new.group_bits == old.group_bits and torch.equal(new.labels, old.labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", range(6))
def test_kmeans_cuda_graphs_give_the_eager_result(seed, monkeypatch):
    import channel_grouping as cg
    g = torch.Generator().manual_seed(seed)
    n = [600, 3000, 5120][seed % 3]
    centres = torch.randn(8, 8, generator=g)
    Y = centres[torch.randint(0, 8, (n,), generator=g)] + (0.5 + seed) * torch.randn(n, 8, generator=g)
    Y[: n // 10] = Y[0]                                     # duplicates: clusters may empty
    Y = (Y / Y.norm(dim=1, keepdim=True)).cuda()
    graphed = cg.kmeans(Y, 8, seed=seed)
    monkeypatch.setattr(cg, "KMEANS_CUDA_GRAPHS", False)
    eager = cg.kmeans(Y, 8, seed=seed)
    assert torch.equal(graphed, eager)


def test_cached_lloyd_buffers_give_the_uncached_result(monkeypatch):
    """The per-shape buffers of _LloydGraph (copy in, reuse, LRU), with the graph replaced by eager steps (CPU)."""
    import channel_grouping as cg

    def problem(seed: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        Y = torch.randn(n, 8, generator=g, dtype=torch.float64)
        Y[: n // 8] = Y[0]  # duplicates: clusters may empty (relocation writes into the cached centres)
        return Y / Y.norm(dim=1, keepdim=True)

    cases = [(seed, n) for n in (300, 500, 300, 700, 300) for seed in (n % 7, n % 5)]
    ref = [cg.kmeans(problem(s, n), 8, seed=s) for s, n in cases]

    def eager_replay(self):
        self.graph = "captured"  # what replay() does on CUDA, without the graph
        return cg._lloyd_steps(self.X, self.Xa, self.C, self.done, self.tol, cg.KMEANS_CHECK_EVERY)

    def eager_seeding(self):
        self.graph = "captured"
        return cg._seeding_steps(self.X, self.first, self.u, self.k, self.bits)

    cg._LLOYD_GRAPHS.clear(), cg._SEEDING_GRAPHS.clear()
    monkeypatch.setattr(cg, "_graphed", lambda X, max_iter: max_iter >= cg.KMEANS_CHECK_EVERY)
    monkeypatch.setattr(cg._LloydGraph, "replay", eager_replay)
    monkeypatch.setattr(cg._SeedingGraph, "replay", eager_seeding)
    monkeypatch.setattr(cg, "LLOYD_GRAPHS_KEPT", 2)
    out = [cg.kmeans(problem(s, n), 8, seed=s) for s, n in cases]
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert len(cg._LLOYD_GRAPHS) == 2  # three shapes met, the least recently used one dropped
    assert len(cg._SEEDING_GRAPHS) == 2 and all(g.graph == "captured" for g in cg._SEEDING_GRAPHS.values())
    cg._LLOYD_GRAPHS.clear(), cg._SEEDING_GRAPHS.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kmeans_reuses_one_captured_graph_per_shape(monkeypatch):
    import channel_grouping as cg
    cg._LLOYD_GRAPHS.clear(), cg._SEEDING_GRAPHS.clear()
    results = []
    for seed in range(3):  # one shape, three problems: captured once, replayed with new data
        g = torch.Generator().manual_seed(seed)
        Y = torch.randn(900, 8, generator=g)
        results.append(cg.kmeans((Y / Y.norm(dim=1, keepdim=True)).cuda(), 8, seed=seed))
    assert len(cg._LLOYD_GRAPHS) == 1 and len(cg._SEEDING_GRAPHS) == 1
    assert next(iter(cg._SEEDING_GRAPHS.values())).graph is not None  # captured on the second call, replayed on the third
    monkeypatch.setattr(cg, "KMEANS_CUDA_GRAPHS", False)
    for seed, graphed in enumerate(results):
        g = torch.Generator().manual_seed(seed)
        Y = torch.randn(900, 8, generator=g)
        assert torch.equal(graphed, cg.kmeans((Y / Y.norm(dim=1, keepdim=True)).cuda(), 8, seed=seed))


def test_allocation_in_threads_equals_the_serial_allocation(monkeypatch):
    import channel_grouping as cg
    g = torch.Generator().manual_seed(3)
    d = 1500
    labels = torch.randint(0, 8, (d,), generator=g)
    errs = torch.rand(d, 5, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values
    results = []
    for threshold in (1, 10**9):
        monkeypatch.setattr(cg, "ALLOC_THREADS_MIN_D", threshold)
        results.append(cg.allocate_bits(errs, labels, [2, 3, 4, 6, 8], 3.3))
    assert torch.equal(results[0].col_bits, results[1].col_bits) and torch.equal(results[0].labels, results[1].labels)
    assert results[0].group_bits == results[1].group_bits and results[0].est_error == results[1].est_error


def test_knapsack_table_of_all_groups_is_bitwise_each_groups_knapsack():
    from channel_grouping import _knapsack_tables_all, _min_error_by_cost
    rng = np.random.RandomState(4)
    G, C = 6, 4
    costs = rng.randint(1, 40, (G, 1)) * np.array([[2, 3, 4, 8]])
    errors = rng.rand(G, C)
    errors[2, 1] = errors[2, 0]                                     # a tie: the narrower width must win
    cap = 300
    tables = np.stack([errors, rng.rand(G, C)])                     # two sub-layers' tables, one set of costs
    dp_all, choice_all = (t.numpy() for t in _knapsack_tables_all(costs, tables, cap, torch.device("cpu")))
    assert dp_all.shape == (2, G, cap + 1) and choice_all.shape == (2, G, G, cap + 1)
    for s in range(2):
        for g in range(G):
            others = [h for h in range(G) if h != g]
            dp, choice = _min_error_by_cost(costs[others], tables[s, others], cap)
            assert np.array_equal(dp_all[s, g], dp)                 # bitwise, inf included
            assert np.array_equal(choice_all[s, g, others], choice)


@pytest.mark.parametrize("seed", range(4))
def test_allocation_with_knapsack_tables_equals_the_numpy_allocation(seed):
    g = torch.Generator().manual_seed(seed)
    d = [300, 1500, 4000, 700][seed]
    labels = torch.randint(0, 8, (d,), generator=g)
    errs = torch.rand(d, 5, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values
    if seed == 3:
        errs[labels == 2] = 0.0                                     # a zero-error group
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ref = allocate_bits(errs, labels, [2, 3, 4, 6, 8], 3.3 + 0.2 * seed)
    for device in devices:
        res = allocate_bits(errs, labels, [2, 3, 4, 6, 8], 3.3 + 0.2 * seed, device=device)
        assert torch.equal(res.col_bits, ref.col_bits) and torch.equal(res.labels, ref.labels)
        assert res.group_bits == ref.group_bits and res.est_error == ref.est_error


def _affinity_like(d: int, seed: int) -> torch.Tensor:
    """A normalised affinity with a few strong clusters and noise (the spectrum spectral_cluster meets)."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 6, (d,), generator=g)
    A = (lab[:, None] == lab[None, :]).float() * 0.5 + torch.rand(d, d, generator=g) * 0.3
    A = (A + A.T) / 2
    s = A.sum(1).rsqrt()
    return A * s[:, None] * s[None, :]


def test_cached_eigen_windows_give_the_host_cholesky_result(monkeypatch):
    """The sync-free QR windows of _EigenWindows (device Cholesky, cached buffers, LRU, redo on failure),
    run on the CPU with the graph replaced by eager steps, against the host-checked Cholesky QR: bitwise."""
    import channel_grouping as cg
    cases = [(d, seed) for d in (300, 400, 300, 500, 300) for seed in (0, 1)]
    Ms = {c: _affinity_like(*c) for c in cases}
    host_qr = cg._orthonormalize
    monkeypatch.setattr(cg, "_orthonormalize", lambda Y, cholesky=None: host_qr(Y, cholesky=True))
    ref = [cg.subspace_eigenvectors(Ms[c], 6, seed=c[1]) for c in cases]
    assert all(v is not None for v in ref)

    cg._EIGEN_WINDOWS.clear()
    monkeypatch.setattr(cg, "_eigen_graphed", lambda M: True)
    replays = []
    monkeypatch.setattr(cg._EigenWindows, "_replay", lambda self, n: (replays.append(n), self._steps(n)))
    monkeypatch.setattr(cg, "EIGEN_GRAPHS_KEPT", 2)
    out = [cg.subspace_eigenvectors(Ms[c], 6, seed=c[1]) for c in cases]
    assert replays and all(torch.equal(a, b) for a, b in zip(ref, out))
    assert len(cg._EIGEN_WINDOWS) == 2  # three shapes met, the least recently used one dropped

    device_qr, calls = cg._orthonormalize_on_device, []

    def failing(Y, eye, bad):  # every fifth device QR fails: its window is redone on the host path
        calls.append(1)
        Q = device_qr(Y, eye, bad)
        if len(calls) % 5 == 0:
            bad.fill_(True)
            return torch.full_like(Q, float("nan"))
        return Q

    monkeypatch.setattr(cg, "_orthonormalize_on_device", failing)
    again = [cg.subspace_eigenvectors(Ms[c], 6, seed=c[1]) for c in cases]
    assert len(calls) >= 5 and all(torch.equal(a, b) for a, b in zip(ref, again))
    cg._EIGEN_WINDOWS.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eigen_cuda_graphs_give_the_eager_vectors(monkeypatch):
    import channel_grouping as cg
    cg._EIGEN_WINDOWS.clear()
    for d, seed in [(576, 0), (576, 1), (1536, 2), (576, 3)]:
        M = _affinity_like(d, seed).cuda()
        graphed = cg.subspace_eigenvectors(M, 8, seed=seed)
        with monkeypatch.context() as m:
            m.setattr(cg, "EIGEN_CUDA_GRAPHS", False)
            eager = cg.subspace_eigenvectors(M, 8, seed=seed)
        assert graphed is not None and eager is not None
        assert (graphed - eager).abs().max() < 1e-5  # device vs host Cholesky: bitwise in practice, not by construction
    assert len(cg._EIGEN_WINDOWS) == 2


def test_one_host_thread_restores_the_thread_count():
    from channel_grouping import _one_host_thread
    n = torch.get_num_threads()
    with _one_host_thread(False):
        assert torch.get_num_threads() == n   # a solver on the CPU keeps every thread
    with pytest.raises(RuntimeError):
        with _one_host_thread(True):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == n


def _stacked_instance(seed: int):
    """S error tables sharing labels (the sub-layers of one input), widths and a target from the seed."""
    rng = np.random.default_rng(seed)
    d = int(rng.choice([9, 24, 100, 333, 576, 1000, 1536]))
    G = int(rng.integers(1, min(d, 9) + 1))
    C_bits = sorted(rng.choice([2, 3, 4, 5, 6, 8, 16], size=int(rng.integers(1, 6)), replace=False).tolist())
    col, labels = _random_instance(seed, d, G, C_bits, zero_groups=int(rng.integers(0, 2)), ties=bool(seed % 3 == 0))
    tables = [col * float(rng.uniform(0.5, 2.0)) for _ in range(int(rng.integers(1, 4)))]
    if seed % 3 == 0:
        tables[0] = col  # ties: equal errors, equal gains and equal knapsack totals
    lo_b, hi_b = min(C_bits), max(C_bits)
    return tables, labels, C_bits, [lo_b, hi_b, float(rng.uniform(lo_b, hi_b)), round(float(rng.uniform(lo_b, hi_b)), 1)]


def _device_search_agrees(device: str, seeds, monkeypatch) -> None:
    """allocate_bits_many with the device's split search is bitwise the host search (device=None), and the
    device search answers (finds an accepted split) in most tables, so the comparison exercises it."""
    import channel_grouping as cg
    found, total = [0], [0]
    search = cg._best_splits_all

    def counted(*args, **kwargs):
        out = search(*args, **kwargs)
        found[0] += int(out[:, 0].sum())
        total[0] += out.shape[0]
        return out

    monkeypatch.setattr(cg, "_best_splits_all", counted)
    for seed in seeds:
        tables, labels, C_bits, targets = _stacked_instance(seed)
        for target in targets:
            host = allocate_bits_many(tables, labels, C_bits, target)
            dev = allocate_bits_many(tables, labels, C_bits, target, device=device)
            for h, v in zip(host, dev):
                assert h.group_bits == v.group_bits, (seed, target)
                assert torch.equal(h.labels.cpu(), v.labels.cpu()) and torch.equal(h.col_bits.cpu(), v.col_bits.cpu())
                assert h.est_error == v.est_error
    assert total[0] > 0 and found[0] >= 0.6 * total[0], (found, total)


@pytest.mark.parametrize("chunk", [None, 1])
def test_device_split_search_is_bitwise_the_host_search(chunk, monkeypatch) -> None:
    import channel_grouping as cg
    if chunk is not None:  # one table per chunk
        monkeypatch.setattr(cg, "SPLIT_SEARCH_CHUNK", chunk)
    _device_search_agrees("cpu", range(60) if chunk is None else range(60, 80), monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_split_search_on_cuda_is_bitwise_the_host_search(monkeypatch) -> None:
    _device_search_agrees("cuda", range(200), monkeypatch)


def test_device_split_search_falls_back_to_the_closest_total() -> None:
    """No accepted total anywhere (14-bit steps on 9 channels): the host's closest-total search decides."""
    import channel_grouping as cg
    col, labels = _random_instance(3, 9, 3, [2, 16])
    for target in (2.5, 3.3, 9.0, 15.9):
        host = allocate_bits(col, labels, [2, 16], target)
        tables = [col, 2 * col]
        dev = allocate_bits_many(tables, labels, [2, 16], target, device="cpu")
        found = cg._best_splits_all(*_search_inputs(tables, labels, [2, 16], target))
        assert not found[:, 0].any()  # the device found nothing: the host decided
        assert dev[0].group_bits == host.group_bits and torch.equal(dev[0].labels, host.labels)
        assert abs(dev[0].col_bits.double().mean() - target) > 0.01


def _search_inputs(tables, labels, bits, target_avg):
    """The arguments allocate_bits_many gives _best_splits_all (widths ascending), for a direct call."""
    import channel_grouping as cg
    lab = labels.numpy()
    d, G = lab.size, int(lab.max()) + 1
    sizes = np.bincount(lab, minlength=G)
    bits_np = np.array(sorted(bits), dtype=np.int64)
    col_errs = [t.double().numpy() for t in tables]
    Es = np.zeros((len(col_errs), G, len(bits)))
    for E_s, c in zip(Es, col_errs):
        np.add.at(E_s, lab, c)
    pairs = np.array(list(itertools.combinations(range(len(bits)), 2)), dtype=np.int64).reshape(-1, 2)
    target = target_avg * d
    lo, hi = target - 0.01 * d, target + min(0.5, 0.01 * d)
    cap = math.floor(target + 0.01 * d) - int(sizes.min()) * int(bits_np[0])
    dp, _ = cg._knapsack_tables_all(sizes[:, None] * bits_np[None, :], Es, cap, torch.device("cpu"))
    return dp, Es, col_errs, lab, sizes, bits_np, pairs, lo, hi, target, d


def test_start_blocks_are_cached_and_give_the_uncached_result(monkeypatch) -> None:
    import channel_grouping as cg
    g = _gen(21)
    X = torch.randn(300, 300, generator=g)
    Ms = [(X + X.T) / 2, X @ X.T / 300]
    cg._START_BLOCKS.clear()
    first = [cg.subspace_eigenvectors(M, 6, seed=5) for M in Ms]  # the second call reuses the first's start block
    assert len(cg._START_BLOCKS) == 1
    calls, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: calls.append(1) or randn(*a, **k))
    again = [cg.subspace_eigenvectors(M, 6, seed=5) for M in Ms]
    assert not calls  # cached: no new start block drawn
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    monkeypatch.setattr(cg, "START_BLOCKS_KEPT", 2)
    for seed in (6, 7, 8):
        cg._start_block(seed, 300, 26, torch.device("cpu"), torch.float32)
    assert [k[0] for k in cg._START_BLOCKS] == [7, 8]  # least recently used dropped
    cg._START_BLOCKS.clear()
    calls.clear()
    fresh = [cg.subspace_eigenvectors(M, 6, seed=5) for M in Ms]  # drawn and orthonormalised again
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, fresh))
    cg._START_BLOCKS.clear()


@pytest.mark.parametrize("masked", [False, True])
def test_column_errors_of_all_widths_at_once_are_bitwise_the_per_width_errors(masked, monkeypatch) -> None:
    """The GPU's small-layer path (every width in one pass), forced on the CPU, against the row-block path."""
    import channel_grouping as cg
    g = _gen(31)
    W = torch.randn(90, 77, generator=g) * torch.exp(torch.randn(1, 77, generator=g))
    W[:, 5] = 0.0
    h = torch.rand(77, generator=g)
    labels = torch.randint(0, 6, (77,), generator=g)
    mask = (torch.rand(90, 77, generator=g) > 0.5) if masked else None
    for sym in (False, True):
        per_width = column_errors(W, h, labels, 6, [2, 3, 4, 8, 16], mask, sym, row_splits=[30, 20, 40])
        monkeypatch.setattr(cg, "_batch_widths", lambda device, n: True)
        at_once = column_errors(W, h, labels, 6, [2, 3, 4, 8, 16], mask, sym, row_splits=[30, 20, 40])
        monkeypatch.undo()
        assert torch.equal(per_width, at_once)
    assert not cg._batch_widths(torch.device("cpu"), 1) and cg._batch_widths(torch.device("cuda"), cg.COLUMN_ERRORS_BATCH)
    assert not cg._batch_widths(torch.device("cuda"), cg.COLUMN_ERRORS_BATCH + 1)


def test_spectral_cluster_checks_its_embedding_once(monkeypatch) -> None:
    """The affinity is checked (one host read) and M once; k-means and the silhouette trust the embedding
    derived from it, while their public calls still refuse NaN."""
    import channel_grouping as cg
    g = _gen(41)
    X = torch.randn(300, 40, generator=g)
    A = (X.T @ X).abs() / 300
    names = []
    check = cg._check_finite
    monkeypatch.setattr(cg, "_check_finite", lambda name, t: names.append(name) or check(name, t))
    grouping = cg.spectral_cluster(A, 4, seed=0)
    assert names == ["M"] and torch.bincount(grouping.labels, minlength=4).min() > 0
    monkeypatch.undo()
    Y = torch.randn(40, 4, generator=g)
    Y[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cg.kmeans(Y, 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cg.silhouette_score(Y, torch.arange(40) % 4)
