"""sample_hash: what dedup compares. One signature for all: (decoded sample, metadata) -> str.

`exact` hashes the decoded sample (pixels, or a string's bytes); `perceptual` is a 64-bit
difference hash (dHash) that maps near-duplicate images to the same string;
tasks bring hashes of their own (TaskSpec.hashes: the molecules task's `canonical_smiles`),
and other modalities plug in a `module:function`. `hash_takes` says which sample kind a hash
takes (pgraft.samples), so the config refuses a hash the task cannot feed."""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
from PIL import Image

from pgraft.errors import ConfigError
from pgraft.plugins import load_plugin

SampleHash = Callable[[object, dict], str]


def exact_hash(sample, metadata: dict) -> str:
    """sha256 of an image's shape + pixels (or of a string's UTF-8 bytes), first 16 bytes in hex:
    equal iff the decoded samples are equal."""
    if isinstance(sample, str):
        return hashlib.sha256(sample.encode()).hexdigest()[:32]
    digest = hashlib.sha256(str(sample.shape).encode() + np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()[:32]


def perceptual_hash(image: np.ndarray, metadata: dict, size: int = 8) -> str:
    """dHash: grey, resize to (size+1)×size, one bit per horizontal gradient sign."""
    grey = Image.fromarray(image).convert("L").resize((size + 1, size), Image.BILINEAR)
    px = np.asarray(grey, dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):0{size * size // 4}x}"


# Dispatch table: reward.hash -> function.
HASHES: dict[str, SampleHash] = {"exact": exact_hash, "perceptual": perceptual_hash}
# The sample kind each built-in hash takes (None: any).
HASH_TAKES: dict[str, str | None] = {"exact": None, "perceptual": "image"}


def _task_hashes() -> dict[str, tuple[SampleHash, str]]:
    """The hashes the registered tasks bring: name -> (function, the task's sample kind)."""
    from pgraft.tasks import TASKS

    return {name: (fn, spec.sample_kind) for spec in TASKS.values() for name, fn in spec.hashes.items()}


def hash_takes(name: str) -> str | None:
    """The sample kind `name` takes; None for any kind, or a plug-in (not imported here)."""
    if name in HASH_TAKES:
        return HASH_TAKES[name]
    return _task_hashes()[name][1] if name in _task_hashes() else None


def get_hash(name: str) -> SampleHash:
    if name in HASHES:
        return HASHES[name]
    if name in _task_hashes():
        return _task_hashes()[name][0]
    if ":" in name:
        return load_plugin(name, "reward.hash")
    raise ConfigError(f"config error: reward.hash: unknown hash {name!r}; use {sorted(HASHES) + sorted(_task_hashes())} or module:function")
