"""Selection mechanics: dedup, order independence, the top-K fast path, tie-breaking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pgraft import grs
from pgraft.config import FilterSection
from pgraft.selection import (
    ArrayRewardStats,
    RewardStats,
    Segments,
    SelectionError,
    canonical_order,
    exact_partials,
    kth_largest,
    ranks_desc,
    resolve,
    select_rows,
    top_k_mask,
    uniform_draws,
)


def table(prompts=20, per_prompt=30, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    p = np.repeat(np.arange(prompts), per_prompt)
    s = np.tile(np.arange(per_prompt), prompts)
    r = rng.integers(0, 5, len(p)).astype(float) if ties else rng.random(len(p))
    return p, s, r


def run(p, s, r, codes=None, **spec):
    res = resolve(FilterSection(**spec), ArrayRewardStats(r, p, s), seed=7)
    return select_rows(p, s, r, codes, res)


@pytest.mark.parametrize("spec", [
    dict(method="best_of_n", n=5), dict(method="top_k", k=4), dict(method="top_k", k=3, m=10),
    dict(method="threshold", threshold=2.0), dict(method="quantile", quantile=0.3),
    dict(method="rejection", alpha=1.0),
])
def test_selection_does_not_depend_on_row_order(spec):
    p, s, r = table(ties=True)  # many ties: the tie-break by sample_idx must decide
    first = run(p, s, r, **spec)
    perm = np.random.default_rng(1).permutation(len(p))
    second = run(p[perm], s[perm], r[perm], **spec)
    keys = lambda sel, pp, ss: sorted(zip(pp[sel.index], ss[sel.index], sel.rank_in_prompt, sel.reshaped_reward))
    assert keys(first, p, s) == keys(second, p[perm], s[perm])


def test_fast_top_k_agrees_with_full_ranks():
    p, s, r = table(prompts=50, per_prompt=40, ties=True)
    seg = Segments.of(p)
    ranks = ranks_desc(seg, r)
    for k in (1, 3, 40, 60):
        assert np.array_equal(top_k_mask(seg, r, k), ranks < k)


def test_ranks_break_ties_by_sample_idx():
    seg = Segments.of(np.array([0, 0, 0, 0, 1, 1]))
    assert ranks_desc(seg, np.array([1.0, 2.0, 2.0, 0.5, 3.0, 3.0])).tolist() == [2, 0, 1, 3, 0, 1]


def test_dedup_keeps_the_best_copy_and_reweights_by_copies():
    # prompt 0: hashes a, a, a, b, c; prompt 1: a, d (same hash across prompts is not a duplicate)
    p = np.array([0, 0, 0, 0, 0, 1, 1])
    s = np.array([0, 1, 2, 3, 4, 0, 1])
    r = np.array([0.5, 0.9, 0.7, 0.8, 0.1, 0.6, 0.2])
    codes = np.array([0, 0, 0, 1, 2, 0, 3])
    with_dedup = run(p, s, r, codes, method="threshold", threshold=0.15, dedup=True)
    kept = sorted(zip(p[with_dedup.index], s[with_dedup.index]))
    assert kept == [(0, 1), (0, 3), (1, 0), (1, 1)]
    assert with_dedup.rows_considered == 5
    # The same selection on a table that never had the copies: reshaped rewards differ by log(1/copies).
    unique = np.array([1, 3, 4, 5, 6])
    plain = run(p[unique], s[unique], r[unique], None, method="threshold", threshold=0.15)
    copies = {(0, 1): 3, (0, 3): 1, (1, 0): 1, (1, 1): 1}
    d = dict(zip(zip(p[with_dedup.index], s[with_dedup.index]), with_dedup.reshaped_reward))
    q = dict(zip(zip(p[unique][plain.index], s[unique][plain.index]), plain.reshaped_reward))
    for key, n in copies.items():
        assert d[key] == pytest.approx(q[key] + math.log(1 / n))


def test_best_of_n_with_dedup_matches_the_closed_form_on_known_copy_counts():
    # One prompt, two groups of 4 (best-of-4). Molecule hashes: group 0 = a a a b, group 1 = c d a e.
    # Dedup keeps a's best copy (s=2, reward 0.9; 4 copies), so 5 distinct samples remain; each
    # group is still whole as generated, so each gives its best distinct sample.
    p = np.zeros(8, dtype=np.int64)
    s = np.arange(8)
    r = np.array([0.5, 0.3, 0.9, 0.4, 0.6, 0.2, 0.1, 0.7])
    codes = np.array([0, 0, 0, 1, 2, 3, 0, 4])
    sel = run(p, s, r, codes, method="best_of_n", n=4, dedup=True)
    assert sorted(s[sel.index].tolist()) == [2, 7] and sel.rows_considered == 5
    # Closed form (docs/DESIGN.md §3): log(N u^(N−1)) − log N_copies, u = mid-rank CDF over the 5 kept.
    m = 5
    for idx, rank, reshaped in zip(sel.index, sel.rank_in_prompt, sel.reshaped_reward):
        u = (m - rank - 0.5) / m
        copies = 4 if s[idx] == 2 else 1
        assert reshaped == pytest.approx(math.log(4) + 3 * math.log(u) - math.log(copies))
    # Without dedup, group 1's best is s=7 too, and group 0's best is the same a.
    assert sorted(s[run(p, s, r, None, method="best_of_n", n=4).index].tolist()) == [2, 7]


def test_duplicate_rows_are_an_error():
    with pytest.raises(SelectionError, match="p000001_s00002 appears twice"):
        canonical_order(np.array([1, 0, 1]), np.array([2, 0, 2]))


def test_uniform_draws_are_stable_and_uniform():
    p, s, _ = table(prompts=100, per_prompt=100)
    u = uniform_draws(p, s, 3)
    assert np.array_equal(u, uniform_draws(p, s, 3)) and not np.array_equal(u, uniform_draws(p, s, 4))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


@pytest.mark.parametrize("values", [
    ["00ff", "abcd", "00ff", "abce", "abcd"],  # one width: read from Arrow's buffer
    ["a" * 32, "b" * 32, "a" * 32, "c" * 31 + "d", "b" * 32],
    ["x", "yy", "x", "zzz", "yy"],  # mixed widths: dictionary encoding
])
def test_hash_codes_equal_iff_strings_equal(values):
    import pyarrow as pa

    from pgraft.selection import hash_codes

    codes = hash_codes(pa.chunked_array([pa.array(values[:2]), pa.array(values[2:])]))
    for i, a in enumerate(values):
        for j, b in enumerate(values):
            assert (codes[i] == codes[j]) == (a == b)


def test_dedup_paths_agree_on_regular_and_ragged_prompts():
    """Similar-sized prompts use the per-row sort, ragged ones the hash table: same answer."""
    from pgraft.selection import dedup_rows

    rng = np.random.default_rng(3)
    for sizes in ([50] * 40, [400] + [1] * 60):
        p = np.repeat(np.arange(len(sizes)), sizes)
        seg = Segments.of(p)
        codes = rng.integers(0, 30, len(p))  # many twins
        values = rng.integers(0, 4, len(p)).astype(float)
        keep, copies = dedup_rows(seg, values, codes)
        for prompt in range(len(sizes)):
            rows = np.flatnonzero(p == prompt)
            for code in np.unique(codes[rows]):
                group = rows[codes[rows] == code]
                best = group[np.lexsort((group, -values[group]))[0]]
                assert keep[group].tolist() == [g == best for g in group]
                assert (copies[group] == len(group)).all()


class _ProbedStats(RewardStats):
    """Only the queries a cluster answers (no direct access to the rows)."""

    def __init__(self, rewards):
        self._sorted = np.sort(rewards)
        self.count, self.low, self.high = len(rewards), float(rewards.min()), float(rewards.max())

    def count_at_least(self, points):
        return self.count - np.searchsorted(self._sorted, points, side="left")


@pytest.mark.parametrize("values", [
    np.random.default_rng(0).standard_normal(5000),
    np.round(np.random.default_rng(1).random(5000), 2),  # heavy ties
    np.array([-3.5, -0.0, 0.0, 1e-300, 2.0, 2.0, 7e300]),
])
def test_kth_largest_from_counts_alone_is_exact(values):
    probed = _ProbedStats(values)
    for count in sorted({1, 2, 3, len(values) // 3, len(values) - 1, len(values)}):
        expected = np.partition(values, len(values) - count)[len(values) - count]
        assert kth_largest(probed, count) == expected


def test_exact_partials_sum_to_fsum_however_values_are_split():
    values = np.random.default_rng(2).standard_normal(3000) * 10.0 ** np.random.default_rng(3).integers(-8, 8, 3000)
    whole = math.fsum(values)
    for cuts in ([1500], [7, 900, 2999], list(range(100, 3000, 100))):
        pieces = np.split(values, cuts)
        assert math.fsum(x for piece in pieces for x in exact_partials(piece)) == whole


def test_acceptance_sums_match_the_closed_form_kl_and_mean():
    rewards = np.random.default_rng(4).standard_normal(20_000)
    prompt_id = np.arange(len(rewards)) // 50
    stats = ArrayRewardStats(rewards, prompt_id)
    for alpha in (0.05, 0.3, 2.0):
        sum_b, sum_bd = stats.acceptance_sums(alpha)
        assert grs.rejection_kl_from_sums(sum_b, sum_bd, len(rewards)) == pytest.approx(
            grs.rejection_kl(rewards, alpha, stats.high), rel=1e-9)
        assert grs.rejection_mean_acceptance(sum_b, len(rewards), stats.high, alpha, stats.high + 0.5) == pytest.approx(
            grs.rejection_acceptance(rewards, alpha, stats.high + 0.5).mean(), rel=1e-12)
    alpha = grs.rejection_alpha_for_kl_sums(stats.acceptance_sums, len(rewards), 0.4, float(np.ptp(rewards)))
    assert alpha == pytest.approx(grs.rejection_alpha_for_kl(rewards, 0.4, stats.high), rel=1e-8)


def test_hash_code_of_a_string_does_not_depend_on_its_part():
    import pyarrow as pa

    from pgraft.selection import hash_codes

    uniform = hash_codes(pa.array(["abc", "xyz"]))
    mixed = hash_codes(pa.array(["0123456789abcdef", "abc", "", "abcd"]))
    assert uniform[0] == mixed[1] and len({*uniform, *mixed}) == 5
