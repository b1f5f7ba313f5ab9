"""The t2i task's spec: its defaults, its refusals (no pretraining, nothing to invert) and its features."""

from __future__ import annotations

import numpy as np
import pytest

from pgraft.config import ConfigError, load_config
from pgraft.tasks import get_task
from pgraft.tasks.t2i import T2IError, feature_extractor
from pgraft.work.reward import check_reward_config, reward_model_path


def test_t2i_defaults_come_from_the_spec(tmp_path):
    cfg = load_config("configs/sd2-vqascore.yaml", [f"task.dir={tmp_path}"])
    assert cfg.model.kind == "stable_diffusion" and cfg.model.path == f"{tmp_path}/sd2"
    assert reward_model_path(cfg) == f"{tmp_path}/vqa" and cfg.reward.hash == "perceptual"
    with pytest.raises(ConfigError, match=r"reward.model_path: no vqascore weights \(config.json\) at '.*/vqa'"):
        check_reward_config(cfg)


def test_t2i_has_no_real_data_to_invert(tmp_path):
    from pgraft.work.invert import InvertError, _task_points

    with pytest.raises(InvertError, match="task t2i has no real data to invert; set invert.data to a WebDataset"):
        _task_points(load_config("configs/sd2-vqascore.yaml", [f"task.dir={tmp_path}"]))


def test_t2i_refuses_to_pretrain_and_names_where_models_go():
    with pytest.raises(T2IError, match=r"task t2i does not pretrain: put an SD 2.x diffusers folder at s3://b/t2i/sd2 "
                                       r"and an image-text-to-text model at s3://b/t2i/vqa"):
        get_task("t2i").pretrain("s3://b/t2i", seed=0, progress=False)  # as `pgraft pretrain` calls it
    assert get_task("t2i").real_data is None and get_task("t2i").real_samples is None


def test_t2i_features_are_shrunk_pixels():
    images = [np.full((512, 512, 3), 255, np.uint8), np.zeros((16, 16), np.uint8)]
    features = feature_extractor(None)(images)
    assert features.shape == (2, 64 * 64 * 3) and features[0].min() == 1.0 and features[1].max() == 0.0
