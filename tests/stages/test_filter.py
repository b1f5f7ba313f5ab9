"""Filter stage: selections beside each other, nothing upstream touched, DuckDB/pyarrow
readable, the Ray engine identical to the local one, and every bad input caught."""

from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import snapshot, stage_config
from pgraft import contract
from pipelines.cli import main as cli_main
from pgraft.config import load_config
from pgraft.storage import open_storage
from stages.filter import FilterError, read_accepted, run_filter
from stages.generate import run_generate
from stages.reward import run_reward


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_digits, classifier_dir, s3_endpoint, _ray_session_shutdown):
    from conftest import ensure_local_ray

    ensure_local_ray()
    root = tmp_path_factory.mktemp("scored") / "run"
    cfg = stage_config(tiny_digits, root, classifier_dir)
    run_generate(cfg, progress=False)
    run_reward(cfg, progress=False)
    # A second reward table with NaNs, from a plug-in.
    run_reward(stage_config(tiny_digits, root, classifier_dir, "reward.name=plugin_rewards:nan_for_odd_samples"),
               progress=False)
    return root


@pytest.fixture
def run_dir(scored_run, tmp_path):
    shutil.copytree(scored_run, tmp_path / "run")
    return tmp_path / "run"


def cfg_for(run_dir, tiny_digits, classifier_dir, *extra):
    return stage_config(tiny_digits, run_dir, classifier_dir, *extra)


def test_new_threshold_adds_a_selection_and_touches_nothing_upstream(run_dir, tiny_digits, classifier_dir):
    upstream = {name: snapshot(run_dir / "round-000" / name) for name in ("generate", "rewards")}
    first = run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, "filter.name=thr_a", "filter.method=threshold",
                               "filter.threshold=0.2"), progress=False)
    second = run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, "filter.name=thr_b", "filter.method=threshold",
                                "filter.threshold=0.4"), progress=False)
    assert {name: snapshot(run_dir / "round-000" / name) for name in ("generate", "rewards")} == upstream
    assert sorted(p.name for p in (run_dir / "round-000" / "filter").iterdir()) == ["thr_a", "thr_b"]
    assert first.rows_accepted >= second.rows_accepted and first.rows_in == 72

    accepted = f"{run_dir}/round-000/filter/thr_b/accepted/*.parquet"
    rewards = f"{run_dir}/round-000/rewards/digits_alignment/*.parquet"
    count, low = duckdb.sql(f"SELECT count(*), min(reward) FROM '{accepted}'").fetchall()[0]
    assert count == second.rows_accepted and low >= 0.4
    expected = duckdb.sql(f"SELECT count(*) FROM '{rewards}' WHERE reward >= 0.4").fetchall()[0][0]
    assert expected == count
    joined = duckdb.sql(f"SELECT count(*) FROM '{accepted}' a JOIN '{rewards}' r USING (key) WHERE a.reward = r.reward").fetchall()[0][0]
    assert joined == count
    summary = json.loads((run_dir / "round-000/filter/thr_b/summary.json").read_text())
    part = run_dir / "round-000/filter/thr_b/accepted" / summary["accepted_parts"][0]
    assert pq.read_schema(part).names == list(contract.ACCEPTED_COLUMNS)
    assert summary["kl"] == pytest.approx(-np.log(count / 72)) and summary["source"]["parts"] == 9
    assert sum(summary["per_prompt_accepted"].values()) == count


