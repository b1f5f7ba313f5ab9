"""Evaluation work: the worker that summarises an evaluation variant from its shards and
reward table (reward mean ± s.e., per-prompt means, Fréchet distance to the task's real data
in the task's feature space, within-prompt diversity, and the task's own metrics). The evaluate stage drives it, one unit
per variant, after the generate and reward workers have written the variants' samples and scores.
"""

from __future__ import annotations

import numpy as np

from pgraft import metrics
from pgraft.config import Config
from pgraft.models.fetch import child
from pgraft.samples import SAMPLE_KINDS, collect
from pgraft.shards import DECODED, list_committed, read_shard
from pgraft.storage import open_storage
from pgraft.tables import list_reward_parts, read_reward_table
from pgraft.work.reward import reward_model_path
from pgraft.work.spec import WorkerSpec


def feature_weights(cfg: Config) -> str | None:
    """Where the task's feature extractor finds its weights: the reward's own weights when the
    reward is the task's and shares the folder (so reward.model_path moves both), else task.dir."""
    spec = cfg.task.spec()
    if spec.feature_weights is None:
        return None
    own = spec.reward_weights.get(cfg.reward.name)
    if own is not None and own.folder == spec.feature_weights:
        return reward_model_path(cfg)
    return child(cfg.task.dir, spec.feature_weights)


def summarize_variant(cfg_tree: dict) -> dict:
    """The figures of the one-round variant run `cfg_tree` (an evaluation variant's config), from
    its shards and reward table; loads the task's feature extractor."""
    cfg = Config.model_validate(cfg_tree)
    storage = open_storage(cfg.run.uri)
    parts = list_reward_parts(storage, 0, cfg.reward.table_name())
    table = read_reward_table(storage, [parts[k] for k in sorted(parts)], columns=["key", "prompt_id", "reward"]).table
    by_key = {key: i for i, key in enumerate(table["key"].to_pylist())}
    rewards = table["reward"].to_numpy()
    prompt_ids = table["prompt_id"].to_numpy()
    decoded, kind = [None] * len(by_key), "image"
    for sid, record in sorted(list_committed(storage, 0).items()):
        for sample in read_shard(storage, 0, sid, record, wanted=DECODED):
            decoded[by_key[sample.key]], kind = sample.decoded, sample.kind
    samples = collect(decoded, SAMPLE_KINDS[kind])
    mean, stderr = metrics.mean_and_stderr(rewards)
    frechet, task_metrics = None, {}
    spec = cfg.task.spec()
    if spec is not None:  # the task's feature extractor: Fréchet distance to its real data, where it has some
        extract = spec.features(feature_weights(cfg))
        features = extract(samples)
        if spec.real_samples is not None:
            reference = extract(spec.real_samples(spec.reference_split, cfg.task.seed, cfg.task.dir))
            frechet = metrics.frechet_distance_of(features, reference)
        task_metrics = spec.metrics(samples, cfg.task.seed) if spec.metrics is not None else {}
    else:  # no task, so no feature extractor: diversity in pixel space
        features = samples.reshape(len(samples), -1).astype(np.float64) / 255.0
    return {
        "samples": int(len(rewards)), "reward_mean": mean, "reward_stderr": stderr,
        "per_prompt_mean": {str(k): v for k, v in metrics.per_prompt_means(rewards, prompt_ids).items()},
        "frechet_distance": frechet, "feature_space": spec.feature_space if spec is not None else "pixels",
        "diversity": metrics.within_prompt_diversity(features, prompt_ids),
        **({"task_metrics": task_metrics} if task_metrics else {}),
    }


class SummaryWorker:
    """Summarises one evaluation variant per call; a unit is (variant name, the variant's config tree)."""

    def __call__(self, unit: tuple[str, dict]) -> dict:
        return summarize_variant(unit[1])


def summary_spec(cfg: Config) -> WorkerSpec:
    """One actor of one CPU (one torch thread: the features' float order stays that of every
    earlier evaluation) on the reward's nodes, for the summaries of every variant in turn."""
    return WorkerSpec(SummaryWorker, (), "cpu", "reward.device", 1, dict(cfg.reward.resources), 1,
                      cfg.cluster.placement_timeout_s, cfg.cluster.max_restarts, cpus_per_worker=1)
