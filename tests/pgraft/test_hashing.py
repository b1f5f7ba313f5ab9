from __future__ import annotations

import numpy as np
import pytest

from pgraft.config import ConfigError
from pgraft.hashing import exact_hash, get_hash, perceptual_hash


def test_exact_hash_sees_every_pixel():
    image = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    same = image.copy()
    changed = image.copy()
    changed[3, 3] ^= 1
    assert exact_hash(image, {}) == exact_hash(same, {}) != exact_hash(changed, {})
    assert exact_hash(image.reshape(4, 16), {}) != exact_hash(image, {})


def test_perceptual_hash_groups_near_duplicates():
    x = np.linspace(0, 255, 32)
    image = np.outer(x, np.ones(32)).astype(np.uint8).T.copy()
    noisy = np.clip(image.astype(int) + np.random.default_rng(1).integers(-2, 3, image.shape), 0, 255).astype(np.uint8)
    other = image[:, ::-1].copy()
    assert perceptual_hash(image, {}) == perceptual_hash(noisy, {}) != perceptual_hash(other, {})
    assert len(perceptual_hash(image, {})) == 16


def test_hash_lookup():
    assert get_hash("exact") is exact_hash
    assert get_hash("plugin_rewards:constant_hash")(None, {}) == "same"
    with pytest.raises(ConfigError, match="reward.hash: unknown hash 'md5'"):
        get_hash("md5")