def test_best_of_n_per_prompt_and_ranks(run_dir, tiny_digits, classifier_dir):
    summary = run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, "filter.name=bo4", "filter.n=4"), progress=False)
    assert summary.rows_accepted == 18 and summary.per_prompt_accepted == {"0": 6, "1": 6, "2": 6}
    assert summary.kl == pytest.approx(np.log(4) - 3 / 4)
    table = read_accepted(open_storage(str(run_dir)), 0, "bo4").to_pandas()
    rewards = duckdb.sql(f"SELECT prompt_id, sample_idx, reward FROM '{run_dir}/round-000/rewards/digits_alignment/*.parquet'").df()
    for _, row in table.iterrows():  # each accepted sample is the best of its group of 4
        group = rewards[(rewards.prompt_id == row.prompt_id) & (rewards.sample_idx // 4 == row.sample_idx // 4)]
        assert row.reward == group.reward.max()
    assert (table.groupby("prompt_id").rank_in_prompt.min() == 0).all()


def test_existing_name_refused_unless_force_and_same_spec_reused(run_dir, tiny_digits, classifier_dir, capsys):
    base = ("filter.name=sel", "filter.method=threshold")
    run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, *base, "filter.threshold=0.1"), progress=False)
    again = run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, *base, "filter.threshold=0.1"), progress=False)
    assert again.reused
    with pytest.raises(FilterError, match=r"selection 'sel' exists with other parameters \(filter.threshold\)"):
        run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, *base, "filter.threshold=0.2"), progress=False)
    args = ["filter", "--quiet", "--force", "--set", f"run.uri={run_dir}", "--set", "filter.name=sel",
            "--set", "filter.method=threshold", "--set", "filter.threshold=0.2"]
    assert cli_main(args) == 0
    assert "selection 'sel' (threshold)" in capsys.readouterr().out
    summary = json.loads((run_dir / "round-000/filter/sel/summary.json").read_text())
    assert summary["parameters"]["threshold"] == 0.2
    # The remake's parts replaced the first make's: only the parts its summary lists are left.
    left = sorted(p.name for p in (run_dir / "round-000/filter/sel/accepted").iterdir())
    assert left == summary["accepted_parts"] and len(left) == 1


@pytest.mark.parametrize("extra", [
    ("filter.method=threshold", "filter.threshold=0.3"),
    ("filter.method=best_of_n", "filter.n=3", "filter.dedup=true"),
    ("filter.method=top_k", "filter.k=5"),
    ("filter.method=top_k", "filter.k=2", "filter.m=6"),
    ("filter.method=rejection", "filter.alpha=0.2"),
    ("filter.method=quantile", "filter.quantile=0.3", "filter.dedup=true"),
    ("filter.method=threshold", "filter.kl_budget=0.7", "filter.partitions=7"),  # more partitions than prompts
    ("filter.method=rejection", "filter.kl_budget=0.3", "filter.dedup=true"),
    ("reward.name=plugin_rewards:nan_for_odd_samples", "filter.method=threshold", "filter.threshold=2",
     "filter.nan_policy=drop"),
])
def test_ray_engine_gives_the_same_selection(run_dir, tiny_digits, classifier_dir, extra, ray_local):
    local = run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, "filter.name=local", *extra), progress=False)
    dist = run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, "filter.name=dist", "filter.engine=ray", *extra),
                      progress=False)
    a = read_accepted(open_storage(str(run_dir)), 0, "local")
    b = read_accepted(open_storage(str(run_dir)), 0, "dist")
    assert a.num_rows > 0 and a.equals(b)
    for field in ("rows_in", "rows_considered", "rows_accepted", "kl", "parameters", "per_prompt_accepted"):
        assert getattr(local, field) == getattr(dist, field), field
    assert local.source["fingerprint"] == dist.source["fingerprint"]


def test_nan_rewards_error_by_default_drop_on_request(run_dir, tiny_digits, classifier_dir):
    extra = ("reward.name=plugin_rewards:nan_for_odd_samples", "filter.method=threshold", "filter.threshold=2")
    with pytest.raises(FilterError, match=r"36 reward\(s\) are NaN or infinite \(p000000_s00001, .*filter.nan_policy=drop"):
        run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, *extra), progress=False)
    summary = run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, *extra, "filter.nan_policy=drop"), progress=False)
    assert summary.rows_dropped_nonfinite == 36 and summary.rows_in == 36
    assert summary.rows_accepted == 3 * 11  # even sample_idx 2..22 have reward = sample_idx ≥ 2


