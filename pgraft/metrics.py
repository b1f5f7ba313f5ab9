"""Summary statistics of evaluation samples: Fréchet distance, means with standard errors, diversity.

Pure numpy/scipy functions on arrays the evaluation already holds (feature vectors, per-sample
rewards, prompt ids), so that they can be tested against closed forms and reused by any task.
Every function checks its input shapes and raises a one-line ValueError on a mismatch, because
a silently broadcast (N,) against (N, 1) would give a plausible but wrong number.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg
from scipy.spatial.distance import pdist

# Offset added to both covariances when the product's square root fails (pytorch-fid's value).
SQRTM_EPS = 1e-6
# Largest imaginary part on the diagonal of sqrtm(C1 C2) that is treated as round-off (pytorch-fid's value).
IMAG_ATOL = 1e-3


def _as_features(features, name: str = "features") -> np.ndarray:
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, dims), got shape {arr.shape}")
    return arr


def _as_ids(prompt_ids, n: int, what: str) -> np.ndarray:
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or len(ids) != n:
        raise ValueError(f"prompt_ids must be 1-D with one id per {what} ({n}), got shape {ids.shape}")
    return ids


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D), float64, of features (N, D): the Gaussian FID fits.

    The covariance is the unbiased sample covariance (rows are samples), as in the FID
    reference implementation; it needs at least two samples to exist at all.
    """
    x = _as_features(features)
    if len(x) < 2:
        raise ValueError(f"gaussian_stats needs at least 2 samples to estimate a covariance, got {len(x)}")
    # np.cov squeezes a single feature to a 0-d array; keep (D, D) so callers can rely on it.
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _check_gaussian(mu, cov, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    cov = np.atleast_2d(np.asarray(cov, dtype=np.float64))
    if mu.ndim != 1 or cov.shape != (len(mu), len(mu)):
        raise ValueError(f"mu{which} must be (D,) and cov{which} (D, D); got {mu.shape} and {cov.shape}")
    return mu, cov


def _sqrtm_trace(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """Tr((C1 C2)^{1/2}), with pytorch-fid's fallbacks.

    C1 C2 is similar to the PSD matrix C1^{1/2} C2 C1^{1/2}, so its square root has a real,
    non-negative trace in exact arithmetic; numerically, a (near-)singular product can make
    sqrtm fail (non-finite) or return small imaginary parts. As the FID reference does, a
    failure is retried with eps·I added to both covariances, and imaginary parts up to
    IMAG_ATOL are discarded as round-off. We also retry with the offset when the imaginary
    parts are too large, and only then give up, since a larger one means the number is not
    trustworthy.
    """
    with warnings.catch_warnings():
        # Feature covariances are often singular (e.g. ReLU units never active): sqrtm warns, yet
        # its result is usually accurate, and failures are detected explicitly just below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov1 @ cov2)
    bad_imag = np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL)
    if not np.isfinite(covmean).all() or bad_imag:
        offset = np.eye(len(cov1)) * SQRTM_EPS
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if not np.isfinite(covmean).all():
        raise ValueError(f"sqrtm(C1 C2) is not finite, even with {SQRTM_EPS:g}·I added to the covariances")
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > IMAG_ATOL:
            raise ValueError(f"sqrtm(C1 C2) is not real (max imaginary diagonal part {imag:.3g}); "
                             "covariances are too ill-conditioned")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, cov1) and N(mu2, cov2):

        ‖μ1 − μ2‖² + Tr(C1 + C2 − 2 (C1 C2)^{1/2}).

    This is FID when the Gaussians are fitted to classifier features of two image sets. The
    result is clipped at 0: it is a squared distance, and round-off in the matrix square root
    can otherwise make the distance of a set to itself come out slightly negative.
    """
    mu1, cov1 = _check_gaussian(mu1, cov1, "1")
    mu2, cov2 = _check_gaussian(mu2, cov2, "2")
    if len(mu1) != len(mu2):
        raise ValueError(f"the two Gaussians have different dimensions: {len(mu1)} vs {len(mu2)}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * _sqrtm_trace(cov1, cov2)
    return max(float(fd), 0.0)


def frechet_distance_of(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: features_a {a.shape} vs features_b {b.shape}")
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean and its standard error, sample std (ddof=1) / √n, for reporting a mean ± s.e.

    With one value the spread is unknown, so the standard error is nan rather than 0 (which
    would claim a perfectly precise mean).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {v.shape}")
    if len(v) == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))


def per_prompt_means(values, prompt_ids) -> dict[int, float]:
    """Mean of `values` per prompt id, keys in increasing order: to see which prompts improved."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    ids = _as_ids(prompt_ids, len(v), "value")
    uniq, inverse = np.unique(ids, return_inverse=True)
    sums = np.bincount(inverse, weights=v, minlength=len(uniq))
    counts = np.bincount(inverse, minlength=len(uniq))
    return {int(k): float(s / c) for k, s, c in zip(uniq, sums, counts)}


def within_prompt_diversity(features: np.ndarray, prompt_ids) -> float:
    """Mean over prompts of the mean pairwise Euclidean distance between that prompt's samples.

    Reward fine-tuning tends to collapse each prompt onto a few modes; a falling value shows
    that, while comparing across prompts would mix in how different the prompts are. Prompts
    with a single sample have no pairs and are skipped; with none left the result is nan.
    """
    x = _as_features(features)
    ids = _as_ids(prompt_ids, len(x), "feature row")
    if len(x) == 0:
        return float("nan")
    order = np.argsort(ids, kind="stable")
    _, starts = np.unique(ids[order], return_index=True)
    per_prompt = [pdist(group).mean() for group in np.split(x[order], starts[1:]) if len(group) >= 2]
    return float(np.mean(per_prompt)) if per_prompt else float("nan")
