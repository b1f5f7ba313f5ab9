"""Reward stage on local Ray: Parquet parts per shard, resumable, shards untouched, S3."""

from __future__ import annotations

import os
import shutil

import duckdb
import pyarrow.parquet as pq
import pytest

from helpers import snapshot, stage_config
from pgraft import contract
from pgraft.config import ConfigError
from pgraft.shards import list_committed
from pgraft.storage import open_storage
from stages.generate import run_generate
from stages.reward import RewardError, run_reward


@pytest.fixture(scope="module")
def generated_run(tmp_path_factory, tiny_digits, classifier_dir, s3_endpoint, _ray_session_shutdown):
    """The shards of stage_config's round 0, generated once for the module (a copy per test)."""
    from conftest import ensure_local_ray

    ensure_local_ray()
    root = tmp_path_factory.mktemp("generated") / "run"
    run_generate(stage_config(tiny_digits, root, classifier_dir), progress=False)
    return root


@pytest.fixture
def run_dir(generated_run, tmp_path):
    return shutil.copytree(generated_run, tmp_path / "run")


def test_reward_parts_per_shard_read_by_duckdb(ray_local, run_dir, tiny_digits, classifier_dir, tmp_path):
    cfg = stage_config(tiny_digits, run_dir, classifier_dir)
    shards_before = snapshot(tmp_path / "run" / "round-000" / "generate")
    summary = run_reward(cfg, progress=False)
    assert (summary.shards, summary.written, summary.rows_written) == (9, 9, 72)
    assert snapshot(tmp_path / "run" / "round-000" / "generate") == shards_before  # rewards never touch shards

    glob = f"{tmp_path}/run/round-000/rewards/digits_alignment/part-*.parquet"
    rows = duckdb.sql(f"SELECT count(*), count(DISTINCT key), min(reward), max(reward), any_value(reward_name) FROM '{glob}'").fetchall()[0]
    assert rows[0] == rows[1] == 72 and 0.0 <= rows[2] <= rows[3] <= 1.0 and rows[4] == "digits_alignment"
    columns = [c[0] for c in duckdb.sql(f"DESCRIBE SELECT * FROM '{glob}'").fetchall()]
    assert columns[:len(contract.REWARD_COLUMNS)] == list(contract.REWARD_COLUMNS)
    assert {"alignment", "predicted_digit"} <= set(columns)
    types = dict(duckdb.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{glob}')").fetchall())
    assert types["reward"] == "DOUBLE"
    seeds = duckdb.sql(f"SELECT prompt_id, sample_idx, seed FROM '{glob}' ORDER BY key LIMIT 3").fetchall()
    assert all(seed == contract.sample_seed(0, 0, p, s) for p, s, seed in seeds)


def test_reward_resumes_per_shard(ray_local, warm_pools, run_dir, tiny_digits, classifier_dir, tmp_path):
    # Every rerun on the first run's actor (warm_pools): a kept actor writes the same bytes too.
    cfg = stage_config(tiny_digits, run_dir, classifier_dir)
    run_reward(cfg, progress=False)
    parts = tmp_path / "run" / "round-000" / "rewards" / "digits_alignment"
    before = snapshot(parts)
    os.remove(parts / "part-000004.parquet")
    summary = run_reward(cfg, progress=False)
    assert (summary.written, summary.skipped) == (1, 8)
    after = snapshot(parts)
    redone = ("part-000004.parquet", "_part-000004.json")  # the part and its commit record
    assert {k: v for k, v in after.items() if k not in redone} == {k: v for k, v in before.items() if k not in redone}
    import io

    rewritten = pq.read_table(parts / "part-000004.parquet")
    assert rewritten.equals(pq.read_table(io.BytesIO(before["part-000004.parquet"][0])))  # same rows as before
    # A part whose bytes no longer match its commit record is moved aside and scored again;
    # a part whose record never got written (cut short between the two) is scored again too.
    (parts / "part-000002.parquet").write_bytes(b"torn")
    os.remove(parts / "_part-000006.json")
    summary = run_reward(cfg, progress=False)
    assert (summary.written, summary.skipped, summary.torn) == (2, 7, 1)
    assert {k: v[0] for k, v in snapshot(parts).items()} == {k: v[0] for k, v in before.items()}
    assert [p.name.rsplit(".", 1)[0] for p in sorted((tmp_path / "run" / "torn").rglob("*.*"))] == \
        ["_part-000002.json", "part-000002.parquet"]


def test_failing_plugin_names_shard_and_key_and_writes_nothing_for_it(ray_local, run_dir, tiny_digits, classifier_dir,
                                                                      tmp_path):
    cfg = stage_config(tiny_digits, run_dir, classifier_dir, "reward.name=plugin_rewards:explodes_on_sample_3")
    with pytest.raises(RewardError, match=r"failed on shard-000000.tar, sample p000000_s00003: RuntimeError: cannot score this one"):
        run_reward(cfg, progress=False)
    assert not (tmp_path / "run" / "round-000" / "rewards" / "explodes_on_sample_3" / "part-000000.parquet").exists()


def test_reward_bad_config_and_no_shards(tiny_digits, classifier_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"reward.model_path: no digits_alignment weights \(model.safetensors\) at"):
        run_reward(stage_config(tiny_digits, tmp_path / "run", tmp_path / "nowhere"), progress=False)
    with pytest.raises(RewardError, match="no committed shards in round 0"):
        run_reward(stage_config(tiny_digits, tmp_path / "run", classifier_dir), progress=False)


def test_reward_on_s3_read_back_with_pyarrow(ray_local, tiny_digits, classifier_dir, s3_uri):
    cfg = stage_config(tiny_digits, s3_uri, classifier_dir)
    run_generate(cfg, progress=False)
    run_reward(cfg, progress=False)
    store = open_storage(s3_uri)
    assert len(list_committed(store, 0)) == 9
    fs, path = store.arrow_location(contract.rewards_prefix(0, "digits_alignment"))
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == 72 and table.schema.field("reward").type == "double"


def test_cuda_reward_without_gpus_is_refused(ray_local, tiny_digits, classifier_dir, tmp_path):
    cfg = stage_config(tiny_digits, tmp_path / "run", classifier_dir, "generate.samples_per_prompt=8")
    run_generate(cfg, progress=False)
    from cluster import WorkerError

    with pytest.raises(WorkerError, match="RewardWorker actors: .* could not be placed within 1 s: no node offers GPU"):
        run_reward(stage_config(tiny_digits, tmp_path / "run", classifier_dir, "generate.samples_per_prompt=8",
                                "reward.device=cuda", "cluster.placement_timeout_s=1"), progress=False)


def test_killed_reward_actor_is_restarted_and_every_part_is_written_once(ray_local, tiny_digits, classifier_dir,
                                                                         tmp_path):
    from helpers import KillWhen

    cfg = stage_config(tiny_digits, tmp_path / "run", classifier_dir, "generate.samples_per_shard=2")  # 36 shards
    run_generate(cfg, progress=False)
    store = open_storage(cfg.run.uri)
    prefix = contract.rewards_prefix(0, "digits_alignment")
    killer = KillWhen(lambda: len(store.list(prefix)) >= 1, "ray::RewardWorker")
    summary = run_reward(cfg, progress=False)
    assert killer.join() is not None, "no reward actor was killed"
    assert summary.written == 36 and summary.rows_written == 72
    glob = f"{tmp_path}/run/{prefix}/part-*.parquet"
    rows, keys = duckdb.sql(f"SELECT count(*), count(DISTINCT key) FROM '{glob}'").fetchall()[0]
    assert rows == keys == 72  # every sample scored exactly once
