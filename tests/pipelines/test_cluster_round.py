"""The README's cluster commands, run as written from a fresh shell (`eval "$(make -s
cluster-up)"`, `ray job submit --working-dir . -- python pipelines/pgraft_round.py`, `make
cluster-down`): a real two-node Ray cluster on loopback (a CPU-less head, a worker node with 2
CPUs and 8 units of a `gpu_node` resource standing in for a GPU node type) with the run and the
models on a moto S3 server. The job finishes a round; the driver ran on the head and every
stage's work on the worker node; the head fetched no model and the worker node fetched each
once; the job log, `pgraft status` and `pgraft report` read well.

Then, on the same rig, the test-sized chaos round (benchmarks/chaos_round.py is the full one,
two rounds): the undisturbed run moves aside and the same command runs again at the same
run.uri while a seeded chaos loop SIGKILLs a generate, reward or evaluation actor or a train
rank every ~8 s (6 at most), and the job driver is killed once, during the reward stage, and
the command submitted again. The round finishes; every sample exists once; shards, reward
tables, accepted rows, the evaluation and the weights are byte-identical to the undisturbed
run's.

On the same rig, Inverse Noise Correction as a user runs it on a cluster: `ray job submit` of
the invert, train-corrector and generate stages; every inversion, the corrector's training and
the corrected sampling run on the worker node; the head fetches no model. The rig comes up once
for both (a module fixture) and `make cluster-down` must leave none of its processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest

from cluster import loopback
from cluster.chaos import ChaosMonkey, compare_runs, count_samples, move_run, run_with_chaos
from pgraft import contract
from pgraft.shards import list_committed, read_shard
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


def submit(module: str, sets: list[str]) -> str:
    args = ["python", "-m", module, "--quiet"] + [x for s in sets for x in ("--set", s)]
    return "ray job submit --working-dir . -- " + " ".join(shlex.quote(a) for a in args)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """The README's cluster, brought up once for this module's jobs as a user does (`make
    cluster-up`: a head without CPUs, a worker node with the custom resource gpu_node), and
    brought down by `make cluster-down`, which must leave none of its processes. `exports` is
    what cluster-up prints (RAY_ADDRESS and the auth variables) for a shell to eval."""
    root = tmp_path_factory.mktemp("rig")
    state = root / "rig.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a fresh shell: no cluster of ours
    env.update(PGRAFT_LOOPBACK_STATE=str(state), CLUSTER_ARGS=(
        f"--num-cpus 2 --resource-count 8 --head-env PGRAFT_CACHE_DIR={root / 'head-cache'} "
        f"--worker-env PGRAFT_CACHE_DIR={root / 'worker-cache'}"))
    up = shell('make -s cluster-up CLUSTER_ARGS="$CLUSTER_ARGS"', env, timeout=180)
    assert up.returncode == 0, up.stderr
    cluster = loopback.load_state(state)
    try:
        yield SimpleNamespace(env=env, exports=up.stdout, cluster=cluster, head_cache=root / "head-cache",
                              fetch_log=root / "worker-cache/models/fetch.log")
    finally:
        down = shell("make -s cluster-down", env, timeout=120)
    assert down.returncode == 0 and not state.exists(), "make cluster-down did not run"
    assert not loopback.rig_processes(cluster), "processes of the cluster are left"


def worker_fetches(rig, bucket: str) -> list[dict]:
    """The worker node's model downloads of this test's bucket (the rig is shared)."""
    lines = rig.fetch_log.read_text().splitlines() if rig.fetch_log.exists() else []
    return [f for f in map(json.loads, lines) if f"s3://{bucket}/" in f["ref"]]


def test_readme_commands_run_a_round_on_the_worker_node_and_it_survives_chaos_byte_identical(
        rig, tiny_digits, classifier_dir, s3_endpoint, tmp_path):
    bucket = f"pgraft-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    # Models are published to storage; no node's disk holds a path another node needs.
    open_storage(f"s3://{bucket}/models/ddpm").upload_folder(tiny_digits, "")
    open_storage(f"s3://{bucket}/models/classifier").upload_folder(classifier_dir, "")
    sets = readme_sets(bucket)
    entry = ["python", "pipelines/pgraft_round.py"] + [x for s in sets for x in ("--set", s)]
    done = shell(rig.exports + "\nray job submit --working-dir . -- " + " ".join(shlex.quote(a) for a in entry), rig.env)
    assert done.returncode == 0, f"job failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    check_the_undisturbed_round(bucket, rig, done.stdout, tmp_path)

    calm = move_run(open_storage(f"s3://{bucket}"), "run/", "calm/")
    assert calm > 0
    store = open_storage(f"s3://{bucket}/run")
    reward_started = lambda: bool(store.list(contract.rewards_prefix(0, "digits_alignment")))  # noqa: E731
    monkey = ChaosMonkey(rig.cluster, seed=3, every_s=8, max_kills=6)
    chaos = run_with_chaos(rig.cluster, entry + ["--quiet"], str(REPO), monkey, kill_driver_when=reward_started,
                           timeout=900)
    assert chaos.returncode == 0, chaos.log[-4000:]
    assert len(chaos.driver_kills) == 1 and chaos.submissions == 2
    assert chaos.worker_kills, "the chaos loop killed nothing"
    assert compare_runs(open_storage(f"s3://{bucket}/calm"), store) == {}
    assert count_samples(store) == (16, 16)  # each exactly once
    print(f"chaos round: {len(chaos.worker_kills)} worker kills {chaos.worker_kills}, driver killed at "
          f"{chaos.driver_kills} s; {chaos.seconds:.0f} s")


def test_inc_stages_as_ray_jobs_run_on_the_worker_node(rig, tiny_digits_flow, s3_endpoint):
    bucket = f"pgraft-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    open_storage(f"s3://{bucket}/models/flow").upload_folder(tiny_digits_flow, "")
    run = f"s3://{bucket}/run"
    corrector = f"{run}/corrector/flow-digits/model"
    common = [f"run.uri={run}", f"task.dir=s3://{bucket}/models", f"model.path=s3://{bucket}/models/flow",
              "model.num_inference_steps=4",
              "model.guidance_scale=1.0", "model.device=auto", "cluster.placement_timeout_s=60"]
    script = "\n".join([
        "set -e", rig.exports,
        submit("stages.invert", common + ["invert.name=digits", "invert.limit=48", "invert.samples_per_shard=16",
                                          f"invert.resources={PIN}"]),
        submit("stages.train_corrector", common + ["invert.name=digits", "corrector.channels=[8,16]",
                                                   "corrector.steps=20", "corrector.batch_size=16", "corrector.checkpoint_every=10",
                                                   "corrector.include_unconverged=true",
                                                   f"corrector.resources_per_worker={PIN}"]),
        submit("stages.generate", common + [f"model.noise_corrector={corrector}", "generate.prompts=['']",
                                            "generate.samples_per_prompt=8", "generate.capture_steps=[2]",
                                            f"generate.resources={PIN}"]),
    ])
    done = shell(script, rig.env)
    assert done.returncode == 0, f"a job failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    worker = rig.cluster.worker_node_id

    store = open_storage(run)
    inversion = json.loads(store.get_bytes(contract.inversion_summary_key("digits")))
    assert inversion["samples"] == 48 and inversion["nodes"] == [worker]
    summary = json.loads(store.get_bytes(contract.corrector_summary_key("flow-digits")))
    assert summary["model_dir"] == corrector and summary["nodes"] == [worker]
    assert store.exists("corrector/flow-digits/checkpoints/step0000020/latest")
    samples = [s for sid, rec in list_committed(store, 0).items() for s in read_shard(store, 0, sid, rec)]
    assert len(samples) == 8 and {s.meta.noise_corrector for s in samples} == {corrector}
    # The head only orchestrated; the worker node fetched the base and the corrector once each.
    assert not rig.head_cache.exists()
    fetches = worker_fetches(rig, bucket)
    assert len(fetches) == len({f["digest"] for f in fetches}) == 2, fetches


def check_the_undisturbed_round(bucket: str, rig, log: str, tmp_path: Path) -> None:
    store = open_storage(f"s3://{bucket}/run")
    record = json.loads(store.get_bytes("round-000/pipeline.json"))
    assert record["driver_node"] == rig.cluster.head_node_id
    for stage in ("generate", "reward", "filter", "train", "evaluate"):  # filter: its Ray engine's tasks
        assert record["stages"][stage]["nodes"] == [rig.cluster.worker_node_id], stage
    assert store.exists("round-000/train/best_of_n-4-t3/model/composite.json")
    assert store.exists("round-000/train/best_of_n-4-t3/checkpoints/step0000030/latest")
    assert set(json.loads(store.get_bytes("round-000/eval/summary.json"))["variants"]) == {"base", "finetuned"}
    # The head (driver only) fetched nothing; the worker node fetched each model once for all its
    # actors and train workers (base, classifier, the round's fine-tuned model).
    assert not rig.head_cache.exists()
    fetches = worker_fetches(rig, bucket)
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
