"""The generate worker and job without Ray: a worker built directly writes one unit's shard."""

from __future__ import annotations

from pgraft import contract
from pgraft.config import load_config
from pgraft.shards import list_committed, read_shard
from pgraft.storage import open_storage
from pgraft.work import Finished
from pgraft.work.generate import GenerateJob, GenerateWorker


def small_config(model_path, uri):
    return load_config(None, [
        f"run.uri={uri}", f"model.path={model_path}", "model.num_inference_steps=4", "model.device=cpu",
        "generate.prompts=[a handwritten digit 1, a handwritten digit 2]", "generate.samples_per_prompt=3",
        "generate.samples_per_shard=4", "generate.batch_size=2", "generate.capture_steps=[2]",
    ])


def test_generate_worker_commits_one_unit_and_the_job_tallies_it(tiny_digits, tmp_path):
    job = GenerateJob(small_config(tiny_digits, tmp_path / "run"))  # checks, config.yaml, the plan
    assert [u.items for u in job.units] == [((0, 0), (0, 1), (0, 2), (1, 0)), ((1, 1), (1, 2))]
    assert not any(job.is_committed(u) for u in job.units)
    worker = GenerateWorker(*job.spec().args)
    result = worker(job.units[1])
    assert (result["shard_id"], result["count"], result["captured"]) == (1, 2, {"x_2": 250})
    store = open_storage(job.cfg.run.uri)
    committed = list_committed(store, 0)
    assert list(committed) == [1]
    samples = read_shard(store, 0, 1, committed[1])
    assert [s.key for s in samples] == [contract.sample_key(1, 1), contract.sample_key(1, 2)]
    assert samples[0].meta.seed == contract.sample_seed(0, 0, 1, 1) and list(samples[0].latents) == ["x_T", "x_2", "x_0"]

    again = GenerateJob(job.cfg)  # a rerun: unit 1 is committed, unit 0 is not
    assert [again.is_committed(u) for u in again.units] == [False, True]
    again.add(Finished(again.units[0], worker(again.units[0]), "node-a", "actor-a"))
    summary = again.finish(1.5, skipped=1, workers=1, nodes=["node-a"])
    assert (summary.units, summary.written, summary.skipped, summary.samples_written) == (2, 1, 1, 4)
    assert summary.nodes == ["node-a"] and summary.captured == {"x_2": 250} and 0 <= summary.device_idle_fraction <= 1
    assert sorted(list_committed(store, 0)) == [0, 1]
