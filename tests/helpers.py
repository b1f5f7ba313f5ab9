"""Helpers shared by test modules (importable as `helpers`; tests/ is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

from pgraft.config import load_config


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under `folder`, by relative path."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes(), os.stat(p).st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stage_config(model_path, uri, classifier, *extra):
    """3 prompts × 24 samples in 9 shards of 8, scored by the digits classifier."""
    return load_config(None, [
        f"run.uri={uri}", f"model.path={model_path}", "model.num_inference_steps=6", "model.device=cpu",
        "generate.prompts=[a handwritten digit 1, a handwritten digit 2, a handwritten digit 3]",
        "generate.samples_per_prompt=24", "generate.samples_per_shard=8", "generate.batch_size=8",
        "generate.capture_steps=[3]", "generate.num_workers=2", f"reward.model_path={classifier}",
        "reward.num_workers=2", "reward.device=cpu", *extra,
    ])
