"""Fixtures for stage tests."""

from __future__ import annotations

import pytest

from pgraft.tasks import digits


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
    """A digits classifier trained for a few seconds: good enough to rank samples."""
    model, _ = digits.train_classifier(seed=0, epochs=5)
    out = tmp_path_factory.mktemp("task") / "classifier"
    digits.save_classifier(model, out)
    return out
