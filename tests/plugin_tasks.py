"""Plug-in tasks for the task-registry tests (named `plugin_tasks:…` in configs)."""

import numpy as np

from pgraft.tasks import RewardWeights, TaskSpec


def _pretrain(location, seed=0, threads=None, progress=False, **options):
    return {"total_seconds": 0.0}


def _features(weights):
    return lambda samples: np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)


def _real(split, seed, task_dir=None):
    return np.zeros((4, 2, 2), dtype=np.uint8)


TINY = TaskSpec(
    name="tiny", pretrain=_pretrain, pretrain_options={}, base_model="base", reward="jpeg_compressibility",
    rewards={}, reward_weights={"jpeg_compressibility": RewardWeights("nothing", "none.json")}, hash="perceptual",
    prompts=("a", "b"), real_data=lambda split, seed, task_dir=None: (np.zeros((4, 1, 2, 2)), ["a"] * 4), real_samples=_real,
    features=_features, feature_weights=None, decode=lambda x: x,
)


def tiny_factory():
    return TINY


class NoReward:
    """Looks like a task but declares no default reward."""

    def __getattr__(self, name):
        if name == "reward":
            raise AttributeError(name)
        return getattr(TINY, name)


NO_REWARD = NoReward()


# A task whose samples are of a kind pgraft.samples does not know.
ODD_KIND = TaskSpec(**{**TINY.__dict__, "name": "odd", "sample_kind": "point_cloud"})
