from __future__ import annotations

import json
import os
import shlex
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest
import boto3

from cluster import loopback
from helpers import watch_rig
from pgraft import contract
from pgraft.shards import list_committed, read_shard
from pgraft.storage import open_storage

# What these tests start (README, "Developing"): the tier they run in.
pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.deepspeed]

REPO = Path(__file__).resolve().parents[2]
PIN = "{gpu_node: 1}"


def submit(module: str, sets: list[str]) -> str:
    args = ["python", "-m", module, "--quiet"] + [x for s in sets for x in ("--set", s)]
    return "ray job submit --working-dir . -- " + " ".join(shlex.quote(a) for a in args)


def test_inc_stages_as_ray_jobs_run_on_the_worker_node(tiny_digits_flow, s3_endpoint, tmp_path):
    bucket = f"pgraft-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    open_storage(f"s3://{bucket}/models/flow").upload_folder(tiny_digits_flow, "")
    run = f"s3://{bucket}/run"
    corrector = f"{run}/corrector/flow-digits/model"
    common = [f"run.uri={run}", f"task.dir=s3://{bucket}/models", f"model.path=s3://{bucket}/models/flow",
              "model.num_inference_steps=4",
              "model.guidance_scale=1.0", "model.device=auto", "cluster.placement_timeout_s=60"]
    script = textwrap.dedent(f"""\
        set -e
        eval "$(make -s cluster-up CLUSTER_ARGS="$CLUSTER_ARGS")"
        trap 'make -s cluster-down > /dev/null' EXIT
        {submit("stages.invert", common + ["invert.name=digits", "invert.limit=48", "invert.samples_per_shard=16",
                                           f"invert.resources={PIN}"])}
        {submit("stages.train_corrector", common + ["invert.name=digits", "corrector.channels=[8,16]",
                                                    "corrector.steps=20", "corrector.batch_size=16", "corrector.checkpoint_every=10",
                                                    "corrector.include_unconverged=true",
                                                    f"corrector.resources_per_worker={PIN}"])}
        {submit("stages.generate", common + [f"model.noise_corrector={corrector}", "generate.prompts=['']",
                                             "generate.samples_per_prompt=8", "generate.capture_steps=[2]",
                                             f"generate.resources={PIN}"])}
    """)
    state = tmp_path / "rig.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a fresh shell
    env.update(PGRAFT_LOOPBACK_STATE=str(state), CLUSTER_ARGS=(
        f"--num-cpus 2 --resource-count 8 --head-env PGRAFT_CACHE_DIR={tmp_path / 'head-cache'} "
        f"--worker-env PGRAFT_CACHE_DIR={tmp_path / 'worker-cache'}"))
    seen = watch_rig(state)
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"a job failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    rig = seen["rig"]
    assert not loopback.rig_processes(rig), "processes of the cluster are left"

    store = open_storage(run)
    inversion = json.loads(store.get_bytes(contract.inversion_summary_key("digits")))
    assert inversion["samples"] == 48 and inversion["nodes"] == [rig.worker_node_id]
    summary = json.loads(store.get_bytes(contract.corrector_summary_key("flow-digits")))
    assert summary["model_dir"] == corrector and summary["nodes"] == [rig.worker_node_id]
    assert store.exists("corrector/flow-digits/checkpoints/step0000020/latest")
    samples = [s for sid, rec in list_committed(store, 0).items() for s in read_shard(store, 0, sid, rec)]
    assert len(samples) == 8 and {s.meta.noise_corrector for s in samples} == {corrector}
    # The head only orchestrated; the worker node fetched the base and the corrector once each.
    assert not (tmp_path / "head-cache").exists()
    fetches = [json.loads(line) for line in (tmp_path / "worker-cache/models/fetch.log").read_text().splitlines()]
    assert len(fetches) == len({f["digest"] for f in fetches}) == 2, fetches
