"""The train stage's user-facing error (shared with every trainer: pgraft.errors.TrainError)."""

from __future__ import annotations

from pgraft.errors import TrainError

__all__ = ["TrainError"]
