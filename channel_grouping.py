"""Grouping of input channels (columns of W [out, in]) and per-group bit-width allocation.

* ``spectral_cluster``: normalised spectral clustering (Ng-Jordan-Weiss) of an MI affinity matrix.
* ``random_groups`` / ``contiguous_groups``: baselines.
* ``column_errors``: Hessian-diagonal-weighted quantisation error of each channel at each width.
* ``allocate_bits``: a width per group plus one group split between two widths, least summed
  column error at the target average width (a knapsack over the other groups per split group).

All functions are pure and device-agnostic (CPU or CUDA tensors in, tensors of the same device out).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

import quant

__all__ = [
    "Grouping",
    "BitAllocation",
    "VALID_BITS",
    "spectral_cluster",
    "top_eigenvectors",
    "subspace_eigenvectors",
    "kmeans",
    "silhouette_score",
    "random_groups",
    "contiguous_groups",
    "column_errors",
    "allocate_bits",
]

VALID_BITS = frozenset(quant.VALID_BITS)  # 16 = keep in half precision (no quantisation)


@dataclass(frozen=True)
class Grouping:
    labels: Tensor  # [d] int64 group id per input channel, 0..n_groups-1, every group non-empty
    silhouette: float  # clustering quality in [-1, 1] (nan where undefined, e.g. 1 group)


@dataclass(frozen=True)
class BitAllocation:
    col_bits: Tensor  # [d] int64 width of each input channel (after any split)
    labels: Tensor  # [d] int64 labels after a split (split part gets label n_groups)
    group_bits: list[int]  # width per label (len = number of labels incl. a split one)
    est_error: float  # estimated total error: sum of the column errors at the chosen widths


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


# ----------------------------------------------------------------------------------------------
# spectral clustering
# ----------------------------------------------------------------------------------------------


CHECK_EVERY = 8  # products by M between Rayleigh-Ritz residual checks (even: two products per QR)


@contextlib.contextmanager
def _one_host_thread(applies: bool = True):
    """Host LAPACK on [b, b] matrices (b ~ 28) on one thread, for a solver whose products run on a GPU:
    entering a parallel region of every host thread costs more than such a call's work. applies=False
    (a solver on the CPU, whose results keep the host's thread count): nothing changes."""
    n = torch.get_num_threads()
    if n == 1 or not applies:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _orthonormalize(Y: Tensor, cholesky: bool | None = None) -> Tensor:
    """An orthonormal basis Q [d, b] of the columns of Y [d, b] (full column rank).

    # G = Y^T Y = L L^T,  Q = Y L^-T   (Cholesky QR, twice)

    On a GPU, a Householder QR of a tall thin block launches many small kernels (~1 ms at d =
    13824, b = 28: most of the subspace iteration's time); Cholesky QR is a few GEMMs, with G
    formed in float64 and factorised on the CPU. Done twice, it is orthonormal to working
    precision while cond(Y) stays below ~1e3 (two products per QR keep it there); if the Gram
    matrix is not positive definite, or the result is not orthonormal to 1e-4, Householder QR
    decides. cholesky=None: Cholesky QR on a GPU, Householder QR on the CPU.
    """
    if not (Y.is_cuda if cholesky is None else cholesky):
        return torch.linalg.qr(Y)[0]
    Q = Y
    eye = torch.eye(Y.shape[1], dtype=torch.float64)
    for _ in range(2):
        Qd = Q.to(torch.float64)
        G = (Qd.T @ Qd).cpu()  # G: [b, b] (the one host read of the round)
        with _one_host_thread(Y.is_cuda):
            L, info = torch.linalg.cholesky_ex(G)
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False) if int(info) == 0 else None
        if L_inv is None:
            return torch.linalg.qr(Y)[0]
        Q = Q @ L_inv.T.to(dtype=Y.dtype).to(Y.device, non_blocking=True)  # Q: [d, b]; the copy does not wait
    Qd = Q.to(torch.float64)
    E = Qd.T @ Qd
    E.diagonal().sub_(1.0)  # E = Q^T Q - I without copying an identity to the device
    if float(E.abs().max()) > 1e-4:
        return torch.linalg.qr(Y)[0]
    return Q


START_BLOCKS_KEPT = 4  # (seed, d, b, device, dtype) start blocks of subspace_eigenvectors kept (LRU)
_START_BLOCKS: "OrderedDict[tuple, Tensor]" = OrderedDict()
_START_LOCK = threading.Lock()


def _start_block(seed: int, d: int, b: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The seeded orthonormal start block [d, b] of ``subspace_eigenvectors``, cached.

    # Q0 = orthonormalize(randn(d, b; seed))

    The same inputs give the same block, so the sub-layers of a decoder layer that share a seed and
    an input width (LLaMA: q/k/v, o_proj and gate/up) compute it once: its Cholesky QR costs three
    host reads. Callers never write into it (the solver copies it or replaces it).
    """
    key = (seed, d, b, torch.device(device), dtype)
    with _START_LOCK:
        Q = _START_BLOCKS.get(key)
        if Q is not None:
            _START_BLOCKS.move_to_end(key)
            return Q
    g = torch.Generator().manual_seed(seed)
    Q = _orthonormalize(torch.randn(d, b, generator=g, dtype=torch.float32).to(device=device, dtype=dtype))
    with _START_LOCK:
        _lru(_START_BLOCKS, key, lambda: Q, START_BLOCKS_KEPT)
    return Q


def subspace_eigenvectors(
    M: Tensor,
    k: int,
    seed: int = 0,
    n_iter: int = 200,
    oversample: int = 20,
    tol: float = 1e-4,
) -> Tensor | None:
    """Top-k eigenvectors of a symmetric M by subspace iteration; None if not converged in n_iter products.

    # Q <- qr((M - sigma I)^2 Q);  Q^T M Q = U diag(theta) U^T;  v_i = Q u_i;  done: |M v_i - theta_i v_i| <= tol max|theta|

    A block of b = k + oversample vectors from a seeded Gaussian start. Without a shift the wanted
    vectors converge like (|lambda_{b+1}| / lambda_k)^steps, |.| ordering by magnitude, so
    negative eigenvalues near -lambda_k stall it. Once the block holds a negative Ritz value, the
    shift sigma = (theta_{k+1} + theta_min) / 2 centres the unwanted eigenvalues on 0; the rate is
    then max(lambda_{k+1} - sigma, sigma - lambda_min) / (lambda_k - sigma) (e.g. 0.85 instead
    of 0.94 for lambda_k = 0.32, lambda_{k+1} = 0.27, lambda_min = -0.3). Two products per QR: the
    columns' scales drift apart by at most ~(lambda_1 / lambda_k)^2 (~100 for a normalised
    affinity) between re-orthonormalisations, harmless in float32; the spectrum of a normalised
    affinity lies in [-1, 1], so nothing overflows. Every CHECK_EVERY products: Rayleigh-Ritz on
    the block and the residual of each of the top-k Ritz pairs, relative to the largest Ritz
    value (an estimate of |M|). Small residuals only show the pairs are eigenpairs, not the top
    ones: the block also needs a Ritz value closer to sigma than theta_k, i.e. room left after
    the eigenvalues of M - sigma I of larger magnitude.

    Args:
        M: [d, d] symmetric float.
    Returns:
        V: [d, k] orthonormal columns, Ritz values descending, or None.
    """
    d = M.shape[0]
    b = min(d, k + max(oversample, 0))
    Q = _start_block(seed, d, b, M.device, M.dtype)  # Q: [d, b] orthonormal (shared by the calls of one seed and shape)
    Z = M @ Q  # Z: [d, b] = M Q (Q orthonormal): the loop's invariant
    sigma = 0.0
    graphed = _eigen_graphed(M)
    with _EIGEN_LOCK if graphed else contextlib.nullcontext():  # the cached buffers: one caller at a time
        windows = _eigen_windows(M, b) if graphed else None
        if windows is not None:
            Q, Z = windows.load(M, Q, Z)  # work in the cached graph's buffers
        step = 2  # products by M so far
        while True:
            if step % CHECK_EVERY == 0 or step + 2 > n_iter:
                T = (Q.T @ Z).to(device="cpu", dtype=torch.float64)  # T: [b, b] Rayleigh quotient
                with _one_host_thread(M.is_cuda):
                    theta, U = torch.linalg.eigh(0.5 * (T + T.T))  # ascending; tiny, on the CPU (slow on a GPU)
                theta_h = theta.to(M.dtype)  # scalars are read from this host copy, not from the device
                theta, U = theta_h.to(M.device, non_blocking=True), U.to(M.dtype).to(M.device, non_blocking=True)
                V = Q @ U[:, -k:].flip(1)  # V: [d, k] top-k Ritz vectors
                residual = (Z @ U[:, -k:].flip(1) - V * theta[-k:].flip(0)).norm(dim=0)  # [k]
                room = float((theta_h - sigma).abs().min()) < float(theta_h[-k]) - sigma  # see the docstring
                if room and bool((residual <= tol * theta.abs().max()).all()):  # room first: no host read without it
                    return V.contiguous()
                if b > k and float(theta_h[0]) < 0:
                    sigma = 0.5 * (float(theta_h[-k - 1]) + float(theta_h[0]))
            if step + 2 > n_iter:
                return None
            n = min(CHECK_EVERY - step % CHECK_EVERY, n_iter - step) // 2  # QR steps to the next check
            if windows is not None:
                windows.run(n, sigma)
            else:
                for _ in range(n):
                    Q, Z = _qr_step(M, Q, Z, sigma)
            step += 2 * n


def _qr_step(M: Tensor, Q: Tensor, Z: Tensor, sigma: float | Tensor, eye: Tensor | None = None,
             bad: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One step of the subspace iteration: (Q, Z = M Q) -> (Q', M Q'),  Q' = qr((M - sigma I)^2 Q).

    With eye and bad: the orthonormalisation runs on Q's device without host reads
    (``_orthonormalize_on_device``, CUDA-graph safe) and sets bad where it failed.
    """
    Y = Z - sigma * Q  # Y: [d, b] = (M - sigma I) Q
    Y = M @ Y - sigma * Y
    Q = _orthonormalize(Y) if eye is None else _orthonormalize_on_device(Y, eye, bad)
    return Q, M @ Q


