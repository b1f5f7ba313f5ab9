"""The summary worker without Ray: built directly, it summarises a variant's shards and table."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from helpers import stage_config
from pgraft import contract, metrics
from pgraft.storage import open_storage
from pgraft.work.evaluate import SummaryWorker, summary_spec
from pgraft.work.generate import GenerateJob, GenerateWorker
from pgraft.work.reward import RewardJob, RewardWorker


def test_summary_worker_reports_the_variants_figures(tiny_digits, classifier_dir, tmp_path):
    cfg = stage_config(tiny_digits, tmp_path / "run", classifier_dir, "generate.samples_per_prompt=4",
                       "generate.samples_per_shard=4")
    generate = GenerateJob(cfg)
    writer = GenerateWorker(*generate.spec().args)
    for unit in generate.units:
        writer(unit)
    scoring = RewardJob(cfg)
    scorer = RewardWorker(*scoring.spec().args)
    for unit in scoring.units:
        scorer(unit)
    summary = SummaryWorker()(("base", cfg.model_dump(mode="json")))
    store = open_storage(cfg.run.uri)
    rewards = np.concatenate([pq.read_table(store.local_path(contract.reward_part_key(0, "digits_alignment", sid)))
                              .column("reward").to_numpy() for sid, _ in scoring.units])
    assert summary["samples"] == 12 and summary["reward_mean"] == metrics.mean_and_stderr(rewards)[0]
    assert sorted(summary["per_prompt_mean"]) == ["0", "1", "2"]
    assert summary["feature_space"] == "classifier" and summary["frechet_distance"] > 0 and summary["diversity"] > 0
    spec = summary_spec(cfg)  # one actor of one CPU: one torch thread, as every evaluation before
    assert (spec.num_workers, spec.cpus_per_worker, spec.device) == (1, 1, "cpu")
