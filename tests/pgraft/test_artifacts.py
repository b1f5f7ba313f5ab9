"""Artifacts: each kind knows its layout and tells its state from storage alone."""

import json

from pgraft import contract
from pgraft.artifacts import (
    ARTIFACTS,
    COMPLETE,
    MISSING,
    PARTIAL,
    Evaluation,
    RewardTable,
    Selection,
    Shards,
    Summary,
    Training,
)
from pgraft.contract import InversionSummary, TrainSummary
from pgraft.storage import open_storage
from pgraft.work.generate import GenerateSummary


def test_states_follow_the_commit_markers(tmp_path):
    store = open_storage(str(tmp_path))
    shards = Shards(0)
    store.put_bytes(shards.plan_key, json.dumps({"units": 2, "samples": 8}).encode())
    store.put_bytes(shards.shard_key(0), b"tar")
    store.put_bytes(shards.commit_key(0), b"{}")
    store.put_bytes(shards.commit_key(1), b"{}")  # a commit record whose tar is missing does not count
    keys = set(store.list(""))
    assert shards.state(store, keys).state == PARTIAL and shards.committed_count(keys) == 1
    store.put_bytes(shards.shard_key(1), b"tar")
    keys = set(store.list(""))
    assert shards.state(store, keys).state == COMPLETE

    table = RewardTable(0, "r")
    for part in (0, 1):  # a part counts once its commit record is there
        store.put_bytes(table.part_key(part), b"parquet")
        assert table.state(set(store.list("")), shards=2, generated=True).detail == f"{part}/2 parts"
        store.put_bytes(contract.part_record_key(table.part_key(part)), b"{}")
    assert table.state(set(store.list("")), shards=2, generated=True).detail == "2/2 parts"
    assert RewardTable.names(store.list(""), 0) == ["r"]

    assert Selection(0, "s").state(store).state == PARTIAL  # folder without summary: interrupted
    training = Training(0, "t")
    store.put_bytes(f"{training.prefix}/{contract.CHECKPOINTS_DIR}/{contract.CHECKPOINT_TAG.format(100)}/x", b"")
    state = training.state(store, set(store.list("")))
    assert state.state == PARTIAL and state.detail.startswith("1 checkpoint(s), not exported")
    assert Evaluation(0).state(store, set(store.list(""))).state == MISSING


def test_every_summary_follows_the_protocol():
    summaries = [GenerateSummary(run_uri="r", round=0, units=1, skipped=0, written=1, samples_written=1,
                                 bytes_written=1, seconds=1.0, workers=1),
                 TrainSummary(name="t", selection="s", round=0, t_step=1, t_level=1.0, mode="full", samples=1, steps=1,
                              resumed_from=0, batch_size=1, processes=1, timesteps_trained=[1.0], final_loss=0.0,
                              samples_per_second=1.0, data_wait_fraction=0.0, seconds=1.0, model_dir="m", deepspeed={}),
                 InversionSummary(name="i", source="s", model="m", num_inference_steps=2, conditional=False, samples=1,
                                  converged=1, reconstruction_error_mean=0.0, reconstruction_error_max=0.0,
                                  iterations_mean=1.0, noise_rms=1.0, shards=1, skipped=0, seconds=1.0)]
    for summary in summaries:
        assert isinstance(summary, Summary) and summary.headline() and summary.render()
    assert set(ARTIFACTS) == {"shards", "rewards", "selection", "training", "evaluation", "inversion", "corrector"}