def _orthonormalize_on_device(Y: Tensor, eye: Tensor, bad: Tensor) -> Tensor:
    """``_orthonormalize``'s Cholesky QR (twice) with every step on Y's device and no host read.

    # G = Y^T Y = L L^T,  Q = Y L^-T   (twice; G and L in float64)

    The same operations, with the Cholesky factor and its inverse computed on the device instead of
    the host. bad (a 0-dim bool tensor) becomes True when a Cholesky fails or the result is not
    orthonormal to 1e-4 (NaN included): the caller then redoes the step with ``_orthonormalize``.
    eye: [b, b] float64 on Y's device.
    """
    Q = Y
    for _ in range(2):
        Qd = Q.to(torch.float64)
        L, info = torch.linalg.cholesky_ex(Qd.T @ Qd)  # G: [b, b]
        bad.logical_or_(info != 0)
        Q = Q @ torch.linalg.solve_triangular(L, eye, upper=False).T.to(Y.dtype)  # Q: [d, b]
    Qd = Q.to(torch.float64)
    E = Qd.T @ Qd
    E.diagonal().sub_(1.0)  # E = Q^T Q - I
    bad.logical_or_(~(E.abs().amax() <= 1e-4))  # not orthonormal, or NaN
    return Q


EIGEN_CUDA_GRAPHS = True  # on CUDA, run the QR steps between two residual checks as one cached CUDA graph
EIGEN_GRAPH_MAX_D = 16384  # largest d with cached graphs: each keeps a copy of M (float32: 730 MiB at 13824)
EIGEN_GRAPHS_KEPT = 4  # shapes whose graphs stay cached (LRU)


class _EigenWindows:
    """The QR steps between two residual checks of ``subspace_eigenvectors``, as CUDA graphs cached per (d, b).

    At d ~ 500-2000 a step's ~25 small kernels and three host reads (the host Cholesky of
    ``_orthonormalize``) cost far more than their arithmetic. Here the steps between two checks
    run with the Cholesky on the device (``_orthonormalize_on_device``) as one captured graph per
    window length, on buffers that each call copies its M, Q and Z into. One host read per window:
    if any step failed, the window is redone from its start with the host-checked
    ``_orthonormalize``, so no result rests on a failed Cholesky. The first window of a length runs
    eagerly (library handles, workspaces); the next is captured.
    """

    def __init__(self, M: Tensor, b: int):
        d = M.shape[0]
        self.M = torch.empty_like(M)
        self.Q = torch.empty(d, b, dtype=M.dtype, device=M.device)
        self.Z = torch.empty_like(self.Q)
        self.sigma = torch.zeros((), dtype=M.dtype, device=M.device)
        self.eye = torch.eye(b, dtype=torch.float64, device=M.device)
        self.bad = torch.zeros((), dtype=torch.bool, device=M.device)
        self.graphs: dict[int, Optional[torch.cuda.CUDAGraph]] = {}  # window length -> graph (None: warmed up)

    def load(self, M: Tensor, Q: Tensor, Z: Tensor) -> tuple[Tensor, Tensor]:
        self.M.copy_(M), self.Q.copy_(Q), self.Z.copy_(Z)
        return self.Q, self.Z

    def _steps(self, n: int) -> None:
        Q, Z = self.Q, self.Z
        for _ in range(n):
            Q, Z = _qr_step(self.M, Q, Z, self.sigma, self.eye, self.bad)
        self.Q.copy_(Q), self.Z.copy_(Z)

    def _replay(self, n: int) -> None:
        """n steps on the buffers: eager the first time, captured the second, replayed after."""
        if n not in self.graphs:
            self.graphs[n] = None
            self._steps(n)
            return
        graph = self.graphs[n]
        if graph is None:
            graph = self.graphs[n] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._steps(n)
        graph.replay()

    def run(self, n: int, sigma: float) -> None:
        start = (self.Q.clone(), self.Z.clone())
        self.sigma.fill_(sigma)
        self.bad.fill_(False)
        self._replay(n)
        if bool(self.bad):  # the window's one host read
            Q, Z = start
            for _ in range(n):
                Q, Z = _qr_step(self.M, Q, Z, sigma)
            self.Q.copy_(Q), self.Z.copy_(Z)


_EIGEN_WINDOWS: "OrderedDict[tuple, _EigenWindows]" = OrderedDict()  # (device, dtype, d, b) -> windows, LRU
_EIGEN_LOCK = threading.Lock()


def _eigen_graphed(M: Tensor) -> bool:
    """Whether ``subspace_eigenvectors`` runs its QR steps as cached CUDA graphs (``_EigenWindows``)."""
    return M.is_cuda and EIGEN_CUDA_GRAPHS and M.shape[0] <= EIGEN_GRAPH_MAX_D


def _lru(cache: OrderedDict, key: tuple, make, kept: int):
    """cache[key] (made by make() if absent), now the most recently used; at most ``kept`` entries."""
    value = cache.pop(key, None)
    if value is None:
        value = make()
        while len(cache) >= kept:
            cache.popitem(last=False)
    cache[key] = value
    return value


def _eigen_windows(M: Tensor, b: int) -> _EigenWindows:
    """The cached graphs of M's shape and block width b (created if new)."""
    return _lru(_EIGEN_WINDOWS, (M.device, M.dtype, M.shape[0], b), lambda: _EigenWindows(M, b), EIGEN_GRAPHS_KEPT)


def top_eigenvectors(
    M: Tensor,
    k: int,
    seed: int = 0,
    eigh_max_dim: int = 2048,
    n_iter: int = 200,
    oversample: int = 20,
) -> Tensor:
    """Eigenvectors of the k algebraically largest eigenvalues of a symmetric M.

    # M V = V diag(lambda_1..k),  lambda_1 >= ... >= lambda_k

    d <= eigh_max_dim: dense ``torch.linalg.eigh``. Otherwise ``subspace_eigenvectors`` (matmuls
    only, fast on a GPU), falling back to the dense eigh when it has not converged after
    ``n_iter`` products by M (a small eigengap, or negative eigenvalues as large as the wanted ones).
    The defaults (20 extra vectors, 200 products) come from the hardest spectrum we meet, the
    random-weight Vicuna-13B inputs, where lambda_2..lambda_20 lie within 6% of each other: the
    residual check passes after ~100 products at d = 5120 and 13824 (134 with 10 extra vectors),
    where the dense eigh fallback costs 2 s on the H100 at d = 13824.

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
    if d > eigh_max_dim and k + max(oversample, 0) < d:
        V = subspace_eigenvectors(M, k, seed=seed, n_iter=n_iter, oversample=oversample)
        if V is not None:
            return V
    _, vecs = torch.linalg.eigh(M)  # ascending eigenvalues
    return vecs[:, -k:].flip(1).contiguous()


# allocate_bits: channels from which the split groups run in threads. On the H100 host, d = 5120: 21 ms
# serial vs 26 ms in threads; d = 13824: 60 ms serial vs 38 ms in threads.
ALLOC_THREADS_MIN_D = 8192

KMEANS_MAX_ITER = 300  # Lloyd iterations per restart (sklearn's default)
KMEANS_TOL = 1e-4  # stop when sum_j |c_j' - c_j|^2 <= tol * mean feature variance (sklearn's rule)
KMEANS_CHECK_EVERY = 10  # Lloyd iterations between host reads of the convergence flags
KMEANS_CUDA_GRAPHS = True  # on CUDA, run each window of KMEANS_CHECK_EVERY iterations as one CUDA graph


def _sq_dist(P: Tensor, X: Tensor) -> Tensor:
    """Squared Euclidean distances from a few prototypes to all points, from explicit differences.

    # D[m, i] = |p_m - x_i|^2   (torch.cdist without the Gram trick: exactly 0 for equal rows)

    P: [m, f], X: [n, f] -> D: [m, n].
    """
    return torch.cdist(P, X, compute_mode="donot_use_mm_for_euclid_dist").square_()


def _kmeans_plusplus(X: Tensor, k: int, n_init: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding (sklearn's ``_kmeans_plusplus``) of ``n_init`` restarts at once.

    # c_1 ~ U(X);  then 2 + floor(ln k) candidates ~ D^2(x) / sum D^2, keep the one of least sum_i min(D^2, |x_i - cand|^2)

    The uniform draws come from ``generator`` on the CPU (one block, moved once to X's device), so
    the candidates depend only on the seed and on the distances computed on the device. A candidate
    inverts the cumulative D^2, taken in integers: w_i = floor(2^b D_i^2 / max D^2) (b <= 52, the
    sum below 2^62), because a float cumsum on CUDA is not bitwise reproducible while an integer one
    is exact; the draw's resolution is 2^-b of the largest D^2. When every point coincides with a
    chosen centre (duplicates, all D^2 = 0) the candidate is point 0.

    Args:
        X: [n, f] float.
    Returns:
        centres: [n_init, k, f] rows of X.
    """
    n = X.shape[0]
    trials = 2 + int(math.log(k))
    bits = min(52, 62 - n.bit_length())  # n * 2^bits < 2^62
    u0 = torch.rand(n_init, generator=generator, dtype=torch.float64)  # u0: [r] first centre
    u = torch.rand(max(k - 1, 0), n_init, trials, generator=generator, dtype=torch.float64).to(X.device)  # u: [k-1, r, t]
    first = (u0 * n).long().clamp_max_(n - 1).to(X.device)  # first: [r]
    if _graphed(X, KMEANS_MAX_ITER) and k > 1:
        with _LLOYD_LOCK:  # the cached graphs' buffers: one caller at a time
            key = (X.device, X.dtype, *X.shape, k, n_init, trials)
            ids = _lru(_SEEDING_GRAPHS, key, lambda: _SeedingGraph(X, first, u, k, bits), LLOYD_GRAPHS_KEPT).run(X, first, u)
    else:
        ids = _seeding_steps(X, first, u, k, bits)
    return X[ids]


