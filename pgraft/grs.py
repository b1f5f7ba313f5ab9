"""Generalized rejection sampling: closed forms of docs/DESIGN.md §3 as small pure functions.

Every rule turns base samples x ~ p̄ into accepted samples x ~ p̂ with p̂/p̄ a function of
u = F(r(x)), the reward's CDF under p̄. `*_log_ratio` gives log p̂/p̄ (the reshaped reward
at temperature 1), `*_kl` gives KL(p̂ ‖ p̄) in nats, `*_for_kl` inverts it for a KL budget.
"""

from __future__ import annotations

import math

import numpy as np

# scipy is imported inside the functions that need it: it costs ~0.6 s at start-up, and a
# filter rerun with a threshold should not pay it.

# threshold τ: p̂/p̄ = 1/P(r ≥ τ) on the accepted set -------------------------------------

def threshold_kl(acceptance_rate: float) -> float:
    return -math.log(acceptance_rate)


def acceptance_for_kl(kl_budget: float) -> float:
    """The acceptance rate of a deterministic-set rule (threshold, quantile) with KL = budget."""
    return math.exp(-kl_budget)


# best-of-N: p̂/p̄ = N u^(N−1) -------------------------------------------------------------

def best_of_n_log_ratio(u: np.ndarray, n: int) -> np.ndarray:
    return math.log(n) + (n - 1) * np.log(u)


def best_of_n_kl(n: int) -> float:
    return math.log(n) - (n - 1) / n


def best_of_n_for_kl(kl_budget: float, n_max: int = 4096) -> int:
    """Largest N whose KL stays within the budget (KL grows with N)."""
    n = 1
    while n < n_max and best_of_n_kl(n + 1) <= kl_budget:
        n += 1
    return n


# top-K of M: p̂/p̄ = (M/K)·P[Bin(M−1, 1−u) ≤ K−1] ------------------------------------------

def top_k_ratio(u: np.ndarray, k: int, m: int) -> np.ndarray:
    from scipy import stats

    return (m / k) * stats.binom.cdf(k - 1, m - 1, 1.0 - np.asarray(u, dtype=float))


def top_k_log_ratio(u: np.ndarray, k: int | np.ndarray, m: int | np.ndarray) -> np.ndarray:
    """`k` and `m` may be arrays (one group per row)."""
    from scipy import stats

    k, m = np.asarray(k, dtype=float), np.asarray(m, dtype=float)
    return np.log(m / k) + stats.binom.logcdf(k - 1, m - 1, 1.0 - np.asarray(u, dtype=float))


def top_k_kl(k: int, m: int) -> float:
    """∫₀¹ g log g du; K = 1 reduces to best-of-M, K = M to 0."""
    from scipy import integrate

    if k >= m:
        return 0.0

    def integrand(u):
        g = top_k_ratio(u, k, m)
        return float(g * np.log(g)) if g > 0 else 0.0

    value, _ = integrate.quad(integrand, 0.0, 1.0, limit=200)
    return float(value)


def top_k_for_kl(kl_budget: float, m: int) -> int:
    """Smallest K (strongest selection) whose KL stays within the budget (KL falls as K grows)."""
    for k in range(1, m + 1):
        if top_k_kl(k, m) <= kl_budget:
            return k
    return m


def top_k_cdf(x: np.ndarray, k: int, m: int, grid_points: int = 20001) -> np.ndarray:
    """CDF of u = F(r) among accepted samples, ∫₀ˣ g(u) du, by the trapezoid rule on a fine grid."""
    from scipy import integrate

    grid = np.linspace(0.0, 1.0, grid_points)
    cdf = integrate.cumulative_trapezoid(top_k_ratio(grid, k, m), grid, initial=0.0)
    return np.interp(x, grid, cdf / cdf[-1])


# rejection at temperature α: accept with a = exp((r − r_max)/α), p̂/p̄ ∝ exp(r/α) ------------

def rejection_acceptance(rewards: np.ndarray, alpha: float, r_max: float) -> np.ndarray:
    return np.exp((np.asarray(rewards, dtype=float) - r_max) / alpha)


def rejection_kl(rewards: np.ndarray, alpha: float, r_max: float) -> float:
    """E_p̂[log a] − log E_p̄[a], estimated on the base sample (p̂ weights ∝ a), in log space so
    small α does not underflow. Exact for the empirical base distribution; for Gaussian
    rewards it tends to 1/(2α²)."""
    from scipy import special

    log_a = (np.asarray(rewards, dtype=float) - r_max) / alpha
    log_mean_a = special.logsumexp(log_a) - math.log(len(log_a))
    weights = np.exp(log_a - special.logsumexp(log_a))
    return float(np.sum(weights * log_a) - log_mean_a)


def rejection_alpha_for_kl(rewards: np.ndarray, kl_budget: float, r_max: float) -> float:
    """α whose implied KL equals the budget (KL falls monotonically as α grows)."""
    from scipy import optimize

    rewards = np.asarray(rewards, dtype=float)
    spread = float(rewards.max() - rewards.min()) or 1.0
    lo, hi = spread * 1e-4, spread * 1e4
    if rejection_kl(rewards, lo, r_max) <= kl_budget:
        return lo
    return float(optimize.brentq(lambda a: rejection_kl(rewards, a, r_max) - kl_budget, lo, hi, xtol=1e-10 * spread))


def rejection_kl_from_sums(sum_b: float, sum_bd: float, count: int) -> float:
    """The same KL from the sums of b = e^d and b·d, d = log a − max log a, over `count` rows
    (what `selection.RewardStats.acceptance_sums` returns): E_p̂[d] − log E_p̄[e^d]; the shift
    by max log a cancels. Sums of per-partition parts, so any engine computes it."""
    return sum_bd / sum_b - math.log(sum_b / count)


def rejection_mean_acceptance(sum_b: float, count: int, high: float, alpha: float, r_max: float) -> float:
    """E_p̄[a] from Σ e^d, d = (r − high)/α: a = e^d · e^((high − r_max)/α)."""
    return math.exp((high - r_max) / alpha) * sum_b / count


def rejection_alpha_for_kl_sums(acceptance_sums, count: int, kl_budget: float, spread: float) -> float:
    """`rejection_alpha_for_kl` from sums: `acceptance_sums(α)` gives (Σ b, Σ b·d) at α."""
    from scipy import optimize

    def kl(alpha: float) -> float:
        return rejection_kl_from_sums(*acceptance_sums(alpha), count)

    lo, hi = spread * 1e-4, spread * 1e4
    if kl(lo) <= kl_budget:
        return lo
    return float(optimize.brentq(lambda a: kl(a) - kl_budget, lo, hi, xtol=1e-10 * spread))


# dedup modifier ----------------------------------------------------------------------------

def dedup_log_ratio(copies: np.ndarray) -> np.ndarray:
    """Keeping one of N identical copies reweights that sample by 1/N."""
    return -np.log(np.asarray(copies, dtype=float))
