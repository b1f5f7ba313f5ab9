"""The digits task: deterministic pretraining, saved models load through the real code path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import snapshot
from pgraft.config import ModelSection
from pgraft.errors import ConfigError
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
        assert rollout.scheduler == scheduler and rollout.samples.shape == (1, 8, 8)

    classifier = digits.load_classifier(tmp_path / "a/classifier")
    probs = digits.prompt_alignment(classifier, rollout.samples, [7])
    assert probs.shape == (1,) and 0.0 <= probs[0] <= 1.0


def test_only_the_asked_bases_are_pretrained_at_the_asked_size_and_a_later_one_is_added_keeping_the_rest(tmp_path):
    """A run pretrains the base it samples from; another base asked for later joins the same
    folder: what was published stays byte for byte, the summary gains the new base's figures."""
    from pgraft.tasks.training import publish

    small = dict(ddpm_steps=3, flow_steps=3, classifier_epochs=1, eval_samples_per_digit=0, width=8, layers_per_block=1)
    build = lambda out, **kw: digits.pretrain_digits(out, seed=0, **kw)  # noqa: E731
    first = publish(str(tmp_path), build, ("flow", "ddpm", "classifier"), bases="ddpm", **small)
    assert first["bases"] == ["ddpm"] and not (tmp_path / "flow").exists()
    assert first["pretrain_options"]["width"] == 8
    unet = json.loads((tmp_path / "ddpm/unet/config.json").read_text())
    assert unet["block_out_channels"] == [8, 16] and unet["layers_per_block"] == 1
    kept = {k: v for k, v in snapshot(tmp_path).items() if k.startswith(("ddpm/", "classifier/"))}
    second = publish(str(tmp_path), build, ("flow", "ddpm", "classifier"), bases="flow", **small)
    assert (tmp_path / "flow/pgraft_model.json").is_file()
    assert {k: v for k, v in snapshot(tmp_path).items() if k.startswith(("ddpm/", "classifier/"))} == kept  # mtimes too
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == second and second["bases"] == ["ddpm", "flow"]
    assert "ddpm_final_loss" in second and "flow_final_loss" in second
    with pytest.raises(ConfigError, match="--bases: unknown base"):
        digits.pretrain_digits(tmp_path / "c", bases="ddpm,vae", **small)


def test_classifier_is_accurate_on_held_out_digits():
    model, accuracy = digits.train_classifier(seed=0, epochs=15)
    assert accuracy > 0.95  # a CNN reaches ~0.99 on this split; chance is 0.1
    x_test, y_test = digits.load_data("test")
    pngs = ((x_test[:, 0] + 1) * 127.5).round().numpy().astype(np.uint8)
    alignment = digits.prompt_alignment(model, pngs, y_test.numpy())
    assert alignment.mean() > 0.9


# Classifier features and real images (inputs to pgraft.metrics) ------------------------------

def test_real_images_round_trip_to_model_space():
    from pgraft.models.class_pipeline import latents_to_uint8

    for split, n in (("all", 1797), ("train", 1437), ("test", 360)):
        images, labels = digits.real_images(split)
        x, y = digits.load_data(split)
        assert images.shape == (n, 8, 8) and images.dtype == np.uint8 and labels.shape == (n,)
        np.testing.assert_array_equal(labels, y.numpy())
        # Same bytes as a generated sample of exactly these pixels (the generate stage's conversion).
        np.testing.assert_array_equal(images, latents_to_uint8(x))
        # Back in model space: load_data's values to within half a grey level, the ends exact.
        back = digits.uint8_to_model_space(images)
        assert float((back - x).abs().max()) <= 0.5 / 127.5 + 1e-6
        assert set(np.unique(images[x[:, 0].numpy() == -1.0])) == {0}
        assert set(np.unique(images[x[:, 0].numpy() == 1.0])) == {255}
        np.testing.assert_array_equal(latents_to_uint8(back), images)  # uint8 → model → uint8 is exact
    other, _ = digits.real_images("test", seed=1)
    assert not np.array_equal(other, digits.real_images("test")[0])
    with pytest.raises(ValueError, match="unknown split"):
        digits.real_images("validation")


def test_classifier_features_shape_and_logits(classifier_dir):
    classifier = digits.load_classifier(classifier_dir)
    images, _ = digits.real_images("test")
    feats = digits.classifier_features(classifier, images)
    assert feats.shape == (360, classifier.config.hidden) == (360, 128) and feats.dtype == np.float64
    assert (feats >= 0).all()  # taken after the hidden layer's ReLU
    np.testing.assert_allclose(digits.classifier_features(classifier, images, batch_size=7), feats, rtol=1e-5, atol=1e-5)  # float32 batching
    # The final linear layer on these features gives class_probabilities' logits.
    head = classifier.head[-1]
    logits = feats @ head.weight.double().detach().numpy().T + head.bias.double().detach().numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs / probs.sum(1, keepdims=True), digits.class_probabilities(classifier, images), atol=1e-5)
    # forward == head[-1] ∘ penultimate == the original head ∘ features, in eval and (same seed) train mode.
    x = digits.uint8_to_model_space(images[:64])
    with torch.no_grad():
        for train in (False, True):
            classifier.train(train)
            torch.manual_seed(0)
            out = classifier(x)
            torch.manual_seed(0)
            via_features = head(classifier.penultimate(x))
            torch.manual_seed(0)
            original = classifier.head(classifier.features(x))
            assert torch.equal(out, via_features) and torch.equal(out, original)
    # classifier_features always uses eval mode and restores the caller's mode.
    classifier.train()
    np.testing.assert_allclose(digits.classifier_features(classifier, images), feats, atol=1e-6)
    assert classifier.training
    with pytest.raises(ValueError, match=r"\(N, 8, 8\)"):
        digits.classifier_features(classifier, images.reshape(-1, 64))


def test_frechet_distance_separates_real_digits_from_noise(classifier_dir):
    from pgraft.metrics import frechet_distance_of

    classifier = digits.load_classifier(classifier_dir)
    images, _ = digits.real_images("all")
    order = np.random.default_rng(0).permutation(len(images))
    half_a, half_b = images[order[: len(order) // 2]], images[order[len(order) // 2:]]
    noise = np.random.default_rng(1).integers(0, 256, half_a.shape, dtype=np.uint8)
    feats_a, feats_b, feats_noise = (digits.classifier_features(classifier, x) for x in (half_a, half_b, noise))
    real_vs_real = frechet_distance_of(feats_a, feats_b)
    real_vs_noise = frechet_distance_of(feats_a, feats_noise)
    # Measured ≈ 1.7 vs ≈ 285 for the 5-epoch classifier; a 20× margin leaves room for other torch builds.
    assert 0.0 < real_vs_real < real_vs_noise / 20


def test_pretrain_and_publish_to_s3_writes_the_marker_last(s3_uri, tmp_path):
    from pgraft.storage import open_storage

    target = f"{s3_uri}/task"
    summary = digits.pretrain_and_publish(target, seed=0, threads=1, ddpm_steps=3, flow_steps=0, classifier_epochs=1,
                                          eval_samples_per_digit=0)
    keys = open_storage(target).list("")
    assert "summary.json" in keys and "ddpm/pgraft_model.json" in keys and "classifier/model.safetensors" in keys
    assert not any(k.startswith("flow/") for k in keys) and summary["ddpm_steps"] == 3
