"""The trainer's group of rank actors on a real local Ray: checkpoints are registered only once
written and the oldest are dropped; two ranks join one gloo group; a rank failing without a user
error restarts the whole group up to `max_failures` times, then stops with one line; a user
error stops it at once; inside `keep_warm` the next fit of the same shape reuses the ranks. (The DeepSpeed runs themselves are in tests/stages/test_train.py.)"""

from __future__ import annotations

from cluster.train_group import TrainerSpec, fit, read_checkpoint_record, register_checkpoint
from pgraft.config import TrainerSection
from pgraft.errors import TrainError
from pgraft.storage import open_storage

import pytest

def test_a_registered_checkpoint_is_named_and_the_oldest_past_keep_are_deleted(tmp_path):
    storage = open_storage(str(tmp_path))
    for step in (10, 20, 30):
        storage.put_bytes(f"ckpt/step{step:07d}/weights.pt", b"w")
        register_checkpoint(storage, "ckpt", f"step{step:07d}", step, {"loss": 1.0 / step}, keep=2)
    record = read_checkpoint_record(storage, "ckpt")
    assert [(c["tag"], c["step"]) for c in record] == [("step0000020", 20), ("step0000030", 30)]
    assert storage.list("ckpt/step0000010") == [] and storage.exists("ckpt/step0000020/weights.pt")
    assert read_checkpoint_record(storage, "nothing-here") == []


def group_worker(params: dict) -> None:
    """Each rank records its attempt, all-reduces its rank, then fails as `params` says."""
    import os

    import torch
    import torch.distributed as dist

    from cluster.train_group import join_group
    from pgraft.errors import TrainError
    from pgraft.storage import open_storage

    rank, world, _ = join_group()
    storage = open_storage(params["root"])
    attempt = len(storage.list(f"attempts/rank{rank}"))
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    storage.put_bytes(f"attempts/rank{rank}/{attempt}", f"{world} {total.item():g} {params['threads']}".encode())
    storage.put_bytes(f"pids/rank{rank}/{attempt}", str(os.getpid()).encode())
    if rank == 0 and params["fail"] == "crash":
        raise RuntimeError("the device fell over")
    if rank == 0 and params["fail"] == "user":
        raise TrainError("train.lr=-1 is not a learning rate")


def spec(root: str, fail: str, workers: int, max_failures: int) -> TrainerSpec:
    section = TrainerSection(num_workers=workers, cpus_per_worker=1, max_failures=max_failures)
    return TrainerSpec(group_worker, {"root": root, "fail": fail}, section, "train", "cpu", "model.device",
                       open_storage(root), "train/t", 30, "train workers")


@pytest.mark.deepspeed
def test_two_ranks_join_one_group_and_a_crash_restarts_it_until_max_failures(ray_local, tmp_path):
    root = str(tmp_path)
    fit(spec(root, "none", 2, 0))
    storage = open_storage(root)
    assert [storage.get_bytes(f"attempts/rank{r}/0") for r in (0, 1)] == [b"2 1 1", b"2 1 1"]  # 0 + 1, summed

    crash = str(tmp_path / "crash")
    with pytest.raises(TrainError, match=r"^train workers: rank 0 failed: RuntimeError: the device fell over, after 1 "
                                         r"restart\(s\) \(train.max_failures=1\); rerun the command to resume from "
                                         r"the last checkpoint in .*/train/t/checkpoints$"):
        fit(spec(crash, "crash", 1, 1))
    assert len(open_storage(crash).list("attempts/rank0")) == 2  # the first try and one restart


@pytest.mark.deepspeed
def test_a_user_error_stops_the_group_at_once(ray_local, tmp_path):
    with pytest.raises(TrainError, match=r"^train.lr=-1 is not a learning rate$"):
        fit(spec(str(tmp_path), "user", 1, 2))
    assert len(open_storage(str(tmp_path)).list("attempts/rank0")) == 1  # no restart


@pytest.mark.deepspeed
def test_inside_keep_warm_the_next_fit_of_the_same_shape_runs_on_the_same_ranks(ray_local, tmp_path):
    import cluster

    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    with cluster.keep_warm():
        fit(spec(first, "none", 2, 0))
        fit(spec(second, "none", 2, 0))  # a new process group on the kept actors
    pids = [[open_storage(root).get_bytes(f"pids/rank{r}/0") for r in (0, 1)] for root in (first, second)]
    assert pids[0] == pids[1] and len(set(pids[0])) == 2
    assert open_storage(second).get_bytes("attempts/rank1/0") == b"2 1 1"
