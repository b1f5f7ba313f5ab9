"""The README's cluster commands, run as written from a fresh shell (`eval "$(make -s
cluster-up)"`, `ray job submit --working-dir . -- python pipelines/pgraft_round.py`, `make
cluster-down`): a real two-node Ray cluster on loopback (a CPU-less head, a worker
node with 2 CPUs and 8 units of a `gpu_node` resource standing in for a GPU node type) with the run and
the models on a moto S3 server: the job finishes a round although a generate actor and a Ray
Train worker are killed during it; the driver ran on the head and every stage's work on the
worker node; the head fetched no model and the worker node fetched each once."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import boto3

from cluster import loopback
from helpers import KillWhen, watch_rig
from pgraft.shards import list_committed
from pgraft.storage import open_storage

REPO = Path(__file__).resolve().parents[2]
PIN = "{gpu_node: 1}"


def readme_commands(sets: list[str]) -> str:
    """The README's loopback recipe as one bash script; `trap` brings the cluster down whatever happens."""
    entry = " ".join(shlex.quote(a) for a in ["python", "pipelines/pgraft_round.py"]
                     + [x for s in sets for x in ("--set", s)])
    return textwrap.dedent(f"""\
        set -e
        eval "$(make -s cluster-up CLUSTER_ARGS="$CLUSTER_ARGS")"
        trap 'make -s cluster-down > /dev/null' EXIT
        ray job submit --working-dir . -- {entry}
    """)


def test_ray_job_submit_runs_a_round_with_all_model_work_on_the_worker_node(tiny_digits, classifier_dir,
                                                                             s3_endpoint, tmp_path):
    bucket = f"pgraft-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    # Models are published to storage; no node's disk holds a path another node needs.
    open_storage(f"s3://{bucket}/models/ddpm").upload_folder(tiny_digits, "")
    open_storage(f"s3://{bucket}/models/classifier").upload_folder(classifier_dir, "")
    sets = [
        f"run.uri=s3://{bucket}/run", "task.pretrain=false", f"model.path=s3://{bucket}/models/ddpm",
        f"reward.model_path=s3://{bucket}/models/classifier", "model.num_inference_steps=6", "model.device=auto",
        "generate.prompts=[a handwritten digit 1, a handwritten digit 2]", "generate.samples_per_prompt=24",
        "generate.samples_per_shard=2", "generate.capture_steps=[3]", f"generate.resources={PIN}",
        f"reward.resources={PIN}", f"train.resources_per_worker={PIN}", "filter.n=4", "filter.engine=ray", "train.t_step=3",
        "train.steps=80", "train.batch_size=4", "train.checkpoint_every=20", "train.eval_samples_per_prompt=4",
        "cluster.placement_timeout_s=60",
    ]
    state = tmp_path / "rig.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a fresh shell: no cluster of ours
    env.update(PGRAFT_LOOPBACK_STATE=str(state), CLUSTER_ARGS=(
        f"--num-cpus 2 --resource-count 8 --head-env PGRAFT_CACHE_DIR={tmp_path / 'head-cache'} "
        f"--worker-env PGRAFT_CACHE_DIR={tmp_path / 'worker-cache'}"))
    seen = watch_rig(state)
    # Lost workers on the cluster: a generate actor once shards are being committed, a train
    # rank once the group has registered its step-20 checkpoint in S3.
    run = open_storage(f"s3://{bucket}/run")
    snapshot = "round-000/train/best_of_n-4-t3/checkpoints/registered.json"
    kill_generate = KillWhen(lambda: len(run.list("round-000/generate")) >= 4, "ray::GenerateWorker", timeout=600)
    kill_train = KillWhen(lambda: run.exists(snapshot) and b"step0000020" in run.get_bytes(snapshot),
                          "ray::TrainRank", timeout=600)
    done = subprocess.run(["bash", "-c", readme_commands(sets)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"job failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    assert not state.exists(), "make cluster-down did not run"
    rig = seen["rig"]
    assert not loopback.rig_processes(rig), "processes of the cluster are left"
    assert kill_generate.join() is not None and kill_train.join() is not None, "a kill did not happen"

    store = open_storage(f"s3://{bucket}/run")
    record = json.loads(store.get_bytes("round-000/pipeline.json"))
    assert record["driver_node"] == rig.head_node_id
    for stage in ("generate", "reward", "filter", "train", "evaluate"):  # filter: its Ray engine's tasks
        assert record["stages"][stage]["nodes"] == [rig.worker_node_id], stage
    assert store.exists("round-000/train/best_of_n-4-t3/model/composite.json")
    assert store.exists("round-000/train/best_of_n-4-t3/checkpoints/step0000080/latest")
    # The killed generate actor's unit was redone: every sample exactly once.
    keys = [k for rec in list_committed(store, 0).values() for k in rec.keys]
    assert len(keys) == len(set(keys)) == 48
    # The killed train worker: the group restarted from the registered checkpoint.
    assert json.loads(store.get_bytes("round-000/train/best_of_n-4-t3/summary.json"))["resumed_from"] >= 20
    assert set(json.loads(store.get_bytes("round-000/eval/summary.json"))["variants"]) == {"base", "finetuned"}
    # The head (driver only) fetched nothing; the worker node fetched each model once for all its
    # actors and train workers (base, classifier, the round's fine-tuned model).
    assert not (tmp_path / "head-cache").exists()
    fetches = [json.loads(line) for line in (tmp_path / "worker-cache/models/fetch.log").read_text().splitlines()]
    assert len(fetches) == len({f["digest"] for f in fetches}) == 3, fetches

    # The job log reads well: plain progress lines (no carriage-return redraws), one summary
    # line per finished stage, and the rounds table at the end.
    log = done.stdout
    assert "\r" not in log
    for headline in (r"generate round 0: 24 shards", r"reward round 0: table digits_alignment", r"filter round 0: selection",
                     r"train round 0: best_of_n-4-t3, 80 steps", r"evaluate round 0: mean reward base"):
        assert len(re.findall(rf"^{headline}", log, re.M)) == 1, headline
    assert re.search(r"^generate round 0: 24/24 unit \(100%\)", log, re.M)
    assert re.search(r"^round\s+samples\s+accepted\s+implied KL", log, re.M)
    # What a user checks afterwards, straight from S3: status (exit 0: complete) and the report.
    status = subprocess.run([sys.executable, "-m", "pipelines.cli", "status", f"s3://{bucket}/run"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "last round 0: complete" in status.stdout, status.stdout + status.stderr
    report = subprocess.run([sys.executable, "-m", "pipelines.cli", "report", f"s3://{bucket}/run", "--out",
                             str(tmp_path / "report.html")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "data-figure" in (tmp_path / "report.html").read_text(), report.stderr
