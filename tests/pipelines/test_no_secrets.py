"""No credential or token reaches a log line or anything a run stores: `pgraft` commands that
succeed and commands that fail, run as a user runs them, against a real S3 server (moto), with
marked secrets in their environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from pgraft import contract
from pgraft.config import config_to_yaml, load_config
from pgraft.storage import open_storage
from pgraft.tables import arrow_schema, commit_reward_part

REPO = Path(__file__).resolve().parents[2]
SECRET = "marked-secret-4c1e"  # must never be printed or stored
# moto takes any credentials; the Ray token is there only to show that no command dumps its environment.
MARKED_ENV = {"AWS_ACCESS_KEY_ID": f"id-{SECRET}", "AWS_SECRET_ACCESS_KEY": f"key-{SECRET}",
              "AWS_SESSION_TOKEN": f"session-{SECRET}", "RAY_AUTH_TOKEN": f"ray-{SECRET}"}


def tiny_reward_table(uri: str, table: str) -> None:
    """One reward part of 2 prompts × 4 samples, as the reward stage writes it."""
    rows = [{"key": contract.sample_key(p, s), "shard": "shard-000000", "round": 0, "prompt_id": p,
             "prompt": f"prompt {p}", "sample_idx": s, "seed": s, "reward": 0.1 * (p + s), "reward_name": table,
             "sample_hash": f"{p}-{s}"} for p in range(2) for s in range(4)]
    commit_reward_part(open_storage(uri), contract.reward_part_key(0, table, 0),
                       pa.Table.from_pylist(rows, schema=arrow_schema(contract.REWARD_COLUMNS)))


def pgraft(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **MARKED_ENV, "PGRAFT_S3_MAX_ATTEMPTS": "1", **env})


def test_no_command_prints_or_stores_a_credential(s3_uri, monkeypatch):
    from conftest import free_port

    for name, value in MARKED_ENV.items():
        monkeypatch.setenv(name, value)
    run = open_storage(s3_uri)
    # The config.yaml the generate stage records, made with the secrets in the environment.
    run.put_bytes(contract.CONFIG_KEY, config_to_yaml(load_config(None, [f"run.uri={s3_uri}"])).encode())
    tiny_reward_table(s3_uri, "tiny")

    filter_args = ["--quiet", "--set", "reward.table=tiny", "--set", "filter.n=4"]
    results = [
        pgraft("filter", *filter_args, "--set", f"run.uri={s3_uri}"),
        pgraft("status", s3_uri),
        pgraft("filter", *filter_args, "--set", "run.uri=s3://no-such-bucket-4c1e/run"),
        # Credentials in the endpoint's user part: the endpoint is named, its user part is not.
        pgraft("status", s3_uri, AWS_ENDPOINT_URL=f"http://user:{SECRET}@127.0.0.1:{free_port()}",
               PGRAFT_STORAGE_OUTAGE_S="1"),  # give up on the unreachable endpoint after 1 s
    ]
    assert [r.returncode for r in results] == [0, 1, 2, 2]  # status: 1 = the round is incomplete
    assert "S3 bucket 'no-such-bucket-4c1e' does not exist" in results[2].stderr
    assert "storage unreachable for " in results[3].stderr and " at endpoint http://127.0.0.1:" in results[3].stderr
    for result in results:
        assert SECRET not in result.stdout + result.stderr, result.args
    stored = {key: run.get_bytes(key) for key in run.list("")}
    assert any(key.endswith("summary.json") for key in stored)  # the filter's summary, among others
    assert not [key for key, data in stored.items() if SECRET.encode() in data]