def _seeding_steps(X: Tensor, first: Tensor, u: Tensor, k: int, bits: int) -> Tensor:
    """The k - 1 greedy steps of ``_kmeans_plusplus`` on the device (no host reads: CUDA-graph safe).

    X: [n, f], first: [r] index of each restart's first centre, u: [k-1, r, t] uniform draws.
    Returns ids: [r, k] the rows of X chosen as centres.
    """
    n, n_init, trials = X.shape[0], first.shape[0], u.shape[2]
    ids = torch.empty(n_init, k, dtype=torch.int64, device=X.device)  # ids: [r, k]
    ids[:, 0] = first
    closest = _sq_dist(X[first], X)  # closest: [r, n] = D^2 to the nearest chosen centre
    rows = torch.arange(n_init, device=X.device)
    tiny = torch.finfo(X.dtype).tiny
    for c in range(1, k):
        w = (closest / closest.amax(1, keepdim=True).clamp_min(tiny) * 2.0**bits).long()  # w: [r, n] in [0, 2^bits]
        cum = w.cumsum(1)  # cum: [r, n] exact
        total = cum[:, -1:]  # total: [r, 1]
        target = torch.minimum((u[c - 1] * total).long(), total - 1)  # target: [r, t] in [0, total) (-1 if total = 0)
        cand = torch.searchsorted(cum, target, right=True).clamp_max_(n - 1)  # cand: [r, t] first i with cum_i > target
        dc = torch.minimum(_sq_dist(X[cand.flatten()], X).view(n_init, trials, n), closest.unsqueeze(1))  # dc: [r, t, n]
        best = dc.sum(2).argmin(1)  # best: [r] candidate of least potential (first on ties)
        closest = dc[rows, best]
        ids[:, c] = cand[rows, best]
    return ids


class _SeedingGraph:
    """``_seeding_steps`` captured as one CUDA graph per problem shape (k - 1 steps of about a dozen small kernels).

    Each call copies its points and draws into the graph's buffers; the first call runs eagerly
    (warm-up) and the second captures. The same kernels on the same values: the same centres.
    """

    def __init__(self, X: Tensor, first: Tensor, u: Tensor, k: int, bits: int):
        self.X, self.first, self.u = torch.empty_like(X), torch.empty_like(first), torch.empty_like(u)
        self.k, self.bits = k, bits
        self.warm = False
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.ids: Optional[Tensor] = None

    def run(self, X: Tensor, first: Tensor, u: Tensor) -> Tensor:
        self.X.copy_(X), self.first.copy_(first), self.u.copy_(u)
        if not self.warm:
            self.warm = True
            return _seeding_steps(self.X, self.first, self.u, self.k, self.bits)
        return self.replay().clone()

    def replay(self) -> Tensor:
        """The steps on the buffers; the first call captures them."""
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.ids = _seeding_steps(self.X, self.first, self.u, self.k, self.bits)
        self.graph.replay()
        return self.ids


def _assign(X: Tensor, C: Tensor) -> Tensor:
    """Nearest centre of every point for every restart.

    # label_i = argmin_j |c_j|^2 - 2 x_i . c_j   (|x_i|^2 is common to all j; first j on ties)

    One matmul for all restarts. In float64 on centred points the Gram form's rounding
    (~1e-16 |x| |c|) can only decide between centres at the same distance to ~1e-15.
    X: [n, f], C: [r, k, f] -> labels [r, n] int64.
    """
    r, k, f = C.shape
    Cf = C.reshape(r * k, f)
    scores = torch.addmm(Cf.square().sum(1).unsqueeze(0), X, Cf.T, alpha=-2.0)  # scores: [n, r*k]
    return scores.view(-1, r, k).argmin(2).T  # [r, n]


