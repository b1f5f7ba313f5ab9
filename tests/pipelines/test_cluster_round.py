from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import boto3

from cluster import loopback
from cluster.chaos import ChaosMonkey, compare_runs, count_samples, move_run, run_with_chaos
from pgraft import contract
from pgraft.storage import open_storage

# What these tests start (README, "Developing"): the tier they run in.
pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.deepspeed]

REPO = Path(__file__).resolve().parents[2]
PIN = "{gpu_node: 1}"


def readme_sets(bucket: str) -> list[str]:
    return [
        f"run.uri=s3://{bucket}/run", "task.pretrain=false", f"model.path=s3://{bucket}/models/ddpm",
        f"reward.model_path=s3://{bucket}/models/classifier", "model.num_inference_steps=6", "model.device=auto",
        "generate.prompts=[a handwritten digit 1, a handwritten digit 2]", "generate.samples_per_prompt=8",
        "generate.samples_per_shard=2", "generate.capture_steps=[3]", f"generate.resources={PIN}",
        f"reward.resources={PIN}", f"train.resources_per_worker={PIN}", "filter.n=4", "filter.engine=ray",
        "train.t_step=3", "train.epochs=null", "train.steps=30", "train.batch_size=4", "train.checkpoint_every=10",
        "train.eval_samples_per_prompt=4", "cluster.placement_timeout_s=60",
        # For the chaos run: restarts enough for a kill every few seconds; a killed driver's
        # lease goes stale after 5 s, so the resubmitted driver takes over soon.
        "cluster.max_restarts=100", "train.max_failures=100", "storage.lease_ttl_s=5", "storage.lease_wait_s=120",
    ]


def shell(command: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_readme_commands_run_a_round_on_the_worker_node_and_it_survives_chaos_byte_identical(
        tiny_digits, classifier_dir, s3_endpoint, tmp_path):
    bucket = f"pgraft-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    # Models are published to storage; no node's disk holds a path another node needs.
    open_storage(f"s3://{bucket}/models/ddpm").upload_folder(tiny_digits, "")
    open_storage(f"s3://{bucket}/models/classifier").upload_folder(classifier_dir, "")
    sets = readme_sets(bucket)
    entry = ["python", "pipelines/pgraft_round.py"] + [x for s in sets for x in ("--set", s)]
    state = tmp_path / "rig.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a fresh shell: no cluster of ours
    env.update(PGRAFT_LOOPBACK_STATE=str(state), CLUSTER_ARGS=(
        f"--num-cpus 2 --resource-count 8 --head-env PGRAFT_CACHE_DIR={tmp_path / 'head-cache'} "
        f"--worker-env PGRAFT_CACHE_DIR={tmp_path / 'worker-cache'}"))
    up = shell('make -s cluster-up CLUSTER_ARGS="$CLUSTER_ARGS"', env, timeout=180)
    assert up.returncode == 0, up.stderr
    try:
        rig = loopback.load_state(state)
        done = shell(up.stdout + "\nray job submit --working-dir . -- " + " ".join(shlex.quote(a) for a in entry), env)
        assert done.returncode == 0, f"job failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
        check_the_undisturbed_round(bucket, rig, done.stdout, tmp_path)

        calm = move_run(open_storage(f"s3://{bucket}"), "run/", "calm/")
        assert calm > 0
        store = open_storage(f"s3://{bucket}/run")
        reward_started = lambda: bool(store.list(contract.rewards_prefix(0, "digits_alignment")))  # noqa: E731
        monkey = ChaosMonkey(rig, seed=3, every_s=8, max_kills=6)
        chaos = run_with_chaos(rig, entry + ["--quiet"], str(REPO), monkey, kill_driver_when=reward_started,
                               timeout=900)
    finally:
        down = shell("make -s cluster-down", env, timeout=120)
    assert down.returncode == 0 and not state.exists(), "make cluster-down did not run"
    assert not loopback.rig_processes(rig), "processes of the cluster are left"

    assert chaos.returncode == 0, chaos.log[-4000:]
    assert len(chaos.driver_kills) == 1 and chaos.submissions == 2
    assert chaos.worker_kills, "the chaos loop killed nothing"
    assert compare_runs(open_storage(f"s3://{bucket}/calm"), store) == {}
    assert count_samples(store) == (16, 16)  # each exactly once
    print(f"chaos round: {len(chaos.worker_kills)} worker kills {chaos.worker_kills}, driver killed at "
          f"{chaos.driver_kills} s; {chaos.seconds:.0f} s")


def check_the_undisturbed_round(bucket: str, rig, log: str, tmp_path: Path) -> None:
    store = open_storage(f"s3://{bucket}/run")
    record = json.loads(store.get_bytes("round-000/pipeline.json"))
    assert record["driver_node"] == rig.head_node_id
    for stage in ("generate", "reward", "filter", "train", "evaluate"):  # filter: its Ray engine's tasks
        assert record["stages"][stage]["nodes"] == [rig.worker_node_id], stage
    assert store.exists("round-000/train/best_of_n-4-t3/model/composite.json")
    assert store.exists("round-000/train/best_of_n-4-t3/checkpoints/step0000030/latest")
    assert set(json.loads(store.get_bytes("round-000/eval/summary.json"))["variants"]) == {"base", "finetuned"}
    # The head (driver only) fetched nothing; the worker node fetched each model once for all its
    # actors and train workers (base, classifier, the round's fine-tuned model).
    assert not (tmp_path / "head-cache").exists()
    fetches = [json.loads(line) for line in (tmp_path / "worker-cache/models/fetch.log").read_text().splitlines()]
    assert len(fetches) == len({f["digest"] for f in fetches}) == 3, fetches

    # The job log reads well: plain progress lines (no carriage-return redraws), one summary
    # line per finished stage, and the rounds table at the end.
    assert "\r" not in log
    for headline in (r"generate round 0: 8 shards", r"reward round 0: table digits_alignment", r"filter round 0: selection",
                     r"train round 0: best_of_n-4-t3, 30 steps", r"evaluate round 0: mean reward base"):
        assert len(re.findall(rf"^{headline}", log, re.M)) == 1, headline
    assert re.search(r"^generate round 0: 8/8 unit \(100%\)", log, re.M)
    assert re.search(r"^round\s+samples\s+accepted\s+implied KL", log, re.M)
    # What a user checks afterwards, straight from S3: status (exit 0: complete) and the report.
    status = subprocess.run([sys.executable, "-m", "pipelines.cli", "status", f"s3://{bucket}/run"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "last round 0: complete" in status.stdout, status.stdout + status.stderr
    report = subprocess.run([sys.executable, "-m", "pipelines.cli", "report", f"s3://{bucket}/run", "--out",
                             str(tmp_path / "report.html")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "data-figure" in (tmp_path / "report.html").read_text(), report.stderr
