"""The reward worker without Ray: built directly, it scores one committed shard into its part."""

from __future__ import annotations

import pyarrow.parquet as pq

from helpers import stage_config
from pgraft import contract
from pgraft.shards import list_committed
from pgraft.storage import open_storage
from pgraft.work.generate import GenerateJob, GenerateWorker
from pgraft.work.reward import RewardJob, RewardWorker


def test_reward_worker_scores_one_shard_into_its_part(tiny_digits, classifier_dir, tmp_path):
    cfg = stage_config(tiny_digits, tmp_path / "run", classifier_dir, "generate.samples_per_prompt=4",
                       "generate.samples_per_shard=4")
    generate = GenerateJob(cfg)
    writer = GenerateWorker(*generate.spec().args)
    for unit in generate.units[:2]:
        writer(unit)
    job = RewardJob(cfg)
    assert [sid for sid, _ in job.units] == [0, 1] and not any(job.is_committed(u) for u in job.units)
    scorer = RewardWorker(*job.spec().args)
    result = scorer(job.units[1])
    assert result["rows"] == result["finite"] == 4 and 0.0 <= result["reward_sum"] <= 4.0
    store = open_storage(job.cfg.run.uri)
    table = pq.read_table(store.local_path(contract.reward_part_key(0, "digits_alignment", 1)))
    assert table.column("key").to_pylist() == [s for s in list_committed(store, 0)[1].keys]
    assert table.column("reward").to_numpy().sum() == result["reward_sum"]
    assert [RewardJob(cfg).is_committed(u) for u in job.units] == [False, True]  # a rerun scores only shard 0
