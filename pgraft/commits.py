"""Which shards of a run are committed: their commit records, read without loading any
shard code (no torch), so light stages (filter, status) start fast."""

from __future__ import annotations

from pgraft import contract
from pgraft.contract import CommitRecord
from pgraft.storage import Storage


def list_committed(storage: Storage, round_idx: int) -> dict[int, CommitRecord]:
    """Committed generate shards of a round by shard id (see `list_committed_at`)."""
    return list_committed_at(storage, contract.generate_prefix(round_idx))


def list_committed_at(storage: Storage, prefix: str) -> dict[int, CommitRecord]:
    """Committed shards under `prefix` by shard id. A tar without its record is not listed."""
    keys = set(storage.list(prefix))
    committed: dict[int, CommitRecord] = {}
    for key in sorted(keys):
        if not key.endswith(".json"):
            continue
        shard_id = contract.shard_id_of(key)
        if shard_id is None or contract.shard_key_at(prefix, shard_id) not in keys:
            continue  # a record whose tar vanished counts as not committed: the unit is redone
        committed[shard_id] = CommitRecord.from_json(storage.get_bytes(key), where=storage.url(key))
    return committed
