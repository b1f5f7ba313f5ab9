"""The filter stage's error type (shared by its modules)."""

from pgraft.errors import PgraftError


class FilterError(PgraftError):
    """The selection cannot be made or would clash with an existing one; says what to do."""
