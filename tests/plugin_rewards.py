"""Reward and hash plug-ins used by the tests through `module:function`."""

import numpy as np


def mean_brightness(model_path, device, scale: float = 1.0):
    def reward_fn(images, prompts, metadata):
        return np.array([scale * float(np.mean(im)) for im in images])

    return reward_fn


def explodes_on_sample_3(model_path, device):
    def reward_fn(images, prompts, metadata):
        if any(m["sample_idx"] == 3 for m in metadata):
            raise RuntimeError("cannot score this one")
        return np.zeros(len(images))

    return reward_fn


def nan_for_odd_samples(model_path, device):
    def reward_fn(images, prompts, metadata):
        return np.array([np.nan if m["sample_idx"] % 2 else float(m["sample_idx"]) for m in metadata])

    return reward_fn


def constant_hash(image, metadata):
    return "same"
