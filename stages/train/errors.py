"""The train stage's user-facing error."""

from __future__ import annotations

from pgraft.errors import PgraftError


class TrainError(PgraftError):
    """The train stage cannot run as configured; the message says why."""
