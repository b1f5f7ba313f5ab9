"""VQAScore on a tiny random LLaVA-style model, loaded by the real code from a saved folder:
the score is the hand-computed softmax at the answer position, whatever the batch holds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pgraft.errors import ConfigError
from pgraft.rewards import as_output, make_reward
from pgraft.vqascore import QUESTION, answer_positions, answer_probability, check_folder

CPU = torch.device("cpu")
PROMPTS = ["a cat", "two red apples on a wooden table", "a dog", "a small blue house beside a very tall tree", "x"]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from tiny_models import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "vlm")


def images(n=5, size=24):
    return [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(n)]


def test_answer_probability_closed_forms():
    logits = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    np.testing.assert_allclose(answer_probability(logits, 1, 2), [3 / 6, 1 / 4], rtol=1e-12)
    np.testing.assert_allclose(answer_probability(logits, 1, 2, "yes_no"), [3 / 4, 1 / 2], rtol=1e-12)
    assert answer_positions(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])).tolist() == [2, 3, 0]


def test_vqascore_is_the_softmax_of_the_answer_position(tiny_vlm):
    """By hand: the question in the model's chat format, one unpadded row, softmax at the last token."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    yes = processor.tokenizer.convert_tokens_to_ids("Yes")
    no = processor.tokenizer.convert_tokens_to_ids("No")
    pictures = images()
    by_hand, by_hand_yes_no = [], []
    for picture, prompt in zip(pictures, PROMPTS):
        text = f'USER: <image>\nDoes this figure show "{prompt}"? Please answer yes or no.\nASSISTANT:'
        inputs = processor(images=[Image.fromarray(picture)], text=[text], return_tensors="pt")
        with torch.no_grad():
            last = model(**inputs).logits[0, -1].double()
        by_hand.append(torch.softmax(last, -1)[yes].item())
        by_hand_yes_no.append((last[yes].exp() / (last[yes].exp() + last[no].exp())).item())

    reward = make_reward("vqascore", str(tiny_vlm), CPU, {})
    scores = as_output(reward(pictures, PROMPTS, [{}] * 5), 5).rewards
    np.testing.assert_allclose(scores, by_hand, rtol=1e-5)
    assert np.all((scores >= 0) & (scores <= 1))
    yes_no = as_output(make_reward("vqascore", str(tiny_vlm), CPU, {"normalise": "yes_no"})(pictures, PROMPTS, [{}] * 5), 5)
    np.testing.assert_allclose(yes_no.rewards, by_hand_yes_no, rtol=1e-5)
    assert np.all((yes_no.rewards > 0) & (yes_no.rewards < 1))
    assert QUESTION.format(prompt="p") == 'Does this figure show "p"? Please answer yes or no.'

    # Batch size and order do not change a pair's score (rows are right-padded to the longest prompt).
    one_by_one = [as_output(reward([im], [p], [{}]), 1).rewards[0] for im, p in zip(pictures, PROMPTS)]
    reversed_order = as_output(reward(pictures[::-1], PROMPTS[::-1], [{}] * 5), 5).rewards[::-1]
    np.testing.assert_allclose(one_by_one, scores, rtol=1e-5)
    np.testing.assert_allclose(reversed_order, scores, rtol=1e-5)
    # The image matters: another picture for the same prompt scores differently.
    assert as_output(reward(pictures[1:2], PROMPTS[:1], [{}]), 1).rewards[0] != pytest.approx(scores[0], rel=1e-6)


def test_bad_models_and_images_are_one_line(tiny_vlm, tmp_path):
    from tiny_models import save_tiny_clip, save_tiny_vlm

    clip = save_tiny_clip(tmp_path / "clip")
    with pytest.raises(ConfigError, match=r"reward.model_path: '.*clip' holds a 'clip' model, not an image-text-to-text"):
        make_reward("vqascore", str(clip), CPU, {})
    with pytest.raises(ConfigError, match=r"holds a 'clip' model, not an image-text-to-text"):
        check_folder(str(clip), {})
    with pytest.raises(ConfigError, match=r"reward.model_path: '.*nowhere' has no config.json"):
        check_folder(str(tmp_path / "nowhere"), {})
    with pytest.raises(ConfigError, match=r"'.*nowhere' does not exist"):
        make_reward("vqascore", str(tmp_path / "nowhere"), CPU, {})
    split = save_tiny_vlm(tmp_path / "split", whole_answers=False)
    with pytest.raises(ConfigError, match=r"reward.options.yes: the tokenizer splits 'Yes' into 3 tokens \['Y', 'e', 's'\]"):
        make_reward("vqascore", str(split), CPU, {})
    with pytest.raises(ConfigError, match=r"reward.options.normalise: 'softmax'"):
        make_reward("vqascore", str(tiny_vlm), CPU, {"normalise": "softmax"})
    reward = make_reward("vqascore", str(tiny_vlm), CPU, {})
    with pytest.raises(ValueError, match=r"image 1 is uint8 of shape \(8, 8, 4\)"):
        reward([images(1)[0], np.zeros((8, 8, 4), np.uint8)], ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match=r"image 0 is float32 of shape \(8, 8, 3\)"):
        reward([np.zeros((8, 8, 3), np.float32)], ["a"], [{}])
    assert json.loads((tiny_vlm / "config.json").read_text())["model_type"] == "llava"


def test_answer_logits_alone_equal_the_full_logits(tiny_vlm):
    """`logits_to_keep` (only the answer positions' logits) against the full (B, L, V) logits."""
    from pgraft.vqascore import VQAScorer

    scorer = VQAScorer(str(tiny_vlm), CPU)
    assert scorer.keeps_logits
    kept = scorer.scores(images(), PROMPTS)
    scorer.keeps_logits = False
    np.testing.assert_allclose(scorer.scores(images(), PROMPTS), kept, rtol=1e-6)
