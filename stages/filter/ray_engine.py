"""The Ray engine: a selection over a table larger than one node, with no row on the driver.

1. `_scatter`, a task per batch of reward parts: read and check each part, code its hashes,
   and split the rows by prompt_id into hash partitions (the shuffle goes through Ray's
   object store). Batches keep the task count, and the driver's bookkeeping, small.
2. `_gather`, a task per partition: concatenate its pieces, put them in canonical order and
   report small facts (rows, reward range, prompt sizes).
3. Global parameters from those facts; a quantile's τ or a KL budget's threshold by probing
   `count_at_least` on every partition (exact, `pgraft.selection.kth_largest`), rejection's
   sums as exact per-partition partials.
4. `_pick_and_write`, a task per partition: select and write its accepted part.
The driver holds object references, per-partition facts and per-prompt counts, never rows.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import ray

import cluster
from pgraft.config import Config
from pgraft.selection import RewardStats, Segments, acceptance_terms, exact_partials, prompt_sums, resolve
from pgraft.storage import Storage
from pgraft.tables import table_fingerprint
from stages.filter.errors import FilterError
from stages.filter.inputs import PartRows, check_same_schema, load_part
from stages.filter.output import AcceptedOutput
from stages.filter.partition import (
    Selected,
    finish,
    first_keys,
    in_canonical_order,
    merge_counts,
    nonfinite,
    nonfinite_error,
    pick,
)


def _scatter(storage: Storage, keys: list[str], partitions: int, dedup: bool):
    infos, pieces = [], []
    for key in keys:
        loaded = load_part(storage, key, dedup)
        bad = nonfinite(loaded.rows)
        infos.append({"digest": loaded.digest, "signature": loaded.signature, "bad": int(bad.sum()),
                      "bad_keys": first_keys(loaded.rows, bad)})
        pieces.append(loaded.rows)
    rows = PartRows.concat(pieces)
    bucket = rows.prompt_id % partitions
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(partitions + 1))
    return (infos, *(rows.take(order[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])))


def scatter_batches(parts: list[str], cpus: int) -> list[list[str]]:
    """Parts per scatter task: about 4 tasks per CPU, at most 16 parts (a few million rows) each."""
    size = max(1, min(16, -(-len(parts) // (4 * cpus))))
    return [parts[i:i + size] for i in range(0, len(parts), size)]


def _gather(drop_nonfinite: bool, *pieces: PartRows):
    rows = PartRows.concat(list(pieces))
    if drop_nonfinite:
        rows = rows.take(np.isfinite(rows.reward))
    rows = in_canonical_order(rows)
    starts = Segments.starts_of(rows.prompt_id)
    sizes, counts = np.unique(np.diff(np.append(starts, len(rows))), return_counts=True)
    facts = {"rows": len(rows), "low": float(rows.reward.min()) if len(rows) else math.inf,
             "high": float(rows.reward.max()) if len(rows) else -math.inf,
             "size_counts": {int(s): int(c) for s, c in zip(sizes, counts)}}
    return facts, rows


def _sorted_rewards(rows: PartRows) -> np.ndarray:
    return np.sort(rows.reward)


def _count_at_least(sorted_rewards: np.ndarray, points: np.ndarray) -> np.ndarray:
    return len(sorted_rewards) - np.searchsorted(sorted_rewards, points, side="left")


def _acceptance_partials(rows: PartRows, high: float, alpha: float) -> tuple[list[float], list[float]]:
    b, bd = acceptance_terms(rows.reward, high, alpha)
    starts = Segments.starts_of(rows.prompt_id)
    return exact_partials(prompt_sums(b, starts)), exact_partials(prompt_sums(bd, starts))


def _pick_count(rows: PartRows, res) -> tuple[int, int]:
    picked = pick(rows, res) if len(rows) else None
    return (picked.considered, picked.table.num_rows) if picked else (0, 0)


def _pick_and_write(rows: PartRows, res, acceptance_rate: float | None, output: AcceptedOutput, index: int) -> dict:
    if not len(rows):
        return {"considered": 0, "accepted": 0, "per_prompt": {}, "part": None, "node": cluster.current_node_id()}
    picked = pick(rows, res)
    part = None
    if picked.table.num_rows:
        rate = acceptance_rate if acceptance_rate is not None else 1.0  # only threshold rules use the rate
        part = output.write(index, finish(picked.table, res, rate))
    return {"considered": picked.considered, "accepted": picked.table.num_rows, "per_prompt": picked.per_prompt,
            "part": part, "node": cluster.current_node_id()}


class RayRewardStats(RewardStats):
    """RewardStats answered by the partitions, wherever they are."""

    def __init__(self, facts: list[dict], rows_refs: list):
        self.rows_refs = rows_refs
        self.count = sum(f["rows"] for f in facts)
        self.low, self.high = min(f["low"] for f in facts), max(f["high"] for f in facts)
        self.size_counts: dict[int, int] = {}
        for f in facts:
            merge_counts(self.size_counts, f["size_counts"])
        self._sorted_refs = None

    def count_at_least(self, points: np.ndarray) -> np.ndarray:
        if self._sorted_refs is None:
            self._sorted_refs = [_remote(_sorted_rewards).remote(ref) for ref in self.rows_refs]
        return np.sum(_get([_remote(_count_at_least).remote(ref, points) for ref in self._sorted_refs]), axis=0)

    def drop_sorted(self) -> None:
        """Free the sorted copies once the global parameters are fixed."""
        self._sorted_refs = None

    def acceptance_sums(self, alpha: float) -> tuple[float, float]:
        got = _get([_remote(_acceptance_partials).remote(ref, self.high, alpha) for ref in self.rows_refs])
        return math.fsum(x for b, _ in got for x in b), math.fsum(x for _, bd in got for x in bd)


@functools.lru_cache(maxsize=None)
def _remote(fn, num_returns: int = 1):
    """The Ray remote function of `fn` (made once: tasks are launched per partition and probe)."""
    return ray.remote(num_returns=num_returns)(fn)


def _get(refs):
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as exc:  # a task's own error, or a lost worker, node or object
        raise cluster.unwrap_remote_error(exc) from None


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def partition_count(cfg: Config) -> int:
    return cfg.filter.partitions or max(2, min(256, 2 * cluster_cpus()))


def select_ray(storage: Storage, parts: list[str], cfg: Config, seed: int, output: AcceptedOutput) -> Selected:
    cluster.connect()
    cluster.release_warm()  # its tasks take whatever CPUs are free: pools kept from earlier stages would hold them
    partitions = partition_count(cfg)
    scatter = _remote(_scatter, num_returns=partitions + 1)
    scattered = [scatter.remote(storage, batch, partitions, cfg.filter.dedup)
                 for batch in scatter_batches(parts, cluster_cpus())]
    infos = [info for batch in _get([refs[0] for refs in scattered]) for info in batch]
    check_same_schema([info["signature"] for info in infos], [storage.url(key) for key in parts])
    dropped = sum(info["bad"] for info in infos)
    if dropped and cfg.filter.nan_policy == "error":
        raise nonfinite_error(dropped, [k for info in infos for k in info["bad_keys"]][:5])
    fingerprint = table_fingerprint(parts, [info["digest"] for info in infos])

    gather = _remote(_gather, num_returns=2)
    gathered = [gather.remote(bool(dropped), *(refs[1 + b] for refs in scattered)) for b in range(partitions)]
    del scattered  # the pieces are freed once every partition holds its rows
    facts = _get([facts_ref for facts_ref, _ in gathered])
    rows_refs = [rows_ref for _, rows_ref in gathered]
    stats = RayRewardStats(facts, rows_refs)
    if stats.count == 0:
        raise FilterError("the reward table has no usable rows")
    res = resolve(cfg.filter, stats, seed)
    stats.drop_sorted()

    rate = None
    if res.method in ("threshold", "quantile"):  # their reshaped reward needs the global acceptance rate first
        counts = _get([_remote(_pick_count).remote(ref, res) for ref in rows_refs])
        considered, accepted = sum(c for c, _ in counts), sum(a for _, a in counts)
        if accepted == 0:
            return Selected(res, stats, stats.count, dropped, considered, 0, {}, fingerprint, [])
        rate = accepted / considered
    results = _get([_remote(_pick_and_write).remote(ref, res, rate, output, i) for i, ref in enumerate(rows_refs)])
    per_prompt: dict[int, int] = {}
    for r in results:
        merge_counts(per_prompt, r["per_prompt"])
    return Selected(res=res, stats=stats, rows_in=stats.count, dropped=dropped,
                    considered=sum(r["considered"] for r in results), accepted=sum(r["accepted"] for r in results),
                    per_prompt=per_prompt, fingerprint=fingerprint,
                    accepted_parts=[r["part"] for r in results if r["part"]], nodes=sorted({r["node"] for r in results}))
