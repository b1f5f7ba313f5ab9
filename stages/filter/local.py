"""The local engine: one process, parts read and prompts selected on a few threads.

Parts are fetched, validated and decoded in parallel (I/O, Arrow and most numpy release the
GIL); the table is then cut into slices of whole prompts that are selected in parallel; the
accepted rows (few) are written as one part.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from pgraft.config import Config
from pgraft.selection import ArrayRewardStats, resolve
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
    prompt_slices,
)

_SLICE_ROWS = 500_000  # rows per selection slice: big enough to amortise numpy calls, small for temporaries


def read_rows(storage: Storage, parts: list[str], dedup: bool, threads: int) -> tuple[PartRows, str]:
    """All parts' selection columns in part order, and the table's fingerprint."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        loaded = list(pool.map(lambda key: load_part(storage, key, dedup), parts))
    check_same_schema([part.signature for part in loaded], [storage.url(key) for key in parts])
    fingerprint = table_fingerprint(parts, [part.digest for part in loaded])
    return PartRows.concat([part.rows for part in loaded]), fingerprint


def select_local(storage: Storage, parts: list[str], cfg: Config, seed: int, output: AcceptedOutput) -> Selected:
    threads = max(2, os.cpu_count() or 1)
    rows, fingerprint = read_rows(storage, parts, cfg.filter.dedup, threads=min(8, 2 * threads))
    bad = nonfinite(rows)
    dropped = int(bad.sum())
    if dropped:
        if cfg.filter.nan_policy == "error":
            raise nonfinite_error(dropped, first_keys(rows, bad))
        rows = rows.take(~bad)
    if len(rows) == 0:
        raise FilterError("the reward table has no usable rows")
    rows = in_canonical_order(rows)
    stats = ArrayRewardStats(rows.reward, rows.prompt_id)
    res = resolve(cfg.filter, stats, seed)

    slices = prompt_slices(rows, max(_SLICE_ROWS, -(-len(rows) // threads)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        picked = list(pool.map(lambda part: pick(part, res), slices))
    considered = sum(p.considered for p in picked)
    accepted = sum(p.table.num_rows for p in picked)
    per_prompt: dict[int, int] = {}
    for p in picked:
        merge_counts(per_prompt, p.per_prompt)
    written = []
    if accepted:  # an empty selection is refused by the stage, with nothing written
        table = finish(pa.concat_tables([p.table for p in picked]), res, accepted / considered)
        written.append(output.write(0, table))
    return Selected(res=res, stats=stats, rows_in=len(rows), dropped=dropped, considered=considered, accepted=accepted,
                    per_prompt=per_prompt, fingerprint=fingerprint, accepted_parts=written)
