"""Parquet tables of a run: reward parts (one per shard) and accepted selections.

Writes go to a local temp file and then through `Storage.put_file`, so a part appears whole
or not at all. Reads go through `Storage` too (local or S3), hashing the bytes they read:
the hash of all parts is the table's fingerprint, recorded by every selection made from it.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from pgraft import contract
from pgraft.errors import PgraftError
from pgraft.commits import drop_torn, whole
from pgraft.contract import PartRecord
from pgraft.storage import Storage, stream_digest


class MissingSelection(PgraftError):
    """A selection that a later stage needs does not exist; says which and what to run."""


def arrow_schema(columns: dict[str, str]) -> pa.Schema:
    return pa.schema([(name, getattr(pa, kind)()) for name, kind in columns.items()])


def write_parquet(storage: Storage, key: str, table: pa.Table) -> tuple[int, str]:
    """Write `table` to `key`; returns the (size, sha256) of the bytes written."""
    with tempfile.TemporaryDirectory(prefix="pgraft-parquet-") as tmp:
        local = Path(tmp) / "part.parquet"
        pq.write_table(table, local, compression="zstd")
        storage.put_file(local, key)
        with open(local, "rb") as f:
            return stream_digest(f)


def commit_reward_part(storage: Storage, key: str, table: pa.Table) -> PartRecord:
    """Write one reward part, then its commit record: the part counts once the record exists."""
    size, sha256 = write_parquet(storage, key, table)
    record = PartRecord(part=Path(key).name, rows=table.num_rows, bytes=size, sha256=sha256)
    storage.put_bytes(contract.part_record_key(key), record.to_json())
    return record


def scored_parts(storage: Storage, round_idx: int, name: str) -> tuple[dict[int, str], list[int]]:
    """The reward parts of a table that count as scored, by shard id, and the ids of torn ones:
    a part counts once its commit record exists and its bytes match it. A torn part (and its
    record) is moved aside under torn/; a part without a record (its write was cut short, or an
    older pgraft wrote it) is left to be written again. Both are redone by the rerun."""
    parts = list_reward_parts(storage, round_idx, name)
    records = {sid: PartRecord.from_json(storage.get_bytes(contract.part_record_key(key)),
                                         storage.url(contract.part_record_key(key)))
               for sid, key in parts.items()}
    torn = drop_torn(storage, records, lambda sid: (parts[sid], contract.part_record_key(parts[sid])),
                     lambda sid: whole(storage, parts[sid], records[sid].bytes, records[sid].sha256), "reward part")
    return {sid: parts[sid] for sid in records}, torn


def read_parquet(storage: Storage, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.get_bytes(key)))


@dataclass
class RewardTable:
    table: pa.Table
    fingerprint: str  # sha256 over (part name, part sha256) of every part read


def list_reward_parts(storage: Storage, round_idx: int, name: str) -> dict[int, str]:
    """The committed parts of a reward table (a part with its commit record), by shard id."""
    return contract.committed_parts(storage.list(contract.rewards_prefix(round_idx, name)))


def fingerprint_line(key: str, sha256: str) -> bytes:
    return f"{Path(key).name}:{sha256}\n".encode()


def table_fingerprint(part_keys: list[str], digests: list[str]) -> str:
    """The fingerprint of a table from its parts' keys and sha256 digests, in part order."""
    fingerprint = hashlib.sha256()
    for key, digest in zip(part_keys, digests):
        fingerprint.update(fingerprint_line(key, digest))
    return fingerprint.hexdigest()


def fingerprint_parts(storage: Storage, part_keys: list[str]) -> str:
    """The table fingerprint without holding the parts in memory (streams each part)."""
    return table_fingerprint(part_keys, [storage.digest(key)[1] for key in part_keys])


def read_reward_table(storage: Storage, part_keys: list[str], columns: list[str] | None = None,
                      with_part_ids: bool = False) -> RewardTable:
    """Read the given parts (in order) into one table, fingerprinting the bytes read;
    `with_part_ids` adds an int32 `_part` column: the shard id each row's part belongs to."""
    from concurrent.futures import ThreadPoolExecutor

    def load(key: str) -> tuple[str, pa.Table]:
        data = storage.get_bytes(key)
        table = pq.read_table(io.BytesIO(data), columns=columns)
        if with_part_ids:
            table = table.append_column("_part", pa.array(np.full(table.num_rows, contract.part_shard_id(key), np.int32)))
        return hashlib.sha256(data).hexdigest(), table

    # Parts are independent: fetch and decode them on a few threads (I/O and Arrow release the GIL).
    with ThreadPoolExecutor(max_workers=8) as pool:
        loaded = list(pool.map(load, part_keys))
    tables = [table for _, table in loaded]
    table = pa.concat_tables(tables) if tables else arrow_schema(contract.REWARD_COLUMNS).empty_table()
    return RewardTable(table, table_fingerprint(part_keys, [digest for digest, _ in loaded]))


def read_accepted_table(storage: Storage, round_idx: int, name: str, summary: dict) -> pa.Table:
    """A selection's accepted rows sorted by (prompt_id, rank_in_prompt): the parts its summary
    lists, or the single `accepted.parquet` of selections made before parts."""
    keys = [f"{contract.accepted_prefix(round_idx, name)}/{part}" for part in summary.get("accepted_parts") or []]
    if not keys:
        return read_parquet(storage, contract.accepted_key(round_idx, name))
    table = pa.concat_tables([read_parquet(storage, key) for key in keys])
    order = pa.compute.sort_indices(table, sort_keys=[("prompt_id", "ascending"), ("rank_in_prompt", "ascending")])
    return table.take(order)


def accepted_content(storage: Storage, round_idx: int, name: str, summary: dict) -> tuple[bytes, int]:
    """(bytes that stand for a selection's accepted rows, row count), for fingerprints: the
    sorted rows as Arrow IPC, so the same rows give the same bytes however they were split
    into parts; selections made before parts give their `accepted.parquet` bytes, as before."""
    if not summary.get("accepted_parts"):
        data = storage.get_bytes(contract.accepted_key(round_idx, name))
        return data, pq.read_metadata(io.BytesIO(data)).num_rows
    table = read_accepted_table(storage, round_idx, name, summary).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes(), table.num_rows


def read_selection_summary(storage: Storage, round_idx: int, name: str) -> dict:
    """A selection's summary.json (written by the filter stage), checked to exist."""
    key = contract.selection_summary_key(round_idx, name)
    if not storage.exists(key):
        raise MissingSelection(f"selection {name!r} does not exist in round {round_idx} of {storage.uri}; "
                               "run `pgraft filter`")
    import json

    return json.loads(storage.get_bytes(key))


def read_accepted(storage: Storage, round_idx: int, name: str) -> pa.Table:
    """The accepted table of a selection, checked to exist (what the train stage reads)."""
    return read_accepted_table(storage, round_idx, name, read_selection_summary(storage, round_idx, name))
