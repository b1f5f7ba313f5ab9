"""Vectorised GRS selection over a reward table (the filter stage's engine).

Rows are put in canonical order (prompt_id, sample_idx); a prompt's rows form one segment.
Ranks are by reward descending, ties broken by sample_idx, so the result is a pure function
of the rows: the local engine and the Ray engine (which call `select_rows` once per
partition of whole prompts) give identical accepted sets. Global quantities (a quantile's τ, rejection's
r_max and E[a], parameters chosen for a KL budget) are resolved once over all rewards with
`resolve` before any rows are selected.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from pgraft import grs
from pgraft.config import FilterSection
from pgraft.errors import PgraftError

_SAMPLE_BITS = 20  # sample_idx < 10**5 < 2**20 (the key format's range)


class SelectionError(PgraftError, ValueError):
    """A selection cannot be made as asked; the message says what to change."""


@dataclass
class Resolved:
    """Every parameter the rule needs, global quantities included."""

    method: str
    threshold: float | None = None  # threshold, and quantile once resolved
    n: int | None = None
    k: int | None = None
    m: int | None = None
    alpha: float | None = None
    r_max: float | None = None
    mean_acceptance: float | None = None  # rejection: E_p̄[a] over all rows
    quantile: float | None = None
    dedup: bool = False
    seed: int = 0
    kl_budget: float | None = None
    chosen_for_budget: str | None = None  # which parameter the KL budget picked

    def parameters(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "method"}


class RewardStats:
    """What the global parameters need to know about all rewards (after NaN handling, before
    dedup), without holding them: engines answer the two questions below from wherever the
    rows live (one process's arrays, or partitions spread over a cluster)."""

    count: int  # rows
    low: float  # smallest reward
    high: float  # largest reward
    size_counts: dict[int, int]  # prompt size -> number of prompts of that size

    @property
    def min_prompt_size(self) -> int:
        return min(self.size_counts)

    def count_at_least(self, points: np.ndarray) -> np.ndarray:
        """For each point, the number of rewards ≥ it."""
        raise NotImplementedError

    def acceptance_sums(self, alpha: float) -> tuple[float, float]:
        """(Σ b, Σ b·d) over all rows with d = (r − high)/α and b = e^d, each correctly rounded
        from the per-prompt sums (`prompt_sums`): the same value on any engine."""
        raise NotImplementedError


def prompt_sums(values: np.ndarray, prompt_starts: np.ndarray) -> np.ndarray:
    """Per-prompt sums of `values` in canonical row order: what every engine sums the same way."""
    return np.add.reduceat(values, prompt_starts) if len(values) else np.zeros(0)


def exact_partials(values) -> list[float]:
    """Non-overlapping floats whose exact sum is the exact sum of `values` (Shewchuk's
    algorithm, as in `math.fsum`): partitions send these, and `math.fsum` of all of them is
    the correctly rounded total, whatever the partitioning."""
    partials: list[float] = []
    for x in map(float, values):
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]
    return partials


