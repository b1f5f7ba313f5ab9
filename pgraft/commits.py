"""Which shards of a run are committed: their commit records, read without loading any
shard code (no torch), so light stages (filter, status) start fast; and the check a rerun
makes of them, which moves torn objects aside so that the rerun redoes them."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

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


def whole(storage: Storage, key: str, size: int, sha256: str) -> bool:
    """Whether the object at `key` is there with exactly the recorded size and sha256."""
    if not storage.exists(key):
        return False
    got_size, got_sha = storage.digest(key)
    return got_size == size and got_sha == sha256


def set_aside(storage: Storage, keys: Iterable[str]) -> list[str]:
    """Move objects to `torn/<key>.<UTC stamp>` (contract.torn_key); returns where they went."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for key in keys:
        if storage.exists(key):
            storage.move(key, contract.torn_key(key, stamp))
            moved.append(contract.torn_key(key, stamp))
    return moved


def drop_torn(storage: Storage, records: dict, keys_of: Callable[[int], tuple[str, str]],
              check: Callable[[int], bool], what: str) -> list[int]:
    """Check every recorded unit (`check(id)`: its bytes match its record) on a few threads;
    move each failing unit's object and record aside (`keys_of(id)` = (object key, record
    key)) and drop it from `records`, so that the caller's rerun redoes it. Returns the torn ids."""
    ids = sorted(records)
    with ThreadPoolExecutor(max_workers=8) as pool:
        torn = [unit for unit, ok in zip(ids, pool.map(check, ids)) if not ok]
    for unit in torn:
        object_key, record_key = keys_of(unit)
        set_aside(storage, (object_key, record_key))
        del records[unit]
        print(f"{storage.url(object_key)} does not match its commit record: moved aside under "
              f"{storage.url(contract.TORN_DIR)}/; this {what} is redone", file=sys.stderr, flush=True)
    return torn


def drop_torn_shards(storage: Storage, prefix: str, committed: dict[int, CommitRecord]) -> list[int]:
    """`drop_torn` for the shards under `prefix`: a tar whose bytes differ from its commit record."""
    return drop_torn(storage, committed,
                     lambda sid: (contract.shard_key_at(prefix, sid), contract.commit_key_at(prefix, sid)),
                     lambda sid: whole(storage, contract.shard_key_at(prefix, sid), committed[sid].bytes,
                                       committed[sid].sha256), "shard")
