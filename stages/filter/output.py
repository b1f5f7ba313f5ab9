"""Where a selection's accepted parts go, written from any node (it holds a storage
location, not a path). Part names carry a token of this make, so an earlier make of the
same selection stays whole until the new summary replaces its summary; its parts are
removed only after that."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pyarrow as pa

from pgraft import contract
from pgraft.storage import Storage
from pgraft.tables import write_parquet


@dataclass
class AcceptedOutput:
    storage: Storage
    round: int
    name: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def write(self, index: int, table: pa.Table) -> str:
        """Write one part; return its name (as the summary lists it)."""
        key = contract.accepted_part_key(self.round, self.name, self.token, index)
        write_parquet(self.storage, key, table)
        return PurePosixPath(key).name

    def discard(self) -> None:
        """Remove what this make wrote (it failed): the selection is left as it was."""
        for key in self.storage.list(contract.accepted_prefix(self.round, self.name) + "/"):
            if PurePosixPath(key).name.startswith(f"part-{self.token}-"):
                self.storage.delete(key)

    def remove_stale(self, kept: list[str]) -> None:
        """After the summary is written: drop parts of earlier makes and the older single file."""
        for key in self.storage.list(contract.accepted_prefix(self.round, self.name) + "/"):
            if PurePosixPath(key).name not in kept:
                self.storage.delete(key)
        legacy = contract.accepted_key(self.round, self.name)
        if self.storage.exists(legacy):
            self.storage.delete(legacy)
