"""sample_hash: what dedup compares. One signature for all: (image, metadata) -> str.

`exact` hashes the decoded pixels; `perceptual` is a 64-bit difference hash (dHash) that
maps near-duplicate images to the same string; other modalities plug in a `module:function`
(e.g. a hash of a canonical string)."""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
from PIL import Image

from pgraft.errors import ConfigError
from pgraft.plugins import load_plugin

SampleHash = Callable[[np.ndarray, dict], str]


def exact_hash(image: np.ndarray, metadata: dict) -> str:
    """sha256 of shape + pixels, first 16 bytes in hex: equal iff the decoded images are equal."""
    digest = hashlib.sha256(str(image.shape).encode() + np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:32]


def perceptual_hash(image: np.ndarray, metadata: dict, size: int = 8) -> str:
    """dHash: grey, resize to (size+1)×size, one bit per horizontal gradient sign."""
    grey = Image.fromarray(image).convert("L").resize((size + 1, size), Image.BILINEAR)
    px = np.asarray(grey, dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):0{size * size // 4}x}"


# Dispatch table: reward.hash -> function.
HASHES: dict[str, SampleHash] = {"exact": exact_hash, "perceptual": perceptual_hash}


def get_hash(name: str) -> SampleHash:
    if name in HASHES:
        return HASHES[name]
    if ":" in name:
        return load_plugin(name, "reward.hash")
    raise ConfigError(f"config error: reward.hash: unknown hash {name!r}; use {sorted(HASHES)} or module:function")
