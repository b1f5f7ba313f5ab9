"""The digits task: deterministic pretraining, saved models load through the real code path."""

from __future__ import annotations

import json

import numpy as np

from pgraft.config import ModelSection
from pgraft.models.adapters import load_adapter
from pgraft.tasks import digits


def test_data_is_bundled_and_scaled():
    x, y = digits.load_data()
    assert x.shape == (1797, 1, 8, 8) and float(x.min()) == -1.0 and float(x.max()) == 1.0
    train, _ = digits.load_data("train")
    test, _ = digits.load_data("test")
    assert len(train) + len(test) == 1797


def test_short_pretrain_is_deterministic_and_loads(tmp_path):
    kwargs = dict(ddpm_steps=3, flow_steps=3, classifier_epochs=1, eval_samples_per_digit=0, progress=False)
    digits.pretrain_digits(tmp_path / "a", **kwargs)
    digits.pretrain_digits(tmp_path / "b", **kwargs)
    for rel in ["ddpm/unet/diffusion_pytorch_model.safetensors", "flow/unet/diffusion_pytorch_model.safetensors",
                "classifier/model.safetensors", "ddpm/pgraft_model.json"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    card = json.loads((tmp_path / "a/ddpm/pgraft_model.json").read_text())
    assert card["prompts"]["a handwritten digit 7"] == 7 and card["null_class"] == 10

    for kind, scheduler in (("ddpm", "DDIMScheduler"), ("flow", "FlowMatchEulerDiscreteScheduler")):
        adapter = load_adapter(ModelSection(path=str(tmp_path / "a" / kind), num_inference_steps=4, device="cpu"))
        rollout = adapter.rollout(["a handwritten digit 7"], [0], [2])
        assert rollout.scheduler == scheduler and rollout.images.shape == (1, 8, 8)

    classifier = digits.load_classifier(tmp_path / "a/classifier")
    probs = digits.prompt_alignment(classifier, rollout.images, [7])
    assert probs.shape == (1,) and 0.0 <= probs[0] <= 1.0


def test_classifier_is_accurate_on_held_out_digits():
    model, accuracy = digits.train_classifier(seed=0, epochs=15)
    assert accuracy > 0.95  # a CNN reaches ~0.99 on this split; chance is 0.1
    x_test, y_test = digits.load_data("test")
    pngs = ((x_test[:, 0] + 1) * 127.5).round().numpy().astype(np.uint8)
    alignment = digits.prompt_alignment(model, pngs, y_test.numpy())
    assert alignment.mean() > 0.9
