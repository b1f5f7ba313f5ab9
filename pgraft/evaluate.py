"""Score a model's own fresh samples with a reward, in-process (no Ray, no storage): how the
round pipeline and the method check compare a fine-tuned composite sampler with its base."""

from __future__ import annotations

import numpy as np

from pgraft import contract
from pgraft.config import ModelSection, RewardSection
from pgraft.models.adapters import load_adapter, resolve_device
from pgraft.rewards import as_output, make_reward

# Fresh seeds: a round index no generate stage uses, so evaluation never reuses training noise.
EVAL_ROUND = 10**6


def sample_rewards(model: ModelSection, reward: RewardSection, reward_model_path: str | None, prompts: list[str],
                   samples_per_prompt: int, seed: int = 0, batch_size: int = 250) -> np.ndarray:
    """Rewards of `samples_per_prompt` fresh samples per prompt, in (prompt, sample) order."""
    adapter = load_adapter(model)
    reward_fn = make_reward(reward.name, reward_model_path, resolve_device(reward.device), dict(reward.options))
    items = [(p, s) for p in range(len(prompts)) for s in range(samples_per_prompt)]
    scores = []
    for lo in range(0, len(items), batch_size):
        batch = items[lo:lo + batch_size]
        seeds = [contract.sample_seed(seed, EVAL_ROUND, p, s) for p, s in batch]
        texts = [prompts[p] for p, _ in batch]
        images = adapter.rollout(texts, seeds, []).images
        meta = [{"prompt_id": p, "sample_idx": s} for p, s in batch]
        scores.append(as_output(reward_fn(list(images), texts, meta), len(batch)).rewards)
    return np.concatenate(scores)
