"""Selection over one partition: rows of whole prompts, wherever they live.

Both engines call these on partitions that never split a prompt (the local engine on slices
of one process's table, the Ray engine on hash partitions spread over a cluster); the rule
itself is `pgraft.selection.select_rows`, a pure function of a prompt's rows, so the accepted
set does not depend on how prompts were grouped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pgraft import contract
from pgraft.selection import Resolved, SelectionError, add_threshold_ratio, canonical_order, select_rows
from pgraft.tables import arrow_schema
from stages.filter.errors import FilterError
from stages.filter.inputs import PartRows

ACCEPTED_SCHEMA = arrow_schema(contract.ACCEPTED_COLUMNS)


def check_key_range(rows: PartRows) -> None:
    """Every row must have a sample key (checked before anything is written)."""
    if len(rows) and (rows.prompt_id.min() < 0 or rows.prompt_id.max() >= 10**6 or rows.sample_idx.min() < 0
                      or rows.sample_idx.max() >= 10**5):
        raise FilterError("prompt_id or sample_idx out of the key format's range (0 ≤ prompt_id < 10^6, "
                          "0 ≤ sample_idx < 10^5): these rows were not written by `pgraft reward`")


def sample_keys(prompt_id: np.ndarray, sample_idx: np.ndarray) -> pa.Array:
    """`contract.sample_key` of many rows at once (rows checked by `check_key_range`)."""
    pad = lambda values, width: pc.utf8_lpad(pa.array(values).cast(pa.string()), width, "0")  # noqa: E731
    return pc.binary_join_element_wise("p", pad(prompt_id, 6), "_s", pad(sample_idx, 5), "")


def shard_files(part: np.ndarray) -> pa.Array:
    """The shard file (`shard-NNNNNN.tar`) each row's reward part describes."""
    ids, inverse = np.unique(part, return_inverse=True)
    names = pa.array([f"{contract.shard_name(int(i))}.tar" for i in ids])
    return names.take(pa.array(inverse.astype(np.int32)))


def nonfinite(rows: PartRows) -> np.ndarray:
    return ~np.isfinite(rows.reward)


def nonfinite_error(count: int, keys: list[str]) -> FilterError:
    shown = ", ".join(keys) + (" …" if count > len(keys) else "")
    return FilterError(f"{count} reward(s) are NaN or infinite ({shown}); fix the reward, or set "
                       "filter.nan_policy=drop to leave them out")


def first_keys(rows: PartRows, mask: np.ndarray, limit: int = 5) -> list[str]:
    idx = np.flatnonzero(mask)[:limit]
    return [contract.sample_key(int(rows.prompt_id[i]), int(rows.sample_idx[i])) for i in idx]


def in_canonical_order(rows: PartRows) -> PartRows:
    """Rows sorted by (prompt_id, sample_idx), keys checked; a sample listed twice is an error."""
    check_key_range(rows)
    try:
        order = canonical_order(rows.prompt_id, rows.sample_idx)
    except SelectionError as exc:
        raise FilterError(str(exc)) from None
    return rows if order is None else rows.take(order)


def prompt_slices(rows: PartRows, target_rows: int) -> list[PartRows]:
    """Consecutive slices of about `target_rows` rows that never split a prompt (canonical rows)."""
    cuts, n = [0], len(rows)
    while cuts[-1] + target_rows < n:
        at = cuts[-1] + target_rows
        # Move the cut forward to the first row of the next prompt.
        at += int(np.searchsorted(rows.prompt_id[at:], rows.prompt_id[at - 1], side="right"))
        if at >= n:
            break
        cuts.append(at)
    cuts.append(n)
    return [rows.take(slice(lo, hi)) for lo, hi in zip(cuts[:-1], cuts[1:])]


@dataclass
class Picked:
    """A partition's accepted rows (reshaped reward without the global threshold term)."""

    table: pa.Table
    considered: int  # rows after dedup
    per_prompt: dict[int, int]


def pick(rows: PartRows, res: Resolved) -> Picked:
    """Apply the resolved rule to one partition (canonical rows of whole prompts)."""
    try:
        chosen = select_rows(rows.prompt_id, rows.sample_idx, rows.reward, rows.hash_code, res)
    except SelectionError as exc:
        raise FilterError(str(exc)) from None
    idx = chosen.index
    prompt_id, sample_idx = rows.prompt_id[idx], rows.sample_idx[idx]
    table = pa.table({
        "key": sample_keys(prompt_id, sample_idx), "shard": shard_files(rows.part[idx]), "prompt_id": prompt_id,
        "sample_idx": sample_idx, "reward": rows.reward[idx],
        "reshaped_reward": chosen.reshaped_reward.astype(np.float64), "rank_in_prompt": chosen.rank_in_prompt,
    })
    return Picked(table, chosen.rows_considered, chosen.per_prompt)


def finish(table: pa.Table, res: Resolved, acceptance_rate: float) -> pa.Table:
    """Add the global term of deterministic-set rules, sort by (prompt_id, rank), fix the schema."""
    reshaped = add_threshold_ratio(res, table["reshaped_reward"].to_numpy(), acceptance_rate)
    table = table.set_column(table.schema.get_field_index("reshaped_reward"), "reshaped_reward", pa.array(reshaped))
    order = pc.sort_indices(table, sort_keys=[("prompt_id", "ascending"), ("rank_in_prompt", "ascending")])
    return table.take(order).cast(ACCEPTED_SCHEMA)


@dataclass
class Selected:
    """What an engine hands back to the stage (the accepted rows are already written)."""

    res: Resolved
    stats: object  # pgraft.selection.RewardStats of the rows considered for global parameters
    rows_in: int  # after NaN handling
    dropped: int  # NaN/inf rewards left out
    considered: int  # after dedup
    accepted: int
    per_prompt: dict[int, int]
    fingerprint: str
    accepted_parts: list[str]
    nodes: list[str] = field(default_factory=list)  # Ray nodes that selected and wrote (Ray engine)


def merge_counts(into: dict[int, int], more: dict[int, int]) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0) + value