def test_empty_selection_says_what_to_change(run_dir, tiny_digits, classifier_dir):
    with pytest.raises(FilterError, match=r"accepted 0 of 72 rows \(acceptance rate 0\); rewards range .* loosen filter.threshold"):
        run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, "filter.method=threshold", "filter.threshold=1.5"),
                   progress=False)
    assert not (run_dir / "round-000" / "filter").exists()


def _spoil_part(part, how: str) -> None:
    import pyarrow as pa

    if how == "not parquet":
        part.write_bytes(b"reward,key\n0.5,p000000_s00000\n")
        return
    table = pq.read_table(part)
    if how == "mixed schemas":
        table = table.drop_columns(["predicted_digit"])  # a column every other part has
    elif how == "wrong type":
        index = table.schema.get_field_index("reward")
        table = table.set_column(index, "reward", table["reward"].cast(pa.string()))
    pq.write_table(table, part)


@pytest.mark.parametrize("how, message", [
    ("not parquet", r"reward part \S+/part-000004.parquet is not a Parquet file \(.*\); delete it and rerun `pgraft reward`$"),
    ("mixed schemas", r"reward part \S+/part-000004.parquet has another schema than \S+/part-000000.parquet "
                      r"\(differs in predicted_digit: int64\): .*new reward.name$"),
    ("wrong type", r"reward part \S+/part-000004.parquet: column reward is string, expected double; .*$"),
])
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_bad_reward_parts_name_the_part_and_write_nothing(run_dir, tiny_digits, classifier_dir, how, message, engine,
                                                          ray_local):
    """A selection made before stays whole: replacing it with --force fails before anything changes."""
    base = ("filter.name=sel", "filter.method=threshold", "filter.threshold=0.1", f"filter.engine={engine}")
    run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, *base), progress=False)
    before = snapshot(run_dir / "round-000" / "filter")
    _spoil_part(run_dir / "round-000/rewards/digits_alignment/part-000004.parquet", how)
    with pytest.raises(FilterError, match=message) as caught:
        run_filter(cfg_for(run_dir, tiny_digits, classifier_dir, *base), progress=False, force=True)
    assert "\n" not in str(caught.value)
    assert snapshot(run_dir / "round-000" / "filter") == before


def test_missing_reward_parts_listed_unless_allow_partial(run_dir, tiny_digits, classifier_dir):
    for sid in (2, 7):
        (run_dir / "round-000/rewards/digits_alignment" / f"part-{sid:06d}.parquet").unlink()
    cfg = cfg_for(run_dir, tiny_digits, classifier_dir, "filter.method=threshold", "filter.threshold=0.1")
    with pytest.raises(FilterError, match=r"lacks parts for 2 committed shard\(s\): shard-000002, shard-000007; .*--allow-partial"):
        run_filter(cfg, progress=False)
    assert run_filter(cfg, progress=False, allow_partial=True).rows_in == 56


def test_filter_on_s3_read_back_with_pyarrow(ray_local, tiny_digits, classifier_dir, s3_uri):
    cfg = stage_config(tiny_digits, s3_uri, classifier_dir, "filter.name=best", "filter.method=top_k", "filter.k=2")
    run_generate(cfg, progress=False)
    run_reward(cfg, progress=False)
    summary = run_filter(cfg, progress=False)
    store = open_storage(s3_uri)
    fs, path = store.arrow_location(contract.accepted_prefix(0, "best"))
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == summary.rows_accepted == 6
    assert json.loads(store.get_bytes(contract.selection_summary_key(0, "best")))["rows_accepted"] == 6


def test_filter_config_errors_name_the_key():
    from pgraft.config import ConfigError

    with pytest.raises(ConfigError, match="config error: filter.threshold: filter.threshold is required for filter.method=threshold"):
        load_config(None, ["filter.method=threshold"])
    with pytest.raises(ConfigError, match="config error: filter.quantile: Input should be less than or equal to 1"):
        load_config(None, ["filter.method=quantile", "filter.quantile=1.5"])
