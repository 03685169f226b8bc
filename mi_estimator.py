"""Mutual-information estimators between input channels of a linear layer.

Input channels are the columns of a weight W [out, in]; their activations X [n, in] are collected
on calibration data. Two estimators are provided:

* ``gaussian_mi`` (default): closed form for jointly Gaussian channels, from a covariance matrix
  that is accumulated in streaming form (``covariance_from_sums``).
* ``binned_mi`` (comparison only): plug-in histogram estimator with equal-frequency bins.

All functions are pure, device-agnostic torch functions; MI is in nats.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["covariance_from_sums", "gaussian_mi", "binned_mi"]

_RHO_MAX = 1.0 - 1e-6  # |rho| clamp so that I = -1/2 log(1 - rho^2) stays finite (<= ~6.56 nats)


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")


def covariance_from_sums(sum_xxT: Tensor, sum_x: Tensor, n: int) -> Tensor:
    """Population covariance from streamed sums, in float64 (the subtraction cancels badly in float32).

    # cov = S / n - mu mu^T,  mu = s / n,  S = sum_t x_t x_t^T,  s = sum_t x_t

    Args:
        sum_xxT: [d, d] sum of outer products over all n samples.
        sum_x:   [d] sum of samples.
        n:       number of samples (> 0).
    Returns:
        cov: [d, d] float64, symmetric (divides by n, i.e. torch.cov(..., correction=0)).
    """
    if sum_xxT.dim() != 2 or sum_xxT.shape[0] != sum_xxT.shape[1]:
        raise ValueError(f"sum_xxT must be square [d, d], got {tuple(sum_xxT.shape)}")
    if sum_x.dim() != 1 or sum_x.shape[0] != sum_xxT.shape[0]:
        raise ValueError(f"sum_x must be [d] with d={sum_xxT.shape[0]}, got {tuple(sum_x.shape)}")
    if int(n) <= 0:
        raise ValueError(f"n must be positive, got {n}")
    _check_finite("sum_xxT", sum_xxT)
    _check_finite("sum_x", sum_x)
    S = sum_xxT.to(torch.float64)  # S: [d, d]
    mu = sum_x.to(torch.float64) / n  # mu: [d]
    cov = S / n - torch.outer(mu, mu)  # cov: [d, d]
    return 0.5 * (cov + cov.T)


def gaussian_mi(cov: Tensor, eps: float = 1e-6) -> Tensor:
    """Pairwise Gaussian mutual information from a covariance matrix.

    # I(i;j) = -1/2 log(1 - rho_ij^2),  rho_ij = cov_ij / sqrt(cov_ii cov_jj)

    Guards: channels whose variance is <= eps * max variance (dead / constant) get MI 0 to every
    channel; |rho| is clamped to 1 - 1e-6 so I stays finite; the diagonal is 0.

    Args:
        cov: [d, d] covariance (any float dtype; computed in max(float32, cov.dtype)).
        eps: relative variance threshold below which a channel counts as dead.
    Returns:
        mi: [d, d] float32, symmetric, non-negative, zero diagonal.
    """
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be square [d, d], got {tuple(cov.shape)}")
    if not cov.is_floating_point():
        raise ValueError(f"cov must be a floating tensor, got {cov.dtype}")
    _check_finite("cov", cov)
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    dtype = torch.float64 if cov.dtype == torch.float64 else torch.float32
    C = cov.to(dtype)  # C: [d, d]
    var = torch.diagonal(C).clone()  # var: [d]
    vmax = var.max() if var.numel() > 0 else torch.zeros((), dtype=dtype, device=C.device)
    alive = (var > eps * vmax) & (var > 0)  # alive: [d] bool
    inv_std = torch.where(alive, var.clamp_min(torch.finfo(dtype).tiny).rsqrt(), torch.zeros_like(var))
    rho = C * inv_std[:, None] * inv_std[None, :]  # rho: [d, d]; dead rows/cols are exactly 0
    rho = 0.5 * (rho + rho.T)
    rho = rho.clamp(-_RHO_MAX, _RHO_MAX)
    mi = -0.5 * torch.log1p(-rho * rho)  # mi: [d, d]
    mi.fill_diagonal_(0.0)
    return mi.to(torch.float32)


def binned_mi(
    X: Tensor,
    bins: int = 8,
    max_samples: int = 4096,
    generator: torch.Generator | None = None,
    block: int = 256,
) -> Tensor:
    """Plug-in histogram MI with equal-frequency bins (comparison estimator).

    # I(X_i;X_j) = H(X_i) + H(X_j) - H(X_i, X_j),  H = -sum p log p  (nats)

    Rows are subsampled (without replacement, from ``generator``, a CPU generator) to at most
    ``max_samples``. Each channel is binned by rank: bin = floor(r * bins / n) where r is the
    rank of the first occurrence of the value (ties share a bin, so a constant channel has H = 0).
    Joint counts come from one-hot matmuls over channel blocks of size ``block`` so memory is
    O(n * block * bins + (block * bins)^2) instead of O((d * bins)^2).

    Args:
        X: [n, d] activations.
    Returns:
        mi: [d, d] float32, symmetric, diagonal = H(X_i) (= log(bins) for untied data with bins | n).
    """
    if X.dim() != 2:
        raise ValueError(f"X must be [n, d], got {tuple(X.shape)}")
    if not X.is_floating_point():
        raise ValueError(f"X must be a floating tensor, got {X.dtype}")
    if X.shape[0] < 2:
        raise ValueError(f"X needs at least 2 samples, got {X.shape[0]}")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if max_samples < 2:
        raise ValueError(f"max_samples must be >= 2, got {max_samples}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    _check_finite("X", X)
    n_all, d = X.shape
    device = X.device
    if n_all > max_samples:
        idx = torch.randperm(n_all, generator=generator)[:max_samples].to(device)
        X = X[idx]
    n = X.shape[0]
    cols = X.T.contiguous()  # cols: [d, n]
    srt = torch.sort(cols, dim=1).values  # srt: [d, n]
    rank = torch.searchsorted(srt, cols, right=False)  # rank: [d, n] first-occurrence rank
    B = (rank * bins) // n  # B: [d, n] int64 bin ids in [0, bins)
    counts = torch.zeros(d, bins, dtype=torch.float32, device=device)
    counts.scatter_add_(1, B, torch.ones_like(B, dtype=torch.float32))  # counts: [d, bins]
    p = counts / n
    H = -torch.xlogy(p, p).sum(1)  # H: [d]

    out = torch.empty(d, d, dtype=torch.float32, device=device)  # out: [d, d]
    starts = list(range(0, d, block))

    def onehot(s: int) -> Tensor:
        e = min(s + block, d)
        oh = torch.nn.functional.one_hot(B[s:e].T, bins)  # oh: [n, cb, bins]
        return oh.reshape(n, (e - s) * bins).to(torch.float32)  # [n, cb*bins]

    for bi, si in enumerate(starts):
        ei = min(si + block, d)
        Oi = onehot(si)
        for sj in starts[bi:]:
            ej = min(sj + block, d)
            Oj = Oi if sj == si else onehot(sj)
            J = (Oi.T @ Oj) / n  # J: [cb_i*bins, cb_j*bins] joint probabilities
            J = J.view(ei - si, bins, ej - sj, bins)
            Hij = -torch.xlogy(J, J).sum(dim=(1, 3))  # Hij: [cb_i, cb_j]
            mi = (H[si:ei, None] + H[None, sj:ej] - Hij).clamp_min(0.0)
            out[si:ei, sj:ej] = mi
            if sj != si:
                out[sj:ej, si:ei] = mi.T
    out = 0.5 * (out + out.T)
    out[torch.arange(d, device=device), torch.arange(d, device=device)] = H
    return out
