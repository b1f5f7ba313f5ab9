"""pgraft.metrics against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pgraft import metrics


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


MU1 = np.array([0.0, 1.0, -1.0, 2.0])
MU2 = np.array([1.0, 0.0, 0.0, 2.5])
A = np.array([1.0, 2.0, 0.5, 3.0])
B = np.array([2.0, 1.0, 1.0, 0.5])
CLOSED = float(((MU1 - MU2) ** 2).sum() + ((np.sqrt(A) - np.sqrt(B)) ** 2).sum())


# gaussian_stats -----------------------------------------------------------------------------

def test_gaussian_stats_matches_numpy_and_keeps_2d_covariance():
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    mu, cov = metrics.gaussian_stats(x)
    assert mu.dtype == cov.dtype == np.float64 and mu.shape == (3,) and cov.shape == (3, 3)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64).T))
    mu1, cov1 = metrics.gaussian_stats(np.array([[1.0], [3.0]]))  # one feature: still (1, 1)
    assert mu1.shape == (1,) and cov1.shape == (1, 1) and cov1[0, 0] == pytest.approx(2.0)


def test_gaussian_stats_needs_two_rows_and_2d_input():
    with pytest.raises(ValueError, match="at least 2 samples.*got 1"):
        metrics.gaussian_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="2-D"):
        metrics.gaussian_stats(np.zeros(4))


# frechet_distance ---------------------------------------------------------------------------

def test_frechet_distance_of_identical_stats_is_zero():
    x = np.random.default_rng(1).standard_normal((500, 16))
    mu, cov = metrics.gaussian_stats(x)
    assert metrics.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    # W2² between N(μ1, diag a) and N(μ2, diag b) = ‖μ1 − μ2‖² + Σ (√a − √b)².
    fd = metrics.frechet_distance(MU1, np.diag(A), MU2, np.diag(B))
    assert fd == pytest.approx(CLOSED, rel=1e-10)
    assert metrics.frechet_distance(MU2, np.diag(B), MU1, np.diag(A)) == pytest.approx(fd, rel=1e-10)


def test_frechet_distance_of_rotated_commuting_covariances_is_closed_form():
    # R diag(a) Rᵀ and R diag(b) Rᵀ commute: same closed form, with non-diagonal matrices.
    r = _rotation(4, seed=2)
    fd = metrics.frechet_distance(MU1, r @ np.diag(A) @ r.T, MU2, r @ np.diag(B) @ r.T)
    assert fd == pytest.approx(CLOSED, rel=1e-9)


def test_frechet_distance_of_non_commuting_2d_covariances_is_closed_form():
    # For 2×2 matrices M = C1 C2 with eigenvalues λ1, λ2 ≥ 0:
    # Tr √M = √λ1 + √λ2 = √(Tr M + 2 √det M), and det M = det C1 · det C2.
    c1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    c2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    assert not np.allclose(c1 @ c2, c2 @ c1)
    mu1, mu2 = np.array([0.0, 0.0]), np.array([1.0, -2.0])
    tr_sqrt = math.sqrt(np.trace(c1 @ c2) + 2 * math.sqrt(np.linalg.det(c1) * np.linalg.det(c2)))
    closed = 5.0 + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(closed, rel=1e-10)


@pytest.mark.filterwarnings("error")
def test_frechet_distance_with_singular_covariances_is_closed_form_without_warnings():
    # Zero-variance directions (e.g. dead ReLU features) make C1 C2 singular.
    a, b = np.array([1.0, 0.0, 4.0]), np.array([0.0, 0.0, 1.0])
    fd = metrics.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b))
    assert fd == pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), abs=1e-6)


def test_frechet_distance_from_samples_converges_to_closed_form():
    # Which error to expect: with n samples per set, the dominant fluctuation is that of
    # ‖μ̂1 − μ̂2‖², whose standard deviation ≈ 2 √(Δᵀ (diag a + diag b) Δ / n) = 0.013 for
    # n = 200 000 (Δ = μ1 − μ2); its bias Tr(a + b)/n = 6e-5 and the covariance terms'
    # O(√(d/n)) errors are smaller. Over 20 seeds the observed s.d. was 0.014 (max error 0.026),
    # so 0.07 (≈ 5 s.d., 1.5 % of FD = 4.73) fails only if the estimate is wrong.
    n = 200_000
    rng = np.random.default_rng(0)
    r = _rotation(4, seed=3)  # correlated features, same closed form (see the rotated test)
    xa = (MU1 + rng.standard_normal((n, 4)) * np.sqrt(A)) @ r.T
    xb = (MU2 + rng.standard_normal((n, 4)) * np.sqrt(B)) @ r.T
    assert metrics.frechet_distance_of(xa, xb) == pytest.approx(CLOSED, abs=0.07)


def test_frechet_distance_is_clipped_at_zero():
    # Round-off makes the unclipped distance of this set to itself slightly negative (≈ −4e-14).
    cov = np.cov(np.random.default_rng(0).standard_normal((30, 20)), rowvar=False)
    assert 2 * np.trace(cov) - 2 * metrics._sqrtm_trace(cov, cov) < 0
    assert metrics.frechet_distance(np.zeros(20), cov, np.zeros(20), cov) == 0.0


def test_failed_sqrtm_is_retried_with_offset_and_large_imaginary_parts_raise(monkeypatch):
    real_sqrtm = metrics.linalg.sqrtm
    calls = []

    def nan_first(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(metrics.linalg, "sqrtm", nan_first)
    fd = metrics.frechet_distance(MU1, np.diag(A), MU2, np.diag(B))
    assert len(calls) == 2 and np.allclose(calls[1], np.diag((A + 1e-6) * (B + 1e-6)))
    assert fd == pytest.approx(CLOSED, abs=1e-5)

    # Tiny imaginary parts are round-off and dropped; large ones (even after the retry) are an error.
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda m: real_sqrtm(m) + 1e-9j)
    assert metrics.frechet_distance(MU1, np.diag(A), MU2, np.diag(B)) == pytest.approx(CLOSED, rel=1e-10)
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda m: real_sqrtm(m) + 0.1j)
    with pytest.raises(ValueError, match="not real"):
        metrics.frechet_distance(MU1, np.diag(A), MU2, np.diag(B))


def test_frechet_distance_shape_mismatches():
    with pytest.raises(ValueError, match=r"mu1 must be \(D,\) and cov1 \(D, D\)"):
        metrics.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="different dimensions: 3 vs 2"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        metrics.frechet_distance_of(np.zeros((5, 3)), np.zeros((5, 4)))


# mean_and_stderr, per_prompt_means -----------------------------------------------------------

def test_mean_and_stderr_by_hand():
    # mean 5; squared deviations 9 + 1 + 1 + 9 = 20; sample variance 20/3; s.e. √(20/3)/√4 = √(5/3).
    mean, se = metrics.mean_and_stderr([2.0, 4.0, 6.0, 8.0])
    assert mean == 5.0 and se == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    mean, se = metrics.mean_and_stderr(np.array([3.5]))
    assert mean == 3.5 and math.isnan(se)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        metrics.mean_and_stderr([])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        metrics.mean_and_stderr(np.ones((2, 2)))


def test_per_prompt_means():
    means = metrics.per_prompt_means([1.0, 10.0, 3.0, 20.0, 5.0], [7, 2, 7, 2, 0])
    assert means == {0: 5.0, 2: 15.0, 7: 2.0}
    assert list(means) == [0, 2, 7] and all(type(k) is int for k in means)
    with pytest.raises(ValueError, match=r"one id per value \(3\)"):
        metrics.per_prompt_means([1.0, 2.0, 3.0], [0, 1])


# within_prompt_diversity ----------------------------------------------------------------------

def test_diversity_of_two_points_is_their_distance():
    assert metrics.within_prompt_diversity([[0.0, 0.0], [3.0, 4.0]], [1, 1]) == pytest.approx(5.0)


def test_diversity_of_equilateral_triangle_is_its_side():
    s = 2.5
    tri = np.array([[0.0, 0.0], [s, 0.0], [s / 2, s * math.sqrt(3) / 2]])
    # Embedded in 5-D and rotated: only distances matter.
    tri5 = np.pad(tri, ((0, 0), (0, 3))) @ _rotation(5, seed=4).T + 7.0
    assert metrics.within_prompt_diversity(tri5, [0, 0, 0]) == pytest.approx(s, rel=1e-12)


def test_diversity_of_unit_square():
    square = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    # 4 sides of 1 and 2 diagonals of √2 over 6 pairs.
    assert metrics.within_prompt_diversity(square, [3] * 4) == pytest.approx((4 + 2 * math.sqrt(2)) / 6)


def test_diversity_averages_prompts_equally_and_skips_singletons():
    s = 5.0
    rows = {  # prompt 0: two points 2 apart; prompt 1: triangle of side 5 (3 pairs); prompt 9: one point
        0: [[0.0, 0.0], [2.0, 0.0]],
        1: [[0.0, 0.0], [s, 0.0], [s / 2, s * math.sqrt(3) / 2]],
        9: [[100.0, 100.0]],
    }
    features = np.array([p for pts in rows.values() for p in pts])
    ids = np.array([k for k, pts in rows.items() for _ in pts])
    # Per-prompt means 2 and 5, averaged per prompt (not per pair, which would give 17/4).
    assert metrics.within_prompt_diversity(features, ids) == pytest.approx(3.5)
    perm = np.random.default_rng(0).permutation(len(ids))  # interleaved order: same answer
    assert metrics.within_prompt_diversity(features[perm], ids[perm]) == pytest.approx(3.5)


def test_diversity_with_no_pairs_is_nan():
    assert math.isnan(metrics.within_prompt_diversity([[0.0], [1.0]], [0, 1]))
    assert math.isnan(metrics.within_prompt_diversity(np.zeros((0, 3)), np.zeros(0, dtype=int)))


def test_diversity_shape_mismatches():
    with pytest.raises(ValueError, match=r"one id per feature row \(3\), got shape \(2,\)"):
        metrics.within_prompt_diversity(np.zeros((3, 2)), [0, 0])
    with pytest.raises(ValueError, match="2-D"):
        metrics.within_prompt_diversity(np.zeros(3), [0, 0, 0])
