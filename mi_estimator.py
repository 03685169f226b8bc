"""Mutual-information estimators between input channels of a linear layer.

Input channels are the columns of a weight W [out, in]; their activations X [n, in] are seen on
calibration data. ``gaussian_mi`` is the closed form for jointly Gaussian channels, from a covariance
matrix that is built from the same streamed sums as the Hessian (``covariance_from_sums``), so the
MI costs no extra pass over the activations.

All functions are pure, device-agnostic torch functions; MI is in nats.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["covariance_from_sums", "gaussian_mi"]

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