def _centroids(Xa: Tensor, labels: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Cluster means from a one-hot batched matmul (no atomics: deterministic on CUDA); an empty cluster keeps its centre.

    # c_j = sum_{i: label_i = j} x_i / |{i: label_i = j}|

    Xa: [n, f + 1] points with a column of ones appended, labels: [r, n], C: [r, k, f].
    Returns (centres [r, k, f], counts [r, k]).
    """
    r, k, f = C.shape
    onehot = torch.zeros(r, k, Xa.shape[0], dtype=Xa.dtype, device=Xa.device)
    onehot.scatter_(1, labels.unsqueeze(1), 1.0)  # onehot: [r, k, n]
    sums = torch.bmm(onehot, Xa.expand(r, -1, -1))  # sums: [r, k, f + 1], last column = counts
    counts = sums[..., f]
    means = sums[..., :f] / counts.clamp_min(1.0).unsqueeze(2)
    return torch.where((counts > 0).unsqueeze(2), means, C), counts


def _fill_empty(X: Tensor, labels: Tensor, centers: Tensor, k: int) -> Tensor:
    """Put into every empty cluster the point farthest from its centre among clusters with >= 2 members.

    # i* = argmax_{i : |cluster(i)| >= 2} |x_i - c_{label_i}|^2   (first i on ties)

    X: [n, f], labels: [n] in [0, k), centers: [k, f]; n >= k, so a cluster with >= 2 members
    exists while one is empty. Returns new labels [n] (a copy); empty clusters are filled in
    increasing id order.
    """
    labels = labels.clone()
    dist = (X - centers[labels]).square().sum(1)  # dist: [n]
    counts = torch.bincount(labels, minlength=k)  # counts: [k]
    for c in torch.nonzero(counts == 0).flatten().tolist():
        i = int(torch.argmax(torch.where(counts[labels] > 1, dist, -1.0)))
        counts[int(labels[i])] -= 1
        counts[c] += 1
        labels[i] = c
    return labels


def _lloyd_steps(X: Tensor, Xa: Tensor, C: Tensor, done: Tensor, tol: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """n Lloyd iterations of every restart, in place on C [r, k, f] and done [r]; a done restart keeps its centres.

    tol: 0-dim tensor on X's device. Returns the last iteration's labels [r, n] and cluster sizes
    [r, k]. No host reads (CUDA-graph safe).
    """
    for _ in range(n):
        labels = _assign(X, C)  # labels: [r, n]
        C_new, counts = _centroids(Xa, labels, C)
        shift = (C_new - C).square().sum((1, 2))  # shift: [r]
        C.copy_(torch.where(done.view(-1, 1, 1), C, C_new))
        done.logical_or_(shift <= tol)
    return labels, counts


class _LloydGraph:
    """A window of KMEANS_CHECK_EVERY Lloyd iterations captured as one CUDA graph, for one problem shape.

    The graph reads and writes its own buffers (points, centres, flags, tol); each call copies its
    problem in, so a graph is captured once per shape and process instead of once per call (H100,
    d = 576: 9-16 ms per k-means call capturing every time, about as much as eager launches).
    """

    def __init__(self, X: Tensor, Xa: Tensor, C: Tensor):
        self.X, self.Xa, self.C = torch.empty_like(X), torch.empty_like(Xa), torch.empty_like(C)
        self.done = torch.zeros(C.shape[0], dtype=torch.bool, device=X.device)
        self.tol = torch.zeros((), dtype=X.dtype, device=X.device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: tuple[Tensor, Tensor] = ()  # type: ignore[assignment]

    def load(self, X: Tensor, Xa: Tensor, C: Tensor, tol: float) -> None:
        self.X.copy_(X), self.Xa.copy_(Xa), self.C.copy_(C), self.done.zero_(), self.tol.fill_(tol)

    def replay(self) -> tuple[Tensor, Tensor]:
        """One window on the buffers; the first call (after an eager window: warm-up) captures it."""
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = _lloyd_steps(self.X, self.Xa, self.C, self.done, self.tol, KMEANS_CHECK_EVERY)
        self.graph.replay()
        return self.out


_LLOYD_GRAPHS: "OrderedDict[tuple, _LloydGraph]" = OrderedDict()  # (device, dtype, n, f, r, k) -> graph, LRU
LLOYD_GRAPHS_KEPT = 8  # shapes whose graphs stay captured (a model has ~4 input widths)
_SEEDING_GRAPHS: "OrderedDict[tuple, _SeedingGraph]" = OrderedDict()  # k-means++ graphs, LRU as the Lloyd graphs
_LLOYD_LOCK = threading.Lock()


def _lloyd_graph(X: Tensor, Xa: Tensor, C: Tensor) -> tuple[_LloydGraph, bool]:
    """The cached graph of this shape (created empty if new) and whether it is already captured."""
    key = (X.device, X.dtype, X.shape[0], X.shape[1], KMEANS_CHECK_EVERY, *C.shape)
    g = _lru(_LLOYD_GRAPHS, key, lambda: _LloydGraph(X, Xa, C), LLOYD_GRAPHS_KEPT)
    return g, g.graph is not None


def _graphed(X: Tensor, max_iter: int) -> bool:
    """Whether ``_lloyd`` runs its full windows as a cached CUDA graph."""
    return X.is_cuda and KMEANS_CUDA_GRAPHS and max_iter >= KMEANS_CHECK_EVERY


def _lloyd(X: Tensor, C: Tensor, max_iter: int, tol: float) -> tuple[Tensor, Tensor]:
    """Lloyd iterations for all restarts at once; a restart is frozen once its centre shift is <= tol.

    # labels = argmin_j |x - c_j|^2;  c_j <- mean{x : label = j};  until sum_j |c_j' - c_j|^2 <= tol

    As sklearn's ``_kmeans_single_lloyd`` per restart (the update that meets tol is kept, then a
    final assignment to the final centres), except for empty clusters: an empty cluster keeps its
    centre, and at each check (every KMEANS_CHECK_EVERY iterations, the only host reads) the
    restarts still running that hold an empty cluster get ``_fill_empty`` and their centres
    recomputed. Freezing makes the result independent of how often the flags are read (when no
    cluster empties). On CUDA the full windows run as one CUDA graph (KMEANS_CUDA_GRAPHS), captured
    once per shape (``_LloydGraph``, after one eager window the first time): one launch instead of
    ~20 small kernels per iteration, the same kernels on the same values.

    Args:
        X: [n, f], C: [r, k, f] initial centres, tol: absolute tolerance on the summed squared shift.
    Returns:
        (labels [r, n], centres [r, k, f]).
    """
    k = C.shape[1]
    Xa = torch.cat([X, torch.ones_like(X[:, :1])], 1)  # Xa: [n, f + 1]
    graphed = _graphed(X, max_iter)
    with _LLOYD_LOCK if graphed else contextlib.nullcontext():  # the cached graphs' buffers: one caller at a time
        graph, captured = None, False
        if graphed:
            graph, captured = _lloyd_graph(X, Xa, C)
            graph.load(X, Xa, C, tol)
            X, Xa, C, done, tol_t = graph.X, graph.Xa, graph.C, graph.done, graph.tol  # work in the graph's buffers
        else:
            C = C.clone()  # C: [r, k, f] centres, updated in place (a frozen restart's stay as they are)
            done = torch.zeros(C.shape[0], dtype=torch.bool, device=X.device)
            tol_t = torch.tensor(tol, dtype=X.dtype, device=X.device)
        it = 0
        while True:
            n = min(KMEANS_CHECK_EVERY, max_iter - it)
            if graph is not None and n == KMEANS_CHECK_EVERY and (captured or it > 0):
                labels, counts = graph.replay()
            else:
                labels, counts = _lloyd_steps(X, Xa, C, done, tol_t, n)
            it += n
            flags = torch.stack([done, (counts == 0).any(1)]).cpu()  # flags: [2, r] (the one host read)
            keep = torch.nonzero(~flags[0]).flatten()  # keep: restarts still running
            if keep.numel() == 0 or it >= max_iter:
                break
            for j in keep[flags[1][keep]].tolist():  # running restarts with an empty cluster
                C[j] = _centroids(Xa, _fill_empty(X, labels[j], C[j], k).unsqueeze(0), C[j : j + 1])[0][0]
        return _assign(X, C), C.clone()


def kmeans(X: Tensor, k: int, seed: int = 0, n_init: int = 4, *, finite_checked: bool = False) -> Tensor:
    """k-means (k-means++ init, Lloyd, ``n_init`` restarts run as one batch) with no empty cluster.

    # argmin_labels sum_i |x_i - c_{label_i}|^2

    Written here rather than sklearn because on the GPU host sklearn took 1.6 s per call (4 calls
    per decoder layer); this runs on the device with no host round trips per iteration (the
    convergence flags are read every KMEANS_CHECK_EVERY iterations). Follows sklearn's ``KMeans``:
    greedy k-means++ (``_kmeans_plusplus``), Lloyd (``_lloyd``) to a summed squared centre shift
    <= KMEANS_TOL * mean feature variance or KMEANS_MAX_ITER iterations, on the points centred on
    their mean; the restart of least inertia wins (the first on ties); then ``_fill_empty``
    (clusters left empty by duplicate points) and ids in order of first appearance.

    Float64 on every device: the work is O(n k f) per iteration (tiny), and float64 keeps the
    argmin near-ties and the inertia comparison free of float32 rounding, so CPU and CUDA agree
    up to the summation order of the matmuls. Deterministic for a seed on a given device (random
    draws from a CPU ``torch.Generator``; one-hot matmuls instead of atomic scatter-adds).

    Args:
        X: [n, f] points (n >= k).
    Returns:
        labels: [n] int64 in [0, k) on X's device, every cluster non-empty, ids in order of first appearance.
    """
    if X.dim() != 2:
        raise ValueError(f"X must be [n, f], got {tuple(X.shape)}")
    n = X.shape[0]
    _check_k(n, k)
    if not finite_checked:  # (a host read) spectral_cluster's embedding comes from a checked M: finite
        _check_finite("X", X)
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    if k == 1:
        return torch.zeros(n, dtype=torch.int64, device=X.device)
    X = X.detach().to(torch.float64)
    X = X - X.mean(0)  # as sklearn: centring keeps |c|^2 - 2 x.c well conditioned
    tol = KMEANS_TOL * float(X.var(0, unbiased=False).mean())  # tol: absolute, on sum_j |shift_j|^2
    C0 = _kmeans_plusplus(X, k, n_init, torch.Generator().manual_seed(seed))  # C0: [r, k, f]
    labels, C = _lloyd(X, C0, KMEANS_MAX_ITER, tol)  # labels: [r, n], C: [r, k, f]
    inertia = (X - C.gather(1, labels.unsqueeze(2).expand(-1, -1, X.shape[1]))).square().sum((1, 2))  # [r]
    best = int(torch.argmin(inertia))
    return _canonical(_fill_empty(X, labels[best], C[best], k), k)


def silhouette_score(X: Tensor, labels: Tensor, max_samples: int = 2048, seed: int = 0, *,
                     finite_checked: bool = False) -> float:
    """Mean silhouette (Euclidean, as sklearn's) over a random subsample of at most ``max_samples`` points.

    # s_i = (b_i - a_i) / max(a_i, b_i);  a_i = sum_{own} d_ij / (n_own - 1), b_i = min_{c != own} mean_{j in c} d_ij

    The subsample (``np.random.RandomState(seed)``, as sklearn's ``sample_size``) is both the points
    and the reference set. nan when it holds fewer than 2 clusters or as many clusters as points.
    As sklearn, s_i = 0 for a point alone in its cluster (and where a_i = b_i = 0). Runs on X's
    device in float64; exact pairwise distances (``torch.cdist`` without the Gram trick), per-cluster
    sums by a one-hot matmul (deterministic).

    Args:
        X: [n, f], labels: [n] int64.
    """
    if X.dim() != 2 or labels.dim() != 1 or labels.shape[0] != X.shape[0]:
        raise ValueError(f"X [n, f] and labels [n] mismatch: {tuple(X.shape)} vs {tuple(labels.shape)}")
    if not finite_checked:  # as in kmeans
        _check_finite("X", X)
    n = X.shape[0]
    idx = np.random.RandomState(seed).permutation(n)[:max_samples] if n > max_samples else np.arange(n)
    sel = torch.from_numpy(idx).to(X.device)
    _, lab = torch.unique(labels.to(X.device)[sel], return_inverse=True)  # lab: [m] in [0, c)
    m, c = idx.size, int(lab.max()) + 1
    if not 2 <= c < m:
        return float("nan")
    Xs = X.detach()[sel].to(torch.float64)  # Xs: [m, f]
    D = torch.cdist(Xs, Xs, compute_mode="donot_use_mm_for_euclid_dist")  # D: [m, m]
    onehot = torch.zeros(m, c, dtype=torch.float64, device=X.device).scatter_(1, lab.unsqueeze(1), 1.0)
    sums = D @ onehot  # sums: [m, c] = sum of distances to each cluster
    counts = onehot.sum(0)  # counts: [c] (all >= 1)
    own = lab.unsqueeze(1)
    a = sums.gather(1, own).squeeze(1) / (counts[lab] - 1).clamp_min(1.0)  # a: [m]
    b = (sums / counts).scatter(1, own, math.inf).amin(1)  # b: [m]
    s = (b - a) / torch.maximum(a, b)
    s = torch.where((counts[lab] > 1) & (torch.maximum(a, b) > 0), s, 0.0)
    return float(s.mean())


def spectral_cluster(
    affinity: Tensor,
    n_groups: int,
    seed: int = 0,
    *,
    eigh_max_dim: int | None = None,
    n_iter: int = 200,
    oversample: int = 20,
    n_init: int = 4,
    silhouette_samples: int = 2048,
) -> Grouping:
    """Normalised spectral clustering (Ng-Jordan-Weiss) of channels from an MI affinity.

    # M = D^-1/2 (A + eps) D^-1/2,  D = diag((A + eps) 1);  rows of top-k eigvecs of M -> k-means

    Steps: symmetrise, clamp >= 0 and zero the diagonal of A (self-affinity unused; binned MI puts
    entropies there); add eps = 1e-3 * mean(A) (1 if A == 0) to every entry so isolated /
    zero-degree channels are still connected; top-n_groups eigenvectors (``top_eigenvectors``:
    dense eigh for d <= eigh_max_dim (default 512 on the CPU, 256 on a GPU), subspace iteration
    with a residual check above, eigh if it does not converge); row-normalise; k-means
    (``kmeans``). The silhouette is computed in that row-normalised spectral embedding on a random
    subsample of at most ``silhouette_samples`` channels (deterministic from seed).

    Args:
        affinity: [d, d] symmetric, non-negative (e.g. gaussian_mi output).
    Returns:
        Grouping with labels [d] (every group non-empty) and silhouette (nan if n_groups == 1).
    """
    if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"affinity must be square [d, d], got {tuple(affinity.shape)}")
    d = affinity.shape[0]
    _check_k(d, n_groups)
    device = affinity.device
    A = affinity.to(torch.float32)
    asym = A - A.T  # asym: [d, d] (the only transposed pass; matters for d ~ 1e4 on CPU)
    finite, lo, hi, alo, ahi = torch.stack([torch.isfinite(affinity).all().float(), *torch.aminmax(A),
                                            *torch.aminmax(asym)]).tolist()  # one host read
    if not finite:
        raise ValueError("affinity contains NaN or Inf")
    if n_groups == 1:
        return Grouping(torch.zeros(d, dtype=torch.int64, device=device), float("nan"))
    amax = max(hi, -lo)
    if lo < -1e-6 * amax - 1e-12:
        raise ValueError("affinity must be non-negative")
    if max(ahi, -alo) > 1e-4 * amax + 1e-6:
        raise ValueError("affinity must be symmetric")
    A = torch.sub(A, asym, alpha=0.5).clamp_min_(0.0)  # A: [d, d] = (A + A^T) / 2, a fresh tensor
    del asym
    A.fill_diagonal_(0.0)
    mean = A.mean().double()  # on the device: no host read
    A.add_(torch.where(mean > 0, 1e-3 * mean, 1.0))  # eps = 1e-3 mean(A) (1 if A == 0)
    s = A.sum(1).rsqrt()  # s: [d] = D^-1/2 (degrees >= d * eps > 0)
    A.mul_(s[:, None]).mul_(s[None, :])  # A is now M: [d, d]
    if eigh_max_dim is None:  # a dense eigh is cheap on the CPU but slow on a GPU, where matmuls are cheap
        # (H100, SmolLM2: 2048 would be faster, 6 vs 7-20 ms at d = 576, but moves the labels and with
        # them the perplexities, e.g. seed 0 wikitext2 51.24 -> 56.25: the published results keep 256)
        eigh_max_dim = 512 if device.type == "cpu" else 256
    V = top_eigenvectors(A, n_groups, seed=seed, eigh_max_dim=eigh_max_dim, n_iter=n_iter, oversample=oversample)
    del A
    # k-means and the silhouette run where the embedding lives (batched restarts, few host reads).
    Y = V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)  # Y: [d, k] row-normalised embedding
    # Y is finite: M passed top_eigenvectors' check, its eigenvectors are finite, rows are clamped away from 0.
    labels = kmeans(Y, n_groups, seed=seed, n_init=n_init, finite_checked=True)
    sil = silhouette_score(Y, labels, max_samples=silhouette_samples, seed=seed, finite_checked=True)
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
# quantisation error per channel and width
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


COLUMN_ERRORS_BLOCK = 1 << 18  # elements per row block of column_errors on the CPU (1 MiB of float32)
COLUMN_ERRORS_BATCH = 1 << 24  # on a GPU, widths x rows x columns up to which every width is computed at once (64 MiB of float32 per buffer)


def _batch_widths(device: torch.device, n: int) -> bool:
    """Whether ``column_errors`` computes every width at once: on a GPU, for n = widths x rows x columns
    up to COLUMN_ERRORS_BATCH (the CPU keeps its cache-sized row blocks)."""
    return device.type != "cpu" and n <= COLUMN_ERRORS_BATCH


def column_errors(
    W: Tensor,
    h_diag: Tensor,
    labels: Tensor,
    n_groups: int,
    bit_choices: list[int],
    keep_mask: Tensor | None = None,
    sym: bool = False,
    row_splits: Sequence[int] | None = None,
) -> Tensor:
    """Hessian-diagonal-weighted quantisation error of each input channel at each width.

    # E[j, b] = h_j sum_r (W_rj - q_b(W_rj))^2,  q_b: grid of quant.group_grid(W, labels, [b] * n_groups, sym)

    The grid of each (row, group) spans the group's columns of that row (and 0): the static grids
    SparseGPT gets from ``quant.group_grid`` when the whole group has width b. Width 16 =
    unquantised (0). With keep_mask, pruned weights are left out of the sum only; the grid range
    still covers the dense W. A group's error is the sum of its columns' errors. Computed in
    float32, summed in float64.

    ``row_splits`` (the row counts of sub-layers stacked in W, e.g. q/k/v, which share labels and
    h): one pass over the stacked rows and one sum per sub-layer, bitwise each sub-layer's own call
    (every row's grid and errors depend on that row alone; each sum runs on a contiguous slice).

    Args:
        W: [out, in]; h_diag: [in] (>= 0); labels: [in] int64 in [0, n_groups);
        keep_mask: [out, in] bool or None; row_splits: positive ints adding up to out, or None.
    Returns:
        errors: [in, len(bit_choices)] float64, or [len(row_splits), in, len(bit_choices)] with row_splits.
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
    if keep_mask is not None and (keep_mask.shape != W.shape or keep_mask.dtype != torch.bool):
        raise ValueError(f"keep_mask must be bool [{out_f}, {in_f}], got {keep_mask.dtype} {tuple(keep_mask.shape)}")
    bits = _check_bits(bit_choices)
    splits = [out_f] if row_splits is None else [int(r) for r in row_splits]
    if row_splits is not None and (any(r < 1 for r in splits) or sum(splits) != out_f):
        raise ValueError(f"row_splits must be positive row counts adding up to {out_f}, got {row_splits}")
    if in_f > 0:  # one host read for all the checks (each read waits for the device)
        lab_lo, lab_hi, w_ok, h_ok, h_lo = torch.stack([t.double().to(W.device) for t in (
            labels.min(), labels.max(), torch.isfinite(W).all(), torch.isfinite(h_diag).all(), h_diag.min())]).tolist()
        if lab_lo < 0 or lab_hi >= n_groups:
            raise ValueError(f"labels must lie in [0, {n_groups})")
        if not w_ok:
            raise ValueError("W contains NaN or Inf")
        if not h_ok:
            raise ValueError("h_diag contains NaN or Inf")
        if h_lo < 0:
            raise ValueError("h_diag must be non-negative")

    device = W.device
    Wf = W.to(torch.float32)  # Wf: [out, in]
    lab = labels.to(device=device, dtype=torch.int64)
    h_row = h_diag.to(device=device, dtype=torch.float32)[None, :]  # h_row: [1, in]
    errors = torch.zeros(len(splits), in_f, len(bits), dtype=torch.float64, device=device)  # [S, in, C]
    widths = [(c, b) for c, b in enumerate(bits) if b < quant.NO_QUANT_BITS]  # width 16: error 0
    if not widths or out_f == 0 or in_f == 0:
        return errors if row_splits is not None else errors[0]
    xmin, xmax = quant.group_ranges(Wf, lab, n_groups)  # [out, n_groups]: the same for every width
    # The grids of every width at once (elementwise: the values group_scales gives width by width).
    maxq_w = torch.tensor([2.0 ** b - 1 for _, b in widths], dtype=torch.float32).to(device, non_blocking=True)
    scale_w, zero_w = quant.scales_from_ranges(xmin, xmax, maxq_w, sym)  # [widths, out, n_groups]
    # Row blocks small enough to stay in the CPU caches (one block per sub-layer on a GPU). Every
    # element gets the float32 operations of quant.quantize on quant.group_grid's grid, and the
    # float64 sum over the rows runs on the sub-layer's whole matrix (as sum(dtype=float64) does
    # after converting it): bitwise equal. One sub-layer at a time, so the scratch is the widest
    # sub-layer's (Vicuna-13B gate/up: 0.57 GB of float64 rather than 1.1 GB for the stack).
    bounds = [0, *itertools.accumulate(splits)]  # sub-layer s: rows bounds[s]:bounds[s + 1]
    widest = max(splits)
    sq = torch.empty(widest, in_f, dtype=torch.float64, device=device)  # sq: [rows, in] weighted squared errors
    if _batch_widths(device, len(widths) * out_f * in_f):
        # Small layers on a GPU: the elementwise work of every width and row at once (launches, not
        # arithmetic, cost there), then each sum on sq as below: the same values, the same reductions.
        s, z = scale_w.index_select(2, lab), zero_w.index_select(2, lab)  # s, z: [widths, out, in]
        t = torch.div(Wf, s)  # q = s (clamp(round(W / s) + z, 0, maxq) - z)
        t.round_().add_(z).clamp_(min=0.0)
        torch.minimum(t, maxq_w[:, None, None], out=t)
        t.sub_(z).mul_(s)
        torch.sub(Wf, t, out=t)
        t.mul_(t)  # (W - q)^2
        t.mul_(h_row if keep_mask is None else h_row * keep_mask)  # h_j [kept]
        for i_s, (first, end) in enumerate(zip(bounds, bounds[1:])):
            for i in range(len(widths)):
                sq[:end - first].copy_(t[i, first:end])
                errors[i_s, :, widths[i][0]] = sq[:end - first].sum(0)
        return errors if row_splits is not None else errors[0]
    block = widest if device.type != "cpu" else max(1, COLUMN_ERRORS_BLOCK // in_f)
    t_buf = torch.empty(min(block, widest), in_f, dtype=torch.float32, device=device)  # scratch: [block, in]
    s_buf, z_buf = torch.empty_like(t_buf), torch.empty_like(t_buf)
    w_buf = h_row if keep_mask is None else torch.empty_like(t_buf)
    for i_s, (first, end) in enumerate(zip(bounds, bounds[1:])):
        for i, (c, b) in enumerate(widths):
            scale_g, zero_g, maxq = scale_w[i], zero_w[i], 2.0 ** b - 1  # [out, n_groups], float(maxq)
            for r0 in range(first, end, block):
                r1 = min(r0 + block, end)
                n = r1 - r0
                s, z, t, x = s_buf[:n], z_buf[:n], t_buf[:n], Wf[r0:r1]  # [n, in]
                torch.index_select(scale_g[r0:r1], 1, lab, out=s)  # the grids group_grid gathers
                torch.index_select(zero_g[r0:r1], 1, lab, out=z)
                torch.div(x, s, out=t)  # q = s (clamp(round(W / s) + z, 0, maxq) - z)
                t.round_().add_(z).clamp_(0.0, maxq).sub_(z).mul_(s)
                torch.sub(x, t, out=t)
                t.mul_(t)  # (W - q)^2
                if keep_mask is None:
                    t.mul_(h_row)
                else:
                    torch.mul(h_row, keep_mask[r0:r1], out=w_buf[:n])  # h_j [kept]
                    t.mul_(w_buf[:n])
                sq[r0 - first:r1 - first].copy_(t)
            errors[i_s, :, c] = sq[:end - first].sum(0)
    return errors if row_splits is not None else errors[0]


# ----------------------------------------------------------------------------------------------
# bit allocation
# ----------------------------------------------------------------------------------------------


def _min_error_by_cost(costs: np.ndarray, errors: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """One width per group, minimum summed error at every exact total cost (multiple-choice knapsack).

    # dp_h[x] = min_c dp_{h-1}[x - costs[h, c]] + errors[h, c],  dp_0 = [0, inf, inf, ...]

    numpy on the host: H * C shifted adds over cap + 1 costs (a few ms at d = 13824), where torch's
    per-op overhead on a many-threaded host made the same loop ten times slower. Every array is
    allocated once: on the H100 host each fresh [cap + 1] array cost page faults (np.full took
    ~170 us), and threads running knapsacks then queued on the kernel's memory-map lock.

    Args:
        costs: [H, C] int64 >= 0; errors: [H, C] float64; cap: largest total cost kept.
    Returns:
        dp: [cap + 1] float64 (inf where no combination costs exactly x); choice: [H, cap + 1] int8
        width index of group h in the best combination of groups 0..h at each cost.
    """
    H, C = costs.shape
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    best = np.empty(cap + 1)  # best: [cap + 1] the next dp; dp and best swap after each group
    choice = np.zeros((H, cap + 1), dtype=np.int8)  # C <= len(VALID_BITS) widths
    cand = np.empty(cap + 1)  # cand: [cap + 1] the cost of one width, reused
    better = np.empty(cap + 1, dtype=bool)
    for h in range(H):
        best.fill(np.inf)
        for c in range(C):
            w = int(costs[h, c])
            if w > cap:
                continue
            cand[:w] = np.inf
            np.add(dp[: cap + 1 - w], errors[h, c], out=cand[w:])
            np.less(cand, best, out=better)  # strict: ties keep the first (narrowest) width
            np.copyto(choice[h], c, where=better)
            np.minimum(best, cand, out=best)
        dp, best = best, dp
    return dp, choice


def _knapsack_tables_all(costs: np.ndarray, errors: np.ndarray, cap: int,
                         device: torch.device) -> tuple[Tensor, Tensor]:
    """``_min_error_by_cost`` of every group's complement at once, for S error tables, as torch ops on ``device``.

    # dp_g = knapsack over the groups h != g, in increasing h (row g skips its own step)
    # step h: cand[s, g, c, x] = dp[s, g, x - costs[h, c]] + errors[s, h, c];  dp[s, g, x] <- min_c cand[s, g, c, x]

    Row (s, g) of an [S, G, cap + 1] table runs the same float64 additions and minima as
    ``_min_error_by_cost(costs[others], errors[s, others], cap)`` with others = [h != g], so the
    tables are bitwise equal: a minimum is exact whatever the order, and the first width of least
    error wins as there (strict comparisons keep the narrowest). Each group's step is a few tensor
    ops over all tables, rows and widths (the shifted reads as one gather), not a loop over widths;
    the S tables (sub-layers sharing one grouping, hence the same costs) cost the launches of one.

    Args: costs: [G, C] int64; errors: [S, G, C] float64.
    Returns dp: [S, G, cap + 1] float64 and choice: [S, G, G, cap + 1] int8 on ``device``, choice[s, g, h]
    the width index of group h in row (s, g)'s best combinations (choice[s, g, g] unused).
    """
    S, G, C = errors.shape
    x = torch.arange(cap + 1, device=device)
    shift = x - torch.from_numpy(np.ascontiguousarray(costs)).to(device, non_blocking=True).unsqueeze(2)  # [G, C, cap+1] = x - cost
    err = torch.from_numpy(np.ascontiguousarray(errors, dtype=np.float64)).to(device, non_blocking=True)  # [S, G, C]
    above = shift < 0  # above: [G, C, cap + 1] costs above x (all of x for a width above cap)
    shift = shift.clamp_(min=0)
    dp = torch.full((S, G, cap + 1), math.inf, dtype=torch.float64, device=device)
    dp[:, :, 0] = 0.0
    choice = torch.empty(S, G, G, cap + 1, dtype=torch.int8, device=device)
    for h in range(G):
        cand = dp[:, :, shift[h]].add_(err[:, h].view(S, 1, C, 1))  # cand: [S, G, C, cap + 1]
        cand.masked_fill_(above[h], math.inf)
        best, c = cand.min(dim=2)  # best: [S, G, cap + 1]; c: the first width of least error
        choice[:, :, h] = c  # (cast to int8 in the copy)
        best[:, h] = dp[:, h]  # row h leaves its own group out
        dp = best
    return dp, choice


SPLIT_SEARCH_CHUNK = 1 << 23  # elements per [S, G, P, W] tensor of _best_splits_all (64 MiB of float64); above: one table at a time


def _best_splits_all(dp: Tensor, Es: np.ndarray, col_errs: Sequence[np.ndarray], lab: np.ndarray, sizes: np.ndarray,
                     bits: np.ndarray, pairs: np.ndarray, lo: float, hi: float, target: float, d: int) -> Tensor:
    """The accepted split of least error of each table, every (split group, pair of widths, total) at once on dp's device.

    # err(g, a, b, x) = dp_g[x] + E[g, a] - saved_g,ab[m(x)],  m(x) = clip(floor((hi - x - n_g b_a) / (b_b - b_a)), 0, n_g)
    # accepted: lo <= x + n_g b_a + m(x) (b_b - b_a) <= hi,  x in the window [lo - n_g b_b, hi - n_g b_a] of [0, cap_g]

    The window pass of ``allocate_bits_many``'s host search, with the same float64 operations on
    the same values (so bitwise the same candidates): the per-group loop and its per-pair
    candidates become tensors [S, G, P, W] (W: the widest window, narrower ones padded with their
    last x, as there). The cumulative gains (``saved``) are summed on the host in numpy's order.
    Ties go to the first group, pair and x, as there.

    Args: dp: [S, G, cap + 1] knapsack tables (``_knapsack_tables_all``); Es: [S, G, C]; col_errs: S x [d, C]
    (ascending widths); lab: [d]; sizes: [G]; bits: [C] ascending; pairs: [P, 2] (a < b).
    Returns: [S, 4] float64 on dp's device: found (1/0), g * P + pair index, x, m of each table's best split.
    """
    device = dp.device
    S, G, _ = dp.shape
    A, B = pairs[:, 0], pairs[:, 1]
    n_max = int(sizes.max())
    # saved[s, g, p, m]: error saved by moving group g's m channels of largest gain a -> b (numpy's cumsum order).
    order = np.argsort(lab, kind="stable")
    slot = np.arange(d) - np.concatenate([[0], np.cumsum(sizes)])[lab[order]]  # position of each column in its group
    P = len(pairs)
    saved = np.zeros((S, G, n_max + 1, P))
    for s, col_err in enumerate(col_errs):
        neg = np.full((G, n_max, P), np.inf)  # -(gain), padded with +inf (sorted last)
        neg[lab[order], slot] = -(col_err[order][:, A] - col_err[order][:, B])
        np.cumsum(-np.sort(neg, axis=1), axis=1, out=saved[s, :, 1:])  # descending gains, summed in order

    caps = math.floor(target + 0.01 * d) - sizes * int(bits[0])  # caps: [G] most bits the other groups may take
    ok = caps >= 0  # a group whose split leaves the others no bits is no candidate
    capc = np.maximum(caps, 0)[:, None]
    xs = np.clip(np.ceil(lo - sizes[:, None] * bits[B][None, :]), 0, capc)  # xs, xe: [G, P] accepted x lie in [xs, xe]
    xe = np.clip(np.floor(hi - sizes[:, None] * bits[A][None, :]), 0, capc)
    W = int((xe - xs)[ok].max()) + 1
    # Every host array in one copy to the device (float64: all are integers below 2^53 or float64 already).
    parts = [xs, xe, sizes[:, None] * bits[A][None, :], (bits[B] - bits[A]).astype(np.float64), sizes, ok, Es[:, :, A],
             saved.transpose(0, 1, 3, 2)]
    flat = torch.from_numpy(np.concatenate([np.ravel(a).astype(np.float64) for a in parts])).to(device, non_blocking=True)
    xs_t, xe_t, off_t, step_t, n_t, ok_t, E_a, saved_t = (v.view(a.shape) for v, a in zip(flat.split([a.size for a in parts]), parts))
    xi = torch.minimum(xs_t[..., None] + torch.arange(W, device=device, dtype=torch.float64), xe_t[..., None])  # xi: [G, P, W]
    base = xi + off_t[..., None]  # base: [G, P, W] bits before the split (x + n_g b_a)
    m = torch.minimum(torch.floor((hi - base) / step_t[:, None]).clamp_(min=0.0), n_t[:, None, None])  # m: most channels keeping the total <= hi
    total = base + m * step_t[:, None]
    miss = torch.where((total >= lo) & (total <= hi), 0.0, (total - target).abs())  # miss: [G, P, W]
    miss = torch.where((total <= target + 0.01 * d) & (ok_t[:, None, None] > 0), miss, math.inf)
    xi_l, m_l = xi.long(), m.long()
    out = []
    per = max(1, SPLIT_SEARCH_CHUNK // max(1, G * P * W))  # tables per chunk
    for s0 in range(0, S, per):
        n = min(S, s0 + per) - s0
        dp_x = dp[s0:s0 + n].gather(2, xi_l.view(1, G, -1).expand(n, -1, -1)).view(n, G, P, W)  # dp_x: [n, G, P, W]
        miss_s = torch.where(dp_x < math.inf, miss, math.inf)
        err = (dp_x + E_a[s0:s0 + n, :, :, None]) - saved_t[s0:s0 + n].gather(3, m_l.expand(n, -1, -1, -1))
        best_x = torch.where(miss_s == miss_s.amin(3, keepdim=True), err, math.inf).argmin(3, keepdim=True)  # [n, G, P, 1]
        accepted = (miss_s.gather(3, best_x) == 0).view(n, G * P)  # the best x of each (g, p) is accepted
        err_ok = torch.where(accepted, err.gather(3, best_x).view(n, G * P), math.inf)
        first = (accepted & (err_ok == err_ok.amin(1, keepdim=True))).to(torch.uint8).argmax(1)  # first: [n] least error, first (g, p)
        at = best_x.view(n, G * P).gather(1, first[:, None]).squeeze(1)  # at: [n] its x
        out.append(torch.stack([accepted.any(1).double(), first.double(),
                                xi.view(G * P, W)[first, at], m.view(G * P, W)[first, at]], 1))
    return torch.cat(out) if len(out) > 1 else out[0]


def allocate_bits(col_errors: Tensor, labels: Tensor, bit_choices: list[int], target_avg: float,
                  device: torch.device | str | None = None) -> BitAllocation:
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

    Cost: G knapsacks of G - 1 groups over ~target * d costs, O(G^2 * C * target * d) vector work,
    in numpy on the host with all (a, b, m) candidates of a split group at once. ``device`` (a
    CUDA device): the knapsacks run there, all G as one table (``_knapsack_tables_all``, bitwise
    the same tables), and so does the search over split groups, pairs and totals
    (``_best_splits_all``, bitwise the host's window pass); the host backtracks the winner, and
    searches itself only when no total is accepted.
    Guarantee: avg <= target + 0.01; |avg - target| <= 0.01 whenever one channel's step between
    consecutive widths is <= 0.02 * d bits (e.g. d >= 400 with an 8 -> 16 step).

    Args:
        col_errors: [d, len(bit_choices)] float (``column_errors``); labels: [d] int64, groups
        0..G-1 all non-empty; target_avg: in [min, max] of bit_choices; device: where the knapsacks
        run as one torch table (None: numpy on the host, one knapsack per group).
    """
    return allocate_bits_many([col_errors], labels, bit_choices, target_avg, device)[0]


def allocate_bits_many(col_errors: Sequence[Tensor] | Tensor, labels: Tensor, bit_choices: list[int], target_avg: float,
                       device: torch.device | str | None = None) -> list[BitAllocation]:
    """``allocate_bits`` of several column-error tables that share ``labels`` (the sub-layers of one input).

    Each result is bitwise that table's own ``allocate_bits``; with ``device``, the knapsack tables and
    the split search of all of them are one torch computation (``_knapsack_tables_all``,
    ``_best_splits_all``: one set of launches and two host reads instead of a set per sub-layer).
    col_errors: S tensors [d, C] (or one [S, d, C]).
    """
    bits_in = _check_bits(bit_choices)
    if labels.dim() != 1 or labels.is_floating_point() or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty integer tensor [d], got {labels.dtype} {tuple(labels.shape)}")
    d = labels.shape[0]
    # On the host: one copy of a stacked [S, d, C] tensor (S views of it), one per tensor of a list.
    col_errors = list(col_errors.detach().cpu()) if isinstance(col_errors, Tensor) else [t.detach().cpu() for t in col_errors]
    for t in col_errors:
        if t.shape != (d, len(bits_in)):
            raise ValueError(f"col_errors must be [{d}, {len(bits_in)}], got {tuple(t.shape)}")
        _check_finite("col_errors", t)
    if not math.isfinite(target_avg):
        raise ValueError(f"target_avg must be finite, got {target_avg}")
    if not min(bits_in) <= target_avg <= max(bits_in):
        raise ValueError(f"target_avg {target_avg} outside [min, max] of bit_choices = [{min(bits_in)}, {max(bits_in)}]")
    lab = labels.detach().cpu().to(torch.int64).numpy()  # lab: [d]
    if int(lab.min()) < 0:
        raise ValueError("labels must be non-negative")
    G = int(lab.max()) + 1
    sizes = np.bincount(lab, minlength=G)  # sizes: [G]
    if not bool((sizes > 0).all()):
        raise ValueError(f"every group 0..{G - 1} must be non-empty, sizes {sizes.tolist()}")

    order = sorted(range(len(bits_in)), key=lambda c: bits_in[c])
    bits = np.array([bits_in[c] for c in order], dtype=np.int64)  # bits: [C] ascending
    col_errs = [t.to(torch.float64).numpy()[:, order] for t in col_errors]  # S x col_err: [d, C]
    Es = np.zeros((len(col_errs), G, len(order)))  # Es[s]: [G, C] summed column errors of each group at each width
    for E_s, col_err in zip(Es, col_errs):
        np.add.at(E_s, lab, col_err)
    costs = sizes[:, None] * bits[None, :]  # costs: [G, C] bits of a whole group at each width
    target = target_avg * d  # total bits asked for
    lo, hi = target - 0.01 * d, target + min(0.5, 0.01 * d)  # accepted totals
    pairs = np.array(list(itertools.combinations(range(len(order)), 2)), dtype=np.int64).reshape(-1, 2)  # [P, 2]
    A, B = pairs[:, 0], pairs[:, 1]
    step = (bits[B] - bits[A]).astype(np.float64)  # step: [P] bits per moved channel
    members = np.argsort(lab, kind="stable")  # the columns of each group, ascending, group after group
    starts = np.concatenate([[0], np.cumsum(sizes)])

    dp_all, choice_all, found = None, None, None
    max_cap = math.floor(target + 0.01 * d) - int(sizes.min()) * int(bits[0])  # the largest cap (the smallest split group)
    if device is not None and len(pairs) and max_cap >= 0:
        # The knapsack tables and the accepted split of least error of every table on the device; the host
        # reads the splits and the choice tables (dp only for a table with no accepted split: the fallback).
        dp_all, choice_t = _knapsack_tables_all(costs, Es, max_cap, torch.device(device))  # [S, G, cap + 1], [S, G, G, cap + 1]
        found = _best_splits_all(dp_all, Es, col_errs, lab, sizes, bits, pairs, lo, hi, target, d).cpu().numpy()  # [S, 4]
        choice_all = choice_t.cpu().numpy()

    def finish(col_err: np.ndarray, best: Optional[tuple]) -> BitAllocation:
        """The allocation of a best (miss, error, g, a, b, x, m, others, knapsack choice), or of none."""
        width = np.zeros(G, dtype=np.int64)  # width: [G] index into bits (all 0 when there is one width)
        new_labels = lab.copy()
        split_bits: list[int] = []
        if best is not None:
            _, _, g, a, b, x_left, m_g, others, choice = best
            for i in range(len(others) - 1, -1, -1):  # backtrack the knapsack
                width[others[i]] = choice[i, x_left]
                x_left -= int(costs[others[i], width[others[i]]])
            cols = members[starts[g]:starts[g + 1]]
            width[g] = b if m_g == cols.size else a
            if 0 < m_g < cols.size:
                moved = cols[np.argsort(-(col_err[cols, a] - col_err[cols, b]), kind="stable")[:m_g]]
                new_labels[moved] = G
                split_bits = [int(bits[b])]
        group_bits = bits[width].tolist() + split_bits
        col_bits = np.array(group_bits, dtype=np.int64)[new_labels]  # col_bits: [d]
        est_error = float(np.take_along_axis(col_err, np.searchsorted(bits, col_bits)[:, None], 1).sum())  # sum_j E[j, b_j]
        home = labels.device
        return BitAllocation(col_bits=torch.from_numpy(col_bits).to(home), labels=torch.from_numpy(new_labels).to(home),
                             group_bits=group_bits, est_error=est_error)

    def one(col_err: np.ndarray, E: np.ndarray, s: int) -> BitAllocation:
        """The allocation of table s: col_err [d, C] (ascending widths), E [G, C]."""
        if found is not None and found[s, 0]:  # the device's search (_best_splits_all): no host candidates
            gp, x_best, m_best = (int(v) for v in found[s, 1:])
            g, k = divmod(gp, len(pairs))
            others = [h for h in range(G) if h != g]
            return finish(col_err, (0.0, 0.0, g, int(A[k]), int(B[k]), x_best, m_best, others, choice_all[s][g, others]))
        # The host search: no device, or no accepted split on it (the closest total then wins).
        tables = None if dp_all is None else (dp_all[s].cpu().numpy(), choice_all[s])

        def candidates(dp: np.ndarray, g: int, saved: np.ndarray, xi: np.ndarray, above: bool) -> tuple[np.ndarray, ...]:
            """Best x per (a, b, m choice) of split group g among the other groups' totals xi: [P, W] ascending.

            m is the most channels keeping the total <= hi and, with ``above``, also one more (the closest
            total above, which is never accepted unless it equals the first). Returns miss, err, x, m:
            [P * (1 + above)] in (a, b), m order (the order the candidates are compared in).
            """
            n_g = int(sizes[g])
            base = xi + n_g * bits[A][:, None]  # base: [P, W] bits before the split
            m_top = np.floor((hi - base) / step[:, None])  # most channels keeping the total <= hi
            m = np.stack([np.clip(m_top, 0, n_g)] + [np.clip(m_top + 1, 0, n_g)] * above, 1)  # [P, 1 + above, W]
            total = base[:, None] + m * step[:, None, None]  # total: [P, 1 + above, W] integers
            miss = np.where((total >= lo) & (total <= hi), 0.0, np.abs(total - target))
            dp_x = dp[xi.astype(np.int64)][:, None, :]  # [P, 1, W]
            miss = np.where((total <= target + 0.01 * d) & (dp_x < math.inf), miss, math.inf)
            err = dp_x + E[g, A][:, None, None] - np.take_along_axis(saved[:, None, :], m.astype(np.int64), 2)
            p = np.where(miss == miss.min(2, keepdims=True), err, math.inf).argmin(2)[..., None]  # [P, 1 + above, 1] best x
            take = lambda t: np.take_along_axis(t, p, 2).ravel()  # noqa: E731
            return take(miss), take(err), take(np.broadcast_to(xi[:, None, :], m.shape)), take(m)

        def split_group(g: int) -> Optional[tuple]:
            """Split group g: the other groups' knapsack, each pair's cumulative error saved by moving its
            m channels of largest own gain from a to b, and the best candidate of each (a, b) whose total
            lies in the accepted window [lo - n_g b_hi, hi - n_g b_lo] of x (a few times fewer x than [0, cap])."""
            n_g = int(sizes[g])
            cap = math.floor(target + 0.01 * d) - n_g * int(bits[0])  # most bits the other groups may take
            if cap < 0:
                return None
            others = [h for h in range(G) if h != g]
            if tables is not None:  # row g of the tables of all groups (values at costs <= cap do not depend on cap)
                dp, choice = tables[0][g, : cap + 1], tables[1][g, others, : cap + 1]
            else:
                dp, choice = _min_error_by_cost(costs[others], E[others], cap)  # dp: [cap + 1]
            cols = members[starts[g]:starts[g + 1]]  # cols: [n_g]
            gain = -np.sort(-(col_err[cols][:, A] - col_err[cols][:, B]), axis=0)  # gain: [n_g, P] descending
            saved = np.concatenate([np.zeros((1, len(pairs))), np.cumsum(gain, axis=0)]).T  # saved: [P, n_g + 1]
            xs = np.clip(np.ceil(lo - n_g * bits[B]), 0, cap)  # xs, xe: [P] accepted x lie in [xs, xe]
            xe = np.clip(np.floor(hi - n_g * bits[A]), 0, cap)
            xi = np.minimum(xs[:, None] + np.arange(int((xe - xs).max()) + 1), xe[:, None])  # [P, W]
            return g, others, cap, dp, choice, saved, candidates(dp, g, saved, xi, above=False)

        # The G split groups are independent: threads (numpy releases the GIL in the vector work).
        todo = range(G if len(pairs) else 0)  # one width: nothing to choose
        if G > 1 and d >= ALLOC_THREADS_MIN_D and tables is None:
            with ThreadPoolExecutor(max_workers=min(G, os.cpu_count() or 1)) as pool:
                per_group = [r for r in pool.map(split_group, todo) if r is not None]
        else:
            per_group = [r for r in map(split_group, todo) if r is not None]

        # best: (distance to the target unless accepted, error, g, a, b, x, m, others, knapsack choice).
        # Accepted candidates first; the whole range of x only when no candidate anywhere is accepted.
        # Ties go to the first g, pair, m choice and x, as in a scan of the whole range.
        best: tuple[float, float, int, int, int, int, int, list[int], np.ndarray] | None = None
        for window in (True, False):
            for g, others, cap, dp, choice, saved, windowed in per_group:
                if window:
                    miss, err, xp, mp = windowed
                else:
                    xi = np.broadcast_to(np.arange(cap + 1, dtype=np.float64), (len(pairs), cap + 1))
                    miss, err, xp, mp = candidates(dp, g, saved, xi, above=True)
                i = int(np.lexsort((err, miss))[0])  # least (miss, error); ties: the first
                if window and miss[i] > 0:
                    continue
                if best is None or (float(miss[i]), float(err[i])) < best[:2]:
                    k = i if window else i // 2
                    best = (float(miss[i]), float(err[i]), g, int(A[k]), int(B[k]), int(xp[i]), int(mp[i]), others, choice)
            if best is not None:
                break

        return finish(col_err, best)

    return [one(col_err, E, s) for s, (col_err, E) in enumerate(zip(col_errs, Es))]
