"""Every reward has one signature; built-ins on real (tiny) models, plug-ins by module:function."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pgraft.config import ConfigError
from pgraft.rewards import REWARDS, RewardOutput, as_output, make_reward, task_rewards
from pgraft.tasks import digits

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tiny_models import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def digit_images(n=20):
    x, y = digits.load_data("test")
    return list(((x[:n, 0] + 1) * 127.5).round().numpy().astype(np.uint8)), y[:n].tolist()


def test_digits_alignment_scores_real_digits_high(classifier_dir):
    images, labels = digit_images()
    prompts = [digits.prompt_for(d) for d in labels]
    out = as_output(make_reward("digits_alignment", str(classifier_dir), CPU, {})(images, prompts, [{}] * 20), 20)
    assert out.rewards.mean() > 0.8 and set(out.columns) == {"alignment", "predicted_digit"}
    wrong = [digits.prompt_for((d + 1) % 10) for d in labels]
    assert as_output(make_reward("digits_alignment", str(classifier_dir), CPU, {})(images, wrong, [{}] * 20), 20).rewards.mean() < 0.2
    logp = as_output(make_reward("digits_alignment", str(classifier_dir), CPU, {"transform": "log_prob"})(images, prompts, [{}] * 20), 20)
    np.testing.assert_allclose(np.exp(logp.rewards), out.rewards, rtol=1e-9)


def test_jpeg_rewards_prefer_flat_or_detailed_images():
    flat = np.full((32, 32, 3), 128, np.uint8)
    noisy = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    comp = as_output(make_reward("jpeg_compressibility", None, CPU, {})([flat, noisy], ["", ""], [{}, {}]), 2)
    incomp = as_output(make_reward("jpeg_incompressibility", None, CPU, {})([flat, noisy], ["", ""], [{}, {}]), 2)
    assert comp.rewards[0] > comp.rewards[1] and incomp.rewards[1] > incomp.rewards[0]
    np.testing.assert_allclose(comp.rewards, -incomp.rewards)


def test_clip_score_and_aesthetic_on_a_tiny_clip(tiny_clip, tmp_path):
    images = [np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in range(3)]
    prompts = ["a cat", "a dog", "a house"]
    scores = as_output(make_reward("clip_score", str(tiny_clip), CPU, {})(images, prompts, [{}] * 3), 3).rewards
    assert scores.shape == (3,) and np.all(np.abs(scores) <= 100.0)
    head = tmp_path / "head.safetensors"
    torch.manual_seed(0)
    save_file({"layers.0.weight": torch.randn(8, 16), "layers.0.bias": torch.zeros(8),
               "layers.1.weight": torch.randn(1, 8), "layers.1.bias": torch.tensor([0.5])}, head)
    fn = make_reward("aesthetic", str(tiny_clip), CPU, {"head_path": str(head), "activation": "relu"})
    values = as_output(fn(images, prompts, [{}] * 3), 3).rewards
    assert values.shape == (3,) and np.all(np.isfinite(values)) and len(set(values.round(6))) == 3


def test_plugins_and_bad_names():
    fn = make_reward("plugin_rewards:mean_brightness", None, CPU, {"scale": 2.0})
    assert as_output(fn([np.full((4, 4), 10, np.uint8)], [""], [{}]), 1).rewards.tolist() == [20.0]
    with pytest.raises(ConfigError, match="reward.name: unknown reward 'nope'"):
        make_reward("nope", None, CPU, {})
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        make_reward("no_such_module:f", None, CPU, {})
    with pytest.raises(ConfigError, match="reward.options: jpeg_compressibility does not take"):
        make_reward("jpeg_compressibility", None, CPU, {"quality": 3})
    with pytest.raises(ConfigError, match="no digits classifier|needs the classifier"):
        make_reward("digits_alignment", None, CPU, {})


def test_vqascore_backends_say_what_they_need():
    import importlib.util

    with pytest.raises(ConfigError, match="reward.model_path: vqascore needs an image-text-to-text model folder"):
        make_reward("vqascore", None, CPU, {})
    with pytest.raises(ConfigError, match=r"reward.options.backend: 'clip'; one of \['native', 't2v_metrics'\]"):
        make_reward("vqascore", None, CPU, {"backend": "clip"})
    if importlib.util.find_spec("t2v_metrics"):
        pytest.skip("t2v_metrics is installed here; the rest checks the error when it is not")
    with pytest.raises(ConfigError, match="reward.options.backend: t2v_metrics is not installed"):
        make_reward("vqascore", None, CPU, {"backend": "t2v_metrics"})


def test_output_length_is_checked():
    with pytest.raises(ValueError, match="returned 1 rewards for 2 images"):
        as_output(np.zeros(1), 2)
    with pytest.raises(ValueError, match="extra column 'x' has 1 values"):
        as_output(RewardOutput(np.zeros(2), {"x": np.zeros(1)}), 2)
    assert set(REWARDS) >= {"jpeg_compressibility", "jpeg_incompressibility", "clip_score", "aesthetic"}
    # A task's own reward is registered by its TaskSpec, not in the generic table.
    assert "digits_alignment" not in REWARDS and "digits_alignment" in task_rewards()
