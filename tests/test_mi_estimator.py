"""Tests for mi_estimator: the Gaussian (closed form) MI and the covariance from streamed sums."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mi_estimator import covariance_from_sums, gaussian_mi  # noqa: E402
from sparsegpt import InputStats  # noqa: E402


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cov_of(X: torch.Tensor) -> torch.Tensor:
    X = X.to(torch.float64)
    return covariance_from_sums(X.T @ X, X.sum(0), X.shape[0])


# ------------------------------------------------------------------ covariance_from_sums


def test_covariance_from_production_float32_sums_matches_float64_reference() -> None:
    # The sums come from InputStats, which accumulates in float32 exactly as compression does; the
    # activations have an offset mean like real hidden states, so mu mu^T cancels part of S / n.
    g = _gen(0)
    X = torch.randn(4000, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    X = X + torch.linspace(-3.0, 3.0, 12, dtype=torch.float64)
    X[:, 3] = X[:, 0] * 2 + 1  # exact linear dependence
    stats = InputStats(12, "cpu")
    for chunk in X.split(1234):  # several batches, as the walker feeds them
        stats.add(chunk.to(torch.float32))
    assert stats.sum_xxT.dtype == torch.float32
    cov = covariance_from_sums(stats.sum_xxT, stats.sum_x, stats.num_samples)
    ref = torch.cov(X.to(torch.float32).double().T, correction=0)  # float64 reference on the same inputs
    assert cov.dtype == torch.float64 and cov.shape == (12, 12)
    torch.testing.assert_close(cov, ref, rtol=1e-5, atol=1e-5 * float(ref.diagonal().max()))
    # and the MI built from them matches the MI of the float64 reference
    torch.testing.assert_close(gaussian_mi(cov), gaussian_mi(ref), rtol=1e-3, atol=1e-3)


def test_covariance_from_sums_is_exact_in_float64() -> None:
    g = _gen(7)
    X = torch.randn(3000, 5, generator=g, dtype=torch.float64) * 0.5 + 100.0
    a, b = X[:1234], X[1234:]
    cov = covariance_from_sums(a.T @ a + b.T @ b, a.sum(0) + b.sum(0), X.shape[0])
    torch.testing.assert_close(cov, torch.cov(X.T, correction=0), rtol=1e-9, atol=1e-9)


def test_covariance_from_sums_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        covariance_from_sums(torch.zeros(3, 4), torch.zeros(3), 10)
    with pytest.raises(ValueError):
        covariance_from_sums(torch.zeros(3, 3), torch.zeros(4), 10)
    with pytest.raises(ValueError):
        covariance_from_sums(torch.zeros(3, 3), torch.zeros(3), 0)
    bad = torch.zeros(3, 3)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError):
        covariance_from_sums(bad, torch.zeros(3), 10)


# ------------------------------------------------------------------ gaussian_mi


def test_gaussian_mi_independent_is_near_zero() -> None:
    # For independent channels rho_hat ~ N(0, 1/n), so I ~ rho^2/2 ~ chi2_1 / (2n).
    # n = 20000, 16 channels -> 120 pairs: E[I] = 2.5e-5, max of 120 chi2_1 draws is < 25 with
    # overwhelming probability -> I_max < 25 / 40000 = 6.25e-4. Tolerance 1e-3, mean < 1e-4.
    X = torch.randn(20000, 16, generator=_gen(1), dtype=torch.float64)
    mi = gaussian_mi(_cov_of(X))
    off = mi[~torch.eye(16, dtype=torch.bool)]
    assert mi.dtype == torch.float32
    assert float(off.max()) < 1e-3
    assert float(off.mean()) < 1e-4
    assert float(off.min()) >= 0.0


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8, 0.99])
def test_gaussian_mi_known_rho_matches_numpy_reference(rho: float) -> None:
    rng = np.random.default_rng(2)
    n = 50000
    z = rng.standard_normal((n, 2))
    x = z[:, 0]
    y = rho * z[:, 0] + math.sqrt(1 - rho**2) * z[:, 1]
    X = np.stack([x, y, 3.0 * rng.standard_normal(n) + 5.0], axis=1)  # third channel: independent, offset
    # float64 numpy reference on the same samples
    C = np.cov(X.T, bias=True)
    r = C[0, 1] / math.sqrt(C[0, 0] * C[1, 1])
    ref = -0.5 * math.log(1 - r**2)
    mi = gaussian_mi(_cov_of(torch.from_numpy(X)))
    assert abs(float(mi[0, 1]) - ref) < 1e-5 * max(1.0, ref)
    # and close to the population value (sampling error of rho ~ (1 - rho^2)/sqrt(n))
    true = -0.5 * math.log(1 - rho**2)
    assert abs(float(mi[0, 1]) - true) < 0.02
    assert float(mi[0, 2]) < 1e-3


def test_gaussian_mi_symmetric_zero_diagonal() -> None:
    X = torch.randn(500, 10, generator=_gen(3)) @ torch.randn(10, 10, generator=_gen(4))
    mi = gaussian_mi(_cov_of(X))
    torch.testing.assert_close(mi, mi.T, rtol=0, atol=0)
    assert torch.all(torch.diagonal(mi) == 0)
    assert float(mi.min()) >= 0.0
    assert float(mi.max()) > 0.1  # the mixing matrix makes channels correlated


def test_gaussian_mi_dead_channel_gives_zero_row_no_nan() -> None:
    X = torch.randn(1000, 6, generator=_gen(5), dtype=torch.float64)
    X[:, 2] = 7.0  # constant channel: variance 0 (or ~1e-28 from rounding)
    X[:, 4] = 1e-9 * X[:, 0]  # tiny-variance channel, perfectly correlated with 0: still dead by eps
    mi = gaussian_mi(_cov_of(X))
    assert torch.isfinite(mi).all()
    for dead in (2, 4):
        assert torch.all(mi[dead] == 0) and torch.all(mi[:, dead] == 0)
    # all-zero covariance: everything dead, all zeros
    assert torch.all(gaussian_mi(torch.zeros(4, 4)) == 0)


def test_gaussian_mi_perfect_correlation_stays_finite() -> None:
    X = torch.randn(1000, 3, generator=_gen(6), dtype=torch.float64)
    X[:, 1] = X[:, 0]
    X[:, 2] = -2.0 * X[:, 0]
    mi = gaussian_mi(_cov_of(X))
    assert torch.isfinite(mi).all()
    cap = -0.5 * math.log(1 - (1 - 1e-6) ** 2)  # ~6.56 nats
    assert float(mi[0, 1]) == pytest.approx(cap, rel=1e-3)
    assert float(mi[0, 2]) == pytest.approx(cap, rel=1e-3)


def test_gaussian_mi_rejects_nan_and_bad_shape() -> None:
    c = torch.eye(3)
    c[0, 1] = float("nan")
    with pytest.raises(ValueError):
        gaussian_mi(c)
    with pytest.raises(ValueError):
        gaussian_mi(torch.zeros(3, 4))
