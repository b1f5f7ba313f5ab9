"""GRS rules against their closed forms (docs/DESIGN.md §3): the real selection code is applied to
rewards drawn from known distributions; accepted rewards must follow p̂ (KS test, p > 0.01)
and the reported KL must match a Monte Carlo estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pgraft import grs
from pgraft.config import FilterSection
from pgraft.selection import ArrayRewardStats, implied_kl, resolve, select_rows


def run_rule(rewards: np.ndarray, per_prompt: int, seed: int = 0, **spec):
    n = len(rewards)
    prompt_id = np.arange(n) // per_prompt
    sample_idx = np.arange(n) % per_prompt
    reward_stats = ArrayRewardStats(rewards, prompt_id)
    res = resolve(FilterSection(**spec), reward_stats, seed)
    chosen = select_rows(prompt_id, sample_idx, rewards, None, res)
    kl = implied_kl(res, chosen.rows_considered, len(chosen.index), reward_stats)
    return res, chosen, kl


def test_threshold_accepts_the_truncated_base_and_kl_is_minus_log_rate():
    r = np.random.default_rng(1).standard_normal(40_000)
    _, chosen, kl = run_rule(r, 100, method="threshold", threshold=0.5)
    accepted = r[chosen.index]
    assert accepted.min() >= 0.5
    assert stats.kstest(accepted, stats.truncnorm(0.5, np.inf).cdf).pvalue > 0.01
    assert kl["kl"] == pytest.approx(-math.log(stats.norm.sf(0.5)), abs=0.03)


def test_best_of_n_follows_beta_and_kl_is_exact():
    r = np.random.default_rng(2).random(80_000)
    n = 4
    _, chosen, kl = run_rule(r, 64, method="best_of_n", n=n)
    accepted = r[chosen.index]
    assert len(accepted) == 80_000 // n
    assert stats.kstest(accepted, stats.beta(n, 1).cdf).pvalue > 0.01  # p̂/p̄ = N u^(N-1)
    assert kl["kl"] == math.log(n) - (n - 1) / n
    monte_carlo = np.mean(np.log(n * accepted ** (n - 1)))  # E_p̂[log p̂/p̄] with u = F(r) = r
    assert kl["kl"] == pytest.approx(monte_carlo, abs=0.02)


@pytest.mark.parametrize("k, m, per_prompt", [(3, 10, 100), (2, None, 16)])
def test_top_k_follows_the_binomial_ratio(k, m, per_prompt):
    r = np.random.default_rng(3).random(64_000)
    _, chosen, kl = run_rule(r, per_prompt, method="top_k", k=k, m=m)
    accepted = r[chosen.index]
    group = m or per_prompt
    assert len(accepted) == 64_000 // group * k
    ks = stats.kstest(accepted, lambda x: grs.top_k_cdf(x, k, group))
    assert ks.pvalue > 0.01
    monte_carlo = np.mean(grs.top_k_log_ratio(accepted, k, group))
    assert kl["kl"] == pytest.approx(monte_carlo, abs=0.03)
    assert grs.top_k_kl(1, group) == pytest.approx(grs.best_of_n_kl(group), abs=1e-6)  # K = 1 is best-of-M


def test_rejection_tilts_a_gaussian_by_exp_r_over_alpha():
    alpha = 2.0
    r = np.random.default_rng(4).standard_normal(100_000)
    res, chosen, kl = run_rule(r, 100, method="rejection", alpha=alpha, r_max=6.0)
    accepted = r[chosen.index]
    # p̄ = N(0,1), p̂ ∝ exp(r/α) p̄ = N(1/α, 1); KL = 1/(2α²); acceptance E[a] = exp(-r_max/α + 1/(2α²)).
    assert stats.kstest(accepted, stats.norm(1 / alpha, 1).cdf).pvalue > 0.01
    assert kl["kl"] == pytest.approx(1 / (2 * alpha**2), abs=0.01)
    assert len(accepted) / len(r) == pytest.approx(math.exp(-6.0 / alpha + 1 / (2 * alpha**2)), rel=0.1)
    np.testing.assert_allclose(chosen.reshaped_reward, np.log(grs.rejection_acceptance(accepted, alpha, 6.0))
                               - math.log(res.mean_acceptance))


def test_quantile_keeps_the_global_top_fraction():
    r = np.random.default_rng(5).random(10_000)
    _, chosen, kl = run_rule(r, 100, method="quantile", quantile=0.25)
    assert len(chosen.index) == 2500 and r[chosen.index].min() >= np.sort(r)[-2500]
    assert kl["kl"] == pytest.approx(math.log(4))


def test_kl_budgets_pick_the_parameter():
    r = np.random.default_rng(6).random(20_000)
    res, chosen, kl = run_rule(r, 100, method="threshold", kl_budget=1.0)
    assert res.chosen_for_budget == "threshold" and kl["kl"] == pytest.approx(1.0, abs=0.01)
    res, _, kl = run_rule(r, 100, method="best_of_n", kl_budget=1.0)
    assert grs.best_of_n_kl(res.n) <= 1.0 < grs.best_of_n_kl(res.n + 1)
    res, _, kl = run_rule(r, 100, method="top_k", kl_budget=0.5)
    assert kl["kl"] <= 0.5 < grs.top_k_kl(res.k - 1, 100)
    res, _, kl = run_rule(r, 100, method="rejection", kl_budget=0.3)
    assert kl["kl"] == pytest.approx(0.3, rel=1e-6)


def test_closed_forms():
    assert grs.best_of_n_kl(1) == 0.0
    assert grs.top_k_kl(5, 5) == 0.0
    u = np.linspace(0.01, 0.99, 7)
    np.testing.assert_allclose(grs.top_k_ratio(u, 1, 6), 6 * u**5)  # K = 1: N u^(N-1)
    assert grs.threshold_kl(math.exp(-2)) == pytest.approx(2.0)
    np.testing.assert_allclose(grs.dedup_log_ratio(np.array([1, 2, 4])), [0, -math.log(2), -math.log(4)])
