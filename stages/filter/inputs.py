"""Reading a round's reward parts for a selection: listing, validation, per-part columns.

Every part is checked against the contract's reward schema before any row is used, so a
foreign file, a part written by another version or a column of the wrong type stops the
stage with one line naming the part, before anything is written.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pgraft import contract
from pgraft.commits import list_committed
from pgraft.config import Config
from pgraft.selection import hash_codes
from pgraft.storage import Storage
from pgraft.tables import arrow_schema, list_reward_parts
from stages.filter.errors import FilterError

REWARD_SCHEMA = arrow_schema(contract.REWARD_COLUMNS)


def reward_parts(storage: Storage, cfg: Config, allow_partial: bool) -> list[str]:
    """Keys of the reward table's parts in shard order; refuses a table missing committed shards."""
    rnd, table = cfg.run.round, cfg.reward.table_name()
    committed = list_committed(storage, rnd)
    parts = list_reward_parts(storage, rnd, table)
    if not parts:
        raise FilterError(f"no reward table {table!r} in round {rnd} of {storage.uri}; run `pgraft reward` first")
    missing = sorted(set(committed) - set(parts))
    if missing and not allow_partial:
        shown = ", ".join(contract.shard_name(s) for s in missing[:10]) + (" …" if len(missing) > 10 else "")
        raise FilterError(f"reward table {table!r} lacks parts for {len(missing)} committed shard(s): {shown}; "
                          "rerun `pgraft reward` or pass --allow-partial")
    return [parts[s] for s in sorted(parts)]


@dataclass
class PartRows:
    """The columns a selection needs, from one or more parts (numpy, one entry per row)."""

    prompt_id: np.ndarray  # int64
    sample_idx: np.ndarray  # int64
    reward: np.ndarray  # float64 (NaN where the part has a null)
    part: np.ndarray  # int32: shard id of the part each row came from
    hash_code: np.ndarray | None  # int64 codes of sample_hash (dedup only)

    def __len__(self) -> int:
        return len(self.reward)

    def take(self, index) -> "PartRows":
        return PartRows(self.prompt_id[index], self.sample_idx[index], self.reward[index], self.part[index],
                        None if self.hash_code is None else self.hash_code[index])

    @classmethod
    def concat(cls, pieces: list["PartRows"]) -> "PartRows":
        if len(pieces) == 1:
            return pieces[0]
        codes = None if pieces[0].hash_code is None else np.concatenate([p.hash_code for p in pieces])
        return cls(*(np.concatenate([getattr(p, name) for p in pieces]) for name in ("prompt_id", "sample_idx", "reward", "part")),
                   codes)


def check_schema(schema: pa.Schema, where: str) -> None:
    """The contract's columns must be there with the contract's types (a reward may add its own)."""
    have = {field.name: field.type for field in schema}
    missing = [name for name in REWARD_SCHEMA.names if name not in have]
    if missing:
        raise FilterError(f"reward part {where} lacks column(s) {', '.join(missing)}: it was not written by "
                          "`pgraft reward`; delete it and rerun `pgraft reward`")
    for field in REWARD_SCHEMA:
        if have[field.name] != field.type:
            raise FilterError(f"reward part {where}: column {field.name} is {have[field.name]}, expected {field.type}; "
                              "delete the part and rerun `pgraft reward`")


def schema_signature(schema: pa.Schema) -> str:
    return "\n".join(sorted(f"{field.name}: {field.type}" for field in schema))


def check_same_schema(signatures: list[str], wheres: list[str]) -> None:
    """Every part of one table has the first part's columns (a reward's extras included)."""
    first = set(signatures[0].split("\n")) if signatures else set()
    for signature, where in zip(signatures[1:], wheres[1:]):
        if signature != signatures[0]:
            mine = set(signature.split("\n"))
            diff = sorted(mine ^ first)
            raise FilterError(f"reward part {where} has another schema than {wheres[0]} (differs in {'; '.join(diff)}): "
                              "the table mixes parts of different rewards or versions; rerun `pgraft reward` into a "
                              "new reward.name")


def parse_part(data: bytes, shard_id: int, where: str, dedup: bool) -> tuple[str, PartRows]:
    """Validate one part's bytes and decode the selection's columns; also its schema signature."""
    try:
        source = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise FilterError(f"reward part {where} is not a Parquet file ({str(exc).splitlines()[0]}); "
                          "delete it and rerun `pgraft reward`") from None
    check_schema(source.schema_arrow, where)
    columns = ["prompt_id", "sample_idx", "reward"] + (["sample_hash"] if dedup else [])
    try:
        table = source.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FilterError(f"reward part {where} cannot be read ({str(exc).splitlines()[0]}); "
                          "delete it and rerun `pgraft reward`") from None
    for name in ("prompt_id", "sample_idx") + (("sample_hash",) if dedup else ()):
        if table[name].null_count:
            raise FilterError(f"reward part {where}: column {name} has {table[name].null_count} null(s); "
                              "delete the part and rerun `pgraft reward`")
    rewards = table["reward"].to_numpy()  # nulls become NaN: handled by filter.nan_policy
    return schema_signature(source.schema_arrow), PartRows(table["prompt_id"].to_numpy(), table["sample_idx"].to_numpy(), rewards,
                    np.full(table.num_rows, shard_id, np.int32),
                    hash_codes(table["sample_hash"]) if dedup else None)


@dataclass
class LoadedPart:
    digest: str  # sha256 of the part's bytes: feeds the table's fingerprint
    signature: str  # schema_signature: parts of one table must agree
    rows: PartRows


def load_part(storage: Storage, key: str, dedup: bool) -> LoadedPart:
    data = storage.get_bytes(key)
    signature, rows = parse_part(data, contract.part_shard_id(key), storage.url(key), dedup)
    return LoadedPart(hashlib.sha256(data).hexdigest(), signature, rows)