def acceptance_terms(rewards: np.ndarray, high: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    d = (rewards - high) / alpha
    b = np.exp(d)
    return b, b * d


class ArrayRewardStats(RewardStats):
    """RewardStats over arrays in one process. Rows must be in canonical order (see
    `canonical_order`); pass `sample_idx` to have them put in it."""

    def __init__(self, rewards: np.ndarray, prompt_id: np.ndarray, sample_idx: np.ndarray | None = None):
        order = None if sample_idx is None else canonical_order(prompt_id, sample_idx)
        if order is not None:
            rewards, prompt_id = rewards[order], prompt_id[order]
        self.rewards = rewards
        self.count, self.low, self.high = len(rewards), float(rewards.min()), float(rewards.max())
        self.prompts = Segments.starts_of(prompt_id)
        sizes = np.diff(np.append(self.prompts, len(rewards)))
        values, counts = np.unique(sizes, return_counts=True)
        self.size_counts = {int(v): int(c) for v, c in zip(values, counts)}
        self._sorted = None

    def kth_largest(self, count: int) -> float:
        return float(np.partition(self.rewards, self.count - count)[self.count - count]) + 0.0  # −0.0 → 0.0

    def count_at_least(self, points: np.ndarray) -> np.ndarray:
        if self._sorted is None:
            self._sorted = np.sort(self.rewards)
        return self.count - np.searchsorted(self._sorted, points, side="left")

    def acceptance_sums(self, alpha: float) -> tuple[float, float]:
        b, bd = acceptance_terms(self.rewards, self.high, alpha)
        return math.fsum(prompt_sums(b, self.prompts)), math.fsum(prompt_sums(bd, self.prompts))


def _ordered_int(values: np.ndarray) -> np.ndarray:
    """int64 keys with the order of the floats (finite values), and back (`_ordered_float`)."""
    bits = np.asarray(values, dtype=np.float64).view(np.int64)
    return bits ^ ((bits >> 63) & np.int64(0x7FFFFFFFFFFFFFFF))


def _ordered_float(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.int64)
    return (keys ^ ((keys >> 63) & np.int64(0x7FFFFFFFFFFFFFFF))).view(np.float64)


def kth_largest(stats: RewardStats, count: int, probes: int = 1024) -> float:
    """The count-th largest reward, exactly, from `count_at_least` queries alone: the largest
    float x with at least `count` rewards ≥ x is that reward. Each round probes `probes`
    floats between the bounds (in the floats' own order), so it takes ⌈64 / log2 probes⌉ rounds."""
    direct = getattr(stats, "kth_largest", None)
    if direct is not None:
        return direct(count)
    lo, hi = int(_ordered_int(np.array([stats.low]))[0]), int(_ordered_int(np.array([stats.high]))[0])
    while hi > lo:  # invariant: count_at_least(lo) ≥ count; the answer lies in [lo, hi]
        step = max(1, -(-(hi - lo) // probes))
        keys = np.arange(lo, hi + 1, step, dtype=np.int64)
        if keys[-1] != hi:
            keys = np.append(keys, np.int64(hi))
        enough = np.flatnonzero(stats.count_at_least(_ordered_float(keys)) >= count)
        best = int(enough[-1])  # keys[0] = lo always qualifies
        lo = int(keys[best])
        hi = int(keys[best + 1]) - 1 if best + 1 < len(keys) else lo
    return float(_ordered_float(np.array([lo]))[0]) + 0.0  # −0.0 → 0.0, as every engine reports it


def resolve(spec: FilterSection, stats: RewardStats, seed: int) -> Resolved:
    """Fix global parameters from all rewards (and pick one for a KL budget)."""
    res = Resolved(method=spec.method, threshold=spec.threshold, n=spec.n, k=spec.k, m=spec.m, alpha=spec.alpha,
                   r_max=spec.r_max, quantile=spec.quantile, dedup=spec.dedup, seed=seed, kl_budget=spec.kl_budget)
    budget = spec.kl_budget
    if spec.method == "threshold" and budget is not None:
        res.threshold = kth_largest(stats, max(1, math.ceil(grs.acceptance_for_kl(budget) * stats.count)))
        res.chosen_for_budget = "threshold"
    elif spec.method == "quantile":
        if budget is not None:
            res.quantile, res.chosen_for_budget = grs.acceptance_for_kl(budget), "quantile"
        # Global top fraction = a threshold at the ⌈q·n⌉-th largest reward (ties kept).
        res.threshold = kth_largest(stats, max(1, math.ceil(res.quantile * stats.count)))
    elif spec.method == "best_of_n" and budget is not None:
        res.n, res.chosen_for_budget = grs.best_of_n_for_kl(budget, stats.min_prompt_size), "n"
    elif spec.method == "top_k" and budget is not None:
        res.k, res.chosen_for_budget = grs.top_k_for_kl(budget, res.m or stats.min_prompt_size), "k"
    elif spec.method == "rejection":
        if res.r_max is None:
            res.r_max = stats.high
        elif res.r_max < stats.high:
            raise SelectionError(f"filter.r_max={res.r_max} is below the largest reward {stats.high}; raise it or leave it null")
        spread = (stats.high - stats.low) or 1.0
        if budget is not None:
            res.alpha = grs.rejection_alpha_for_kl_sums(lambda a: stats.acceptance_sums(a), stats.count, budget, spread)
            res.chosen_for_budget = "alpha"
        sum_b, _ = stats.acceptance_sums(res.alpha)
        res.mean_acceptance = grs.rejection_mean_acceptance(sum_b, stats.count, stats.high, res.alpha, res.r_max)
    return res


# Segments ------------------------------------------------------------------------------

def canonical_order(prompt_id: np.ndarray, sample_idx: np.ndarray) -> np.ndarray | None:
    """Permutation to (prompt_id, sample_idx) order, or None when already in it."""
    composite = (prompt_id.astype(np.int64) << _SAMPLE_BITS) | sample_idx.astype(np.int64)
    if len(composite) < 2 or bool(np.all(composite[1:] > composite[:-1])):
        return None
    order = np.argsort(composite, kind="stable")
    if np.any(composite[order][1:] == composite[order][:-1]):
        dup = composite[order][np.flatnonzero(composite[order][1:] == composite[order][:-1])[0]]
        raise SelectionError(f"sample p{dup >> _SAMPLE_BITS:06d}_s{dup & ((1 << _SAMPLE_BITS) - 1):05d} appears "
                             "twice in the reward table; a reward part was written twice")
    return order


@dataclass
class Segments:
    """Consecutive runs of equal ids (rows must be grouped)."""

    starts: np.ndarray
    sizes: np.ndarray
    ids: np.ndarray  # segment index of every row
    pos: np.ndarray  # position of every row inside its segment

    @staticmethod
    def starts_of(keys: np.ndarray) -> np.ndarray:
        """Row index where each run of equal keys starts."""
        if not len(keys):
            return np.zeros(0, np.int64)
        return np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1]).astype(np.int64)

    @classmethod
    def of(cls, keys: np.ndarray) -> "Segments":
        n = len(keys)
        starts = cls.starts_of(keys)
        sizes = np.diff(np.concatenate([starts, [n]])).astype(np.int64)
        ids = np.repeat(np.arange(len(starts)), sizes)
        return cls(starts, sizes, ids, np.arange(n) - starts[ids])

    def matrix(self, values: np.ndarray, fill: float) -> np.ndarray:
        """(segments, max size) matrix of values, padded with `fill`."""
        out = np.full((len(self.starts), int(self.sizes.max(initial=0))), fill, dtype=values.dtype)
        out[self.ids, self.pos] = values
        return out


def ranks_desc(seg: Segments, values: np.ndarray) -> np.ndarray:
    """0-based rank of each row within its segment by value descending, ties by row order."""
    mat = seg.matrix(-values, np.inf)  # padding sorts last
    order = np.argsort(mat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(mat.shape[1])[None, :].repeat(mat.shape[0], 0), axis=1)
    return ranks[seg.ids, seg.pos]


def top_k_mask(seg: Segments, values: np.ndarray, k: int) -> np.ndarray:
    """Rows among the k largest of their segment (ties by row order), in O(n) without a sort."""
    mat = seg.matrix(-values, np.inf)
    if mat.shape[1] <= k:
        return np.ones(len(values), dtype=bool)
    kth = np.partition(mat, k - 1, axis=1)[:, k - 1:k]
    better = mat < kth
    tied = mat == kth
    room = k - better.sum(axis=1, keepdims=True)
    keep = better | (tied & (np.cumsum(tied, axis=1) <= room))
    return keep[seg.ids, seg.pos]


def ranks_of_top(seg: Segments, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Ranks of the masked rows when they are exactly the top rows of each segment."""
    sub = Segments.of(seg.ids[mask])
    return ranks_desc(sub, values[mask])


def _twin_rows(seg: Segments, hash_code: np.ndarray) -> np.ndarray:
    """Indices of rows whose (segment, hash) occurs more than once."""
    n = len(hash_code)
    width = int(seg.sizes.max(initial=0))
    low = int(hash_code.min(initial=0))
    if n and len(seg.sizes) * width <= 2 * n and low > np.iinfo(np.int64).min:
        # Segments of similar size: sort each row of a (segments × size) matrix, compare neighbours.
        mat = seg.matrix(hash_code, low - 1)  # padding sorts first and matches no real hash
        order = np.argsort(mat, axis=1)
        ordered = np.take_along_axis(mat, order, axis=1)
        same = ordered[:, 1:] == ordered[:, :-1]
        flag_sorted = np.zeros(mat.shape, dtype=bool)
        flag_sorted[:, 1:] |= same
        flag_sorted[:, :-1] |= same
        flags = np.empty_like(flag_sorted)
        np.put_along_axis(flags, order, flag_sorted, axis=1)
        return np.flatnonzero(flags[seg.ids, seg.pos])
    import pandas as pd

    with np.errstate(over="ignore"):  # one int64 per (segment, hash); a collision only adds a candidate
        mixed = hash_code.astype(np.uint64) ^ (seg.ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return np.flatnonzero(pd.Series(mixed.view(np.int64)).duplicated(keep=False).to_numpy())


def dedup_rows(seg: Segments, values: np.ndarray, hash_code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the best row (highest value, then first) per (segment, hash); return (keep mask, copies).
    Only rows that have a twin (usually few) are sorted."""
    n = len(values)
    keep = np.ones(n, dtype=bool)
    copies = np.ones(n, dtype=np.int64)
    twins = _twin_rows(seg, hash_code)
    if len(twins) == 0:
        return keep, copies
    order = twins[np.lexsort((np.arange(len(twins)), hash_code[twins], seg.ids[twins]))]  # stable within groups
    s_seg, s_hash = seg.ids[order], hash_code[order]
    starts = np.concatenate([[True], (s_seg[1:] != s_seg[:-1]) | (s_hash[1:] != s_hash[:-1])])
    groups = Segments.of(np.cumsum(starts))
    best = ranks_desc(groups, values[order]) == 0
    keep[order[~best]] = False
    copies[order] = groups.sizes[groups.ids]
    return keep, copies


def _word_codes(data: np.ndarray, width: int) -> np.ndarray:
    """Codes of `width`-byte strings given as rows of a uint8 matrix (the length mixed in)."""
    if width % 8 or width == 0:
        data = np.concatenate([data, np.zeros((len(data), 8 - width % 8), np.uint8)], axis=1)
    words = np.ascontiguousarray(data).view(np.uint64)
    with np.errstate(over="ignore"):
        code = words[:, 0] ^ (np.uint64(width) * np.uint64(0xBF58476D1CE4E5B9))
        for j in range(1, words.shape[1]):  # mix in further 8-byte words
            code *= np.uint64(0x9E3779B97F4A7C15)
            code ^= words[:, j] + (code >> np.uint64(29))
    return code.view(np.int64)


def hash_codes(hashes) -> np.ndarray:
    """64-bit codes of sample_hash strings (a pyarrow array without nulls): equal strings, equal
    codes; distinct strings collide with probability ~n²/2⁶⁴. A code depends on its string
    alone (bytes and length), so parts can be coded one at a time: strings are read straight
    from Arrow's data buffer, one group per length (every built-in hash has one length)."""
    import pyarrow as pa

    arr = hashes.combine_chunks() if isinstance(hashes, pa.ChunkedArray) else hashes
    arr = arr.cast(pa.large_string())  # 64-bit offsets: any size
    if arr.null_count:
        raise ValueError("hash_codes: null strings have no code")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    codes = np.empty(len(arr), dtype=np.int64)
    for width in np.unique(lengths):
        rows = np.flatnonzero(lengths == width)
        starts = offsets[rows]
        if len(rows) == len(arr) and width and np.all(np.diff(starts) == width):  # contiguous: no gather
            matrix = data[starts[0]:starts[0] + len(rows) * int(width)].reshape(len(rows), int(width))
        else:
            matrix = data[starts[:, None] + np.arange(int(width))[None, :]] if width else np.zeros((len(rows), 0), np.uint8)
        codes[rows] = _word_codes(matrix, int(width))
    return codes


# Rules ---------------------------------------------------------------------------------

def uniform_draws(prompt_id: np.ndarray, sample_idx: np.ndarray, seed: int) -> np.ndarray:
    """A U(0,1) per sample from (seed, prompt_id, sample_idx) via splitmix64: the same draw
    for the same sample on any engine, in any row order."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             + (prompt_id.astype(np.uint64) << np.uint64(_SAMPLE_BITS)) + sample_idx.astype(np.uint64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class RowSelection:
    """Accepted rows of one call, as indices into the rows given."""

    index: np.ndarray
    reshaped_reward: np.ndarray  # log p̂/p̄ at the sample (temperature 1), dedup term included
    rank_in_prompt: np.ndarray  # 0 = best reward of its prompt (after dedup)
    rows_considered: int  # after dedup and NaN handling
    per_prompt: dict[int, int] = field(default_factory=dict)


def _group_keys(prompt_id, sample_idx, size) -> np.ndarray:
    return (prompt_id.astype(np.int64) << _SAMPLE_BITS) | (sample_idx // size)


def _subgroup(prompt_id, sample_idx, size, generated: tuple[np.ndarray, np.ndarray] | None = None):
    """Groups of `size` consecutive samples of a prompt; only groups generated whole count.
    `generated`: (prompt_id, sample_idx) of the rows before dedup, so a group that lost copies
    of one sample still counts (its best distinct sample is its pick); default: these rows."""
    key = _group_keys(prompt_id, sample_idx, size)
    seg = Segments.of(key)
    if generated is None:
        return seg, seg.sizes[seg.ids] == size
    before, counts = np.unique(_group_keys(*generated, size), return_counts=True)
    return seg, np.isin(key, before[counts == size])


def select_rows(prompt_id: np.ndarray, sample_idx: np.ndarray, reward: np.ndarray, hash_code: np.ndarray | None,
                res: Resolved) -> RowSelection:
    """Apply the resolved rule to rows made of whole prompts (any row order)."""
    order = canonical_order(prompt_id, sample_idx)
    if order is None:  # already canonical (tables read in shard order are): no copies
        base, p, s, r = None, prompt_id, sample_idx, reward
    else:
        base, p, s, r = order, prompt_id[order], sample_idx[order], reward[order]
    prompts = Segments.of(p)
    extra = np.zeros(len(r))
    generated = None  # the rows before dedup, which decide which groups are whole
    if res.dedup and hash_code is not None:
        generated = (p, s)
        keep, copies = dedup_rows(prompts, r, hash_code if base is None else hash_code[base])
        extra = grs.dedup_log_ratio(copies)
        base = np.flatnonzero(keep) if base is None else base[keep]
        p, s, r, extra = p[keep], s[keep], r[keep], extra[keep]
        prompts = Segments.of(p)
    n = len(r)
    sizes = prompts.sizes[prompts.ids].astype(float)

    if res.method == "top_k" and res.m is None:  # the fast path: only the K best need ranks
        mask = top_k_mask(prompts, r, res.k)
        rank = ranks_of_top(prompts, r, mask)
    else:
        rank_all = ranks_desc(prompts, r)
        if res.method in ("threshold", "quantile"):
            mask = r >= res.threshold
        elif res.method == "best_of_n":
            groups, complete = _subgroup(p, s, res.n, generated)
            mask = complete & (ranks_desc(groups, r) == 0)
        elif res.method == "top_k":
            groups, complete = _subgroup(p, s, res.m, generated)
            mask = complete & (ranks_desc(groups, r) < res.k)
        elif res.method == "rejection":
            mask = uniform_draws(p, s, res.seed) < grs.rejection_acceptance(r, res.alpha, res.r_max)
        else:
            raise SelectionError(f"unknown filter.method {res.method!r}")
        rank = rank_all[mask]

    idx = np.flatnonzero(mask)
    u = (sizes[idx] - rank - 0.5) / sizes[idx]  # mid-rank empirical CDF within the prompt
    log_ratio = _log_ratio(res, r[idx], u, sizes[idx]) + extra[idx]
    kept_prompts, counts = np.unique(p[idx], return_counts=True)
    return RowSelection(index=idx if base is None else base[idx], reshaped_reward=log_ratio, rank_in_prompt=rank.astype(np.int64),
                        rows_considered=n, per_prompt={int(a): int(b) for a, b in zip(kept_prompts, counts)})


def _log_ratio(res: Resolved, r: np.ndarray, u: np.ndarray, m: np.ndarray) -> np.ndarray:
    """log p̂/p̄ per accepted row; `m` is each row's prompt size (after dedup)."""
    if res.method in ("threshold", "quantile"):
        # −log P(r ≥ τ) needs the global acceptance rate: added by `add_threshold_ratio`.
        return np.zeros(len(r))
    if res.method == "best_of_n":
        return grs.best_of_n_log_ratio(u, res.n)
    if res.method == "top_k":
        group = np.asarray(res.m or m, dtype=float)
        return grs.top_k_log_ratio(u, np.minimum(res.k, group), group)
    if res.method == "rejection":
        return (r - res.r_max) / res.alpha - math.log(res.mean_acceptance)
    raise SelectionError(f"unknown filter.method {res.method!r}")


def add_threshold_ratio(res: Resolved, reshaped: np.ndarray, acceptance_rate: float) -> np.ndarray:
    """Deterministic-set rules: p̂/p̄ = 1/P(accept) on the accepted set."""
    if res.method in ("threshold", "quantile"):
        return reshaped - math.log(acceptance_rate)
    return reshaped


def implied_kl(res: Resolved, rows_in: int, accepted: int, stats: RewardStats) -> dict:
    """KL(p̂ ‖ p̄) in nats: the closed form of docs/DESIGN.md §3 and the plug-in estimate on this table."""
    rate = accepted / rows_in if rows_in else 0.0
    plug_in = grs.threshold_kl(rate) if rate > 0 else math.inf
    if res.method in ("threshold", "quantile"):
        return {"kl": plug_in, "kl_formula": "-log P(r >= tau)", "kl_empirical": plug_in}
    if res.method == "best_of_n":
        return {"kl": grs.best_of_n_kl(res.n), "kl_formula": "log N - (N-1)/N", "kl_empirical": plug_in}
    if res.method == "top_k":
        ms = [res.m] if res.m else sorted(stats.size_counts)
        per_m = {m: grs.top_k_kl(min(res.k, m), m) for m in ms}
        weights = np.array([1.0]) if res.m else np.array([stats.size_counts[m] for m in ms], dtype=float)
        kl = float(np.dot(weights / weights.sum(), [per_m[m] for m in ms]))
        return {"kl": kl, "kl_formula": "int_0^1 g log g du, g = (M/K) P[Bin(M-1, 1-u) <= K-1]", "kl_empirical": plug_in}
    if res.method == "rejection":
        sum_b, sum_bd = stats.acceptance_sums(res.alpha)
        return {"kl": grs.rejection_kl_from_sums(sum_b, sum_bd, stats.count), "kl_formula": "E_phat[log a] - log E_pbar[a]",
                "kl_empirical": plug_in}
    raise SelectionError(f"unknown filter.method {res.method!r}")
