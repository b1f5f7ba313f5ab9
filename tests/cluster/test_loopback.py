"""The loopback rig: a job submitted to it runs its driver on the head node and its CPU task
and custom-resource actor on the worker node, each with its node's environment and the venv's
python; stopping the rig leaves none of its processes."""

from __future__ import annotations

import json
import textwrap

import pytest

from cluster import loopback

# What these tests start (README, "Developing"): the tier they run in.
pytestmark = [pytest.mark.cluster, pytest.mark.ray]

JOB = textwrap.dedent("""
    import json, os, sys
    import ray

    ray.init()

    def here():
        return {"node": ray.get_runtime_context().get_node_id(), "exe": sys.executable,
                "cache": os.environ.get("PGRAFT_CACHE_DIR")}

    @ray.remote(num_cpus=1)
    def task():
        return here()

    @ray.remote(num_cpus=0, resources={"gpu_node": 1})
    class Actor:
        def where(self):
            return here()

    out = {"driver": here(), "task": ray.get(task.remote()), "actor": ray.get(Actor.remote().where.remote())}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture
def rig(tmp_path):
    with loopback.running(num_cpus=1, head_env={"PGRAFT_CACHE_DIR": str(tmp_path / "head-cache")},
                          worker_env={"PGRAFT_CACHE_DIR": str(tmp_path / "worker-cache")}, timeout=60) as rig:
        yield rig
    assert not loopback.rig_processes(rig), "rig processes left after stop"


def test_job_runs_driver_on_head_and_work_on_worker_node(rig, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "script.py").write_text(JOB)

    done = loopback.submit_job(rig, ["python", "script.py"], working_dir=str(job_dir), timeout=120)

    results = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and results, f"job failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    out = json.loads(results[-1])
    assert rig.head_node_id != rig.worker_node_id
    assert out["driver"]["node"] == rig.head_node_id
    assert out["task"]["node"] == rig.worker_node_id
    assert out["actor"]["node"] == rig.worker_node_id
    # Every process runs this venv's python (`python` in the entrypoint included) and sees the
    # environment its node was started with.
    assert {out[k]["exe"] for k in out} == {loopback.VENV_BIN + "/python"}
    assert out["driver"]["cache"] == str(tmp_path / "head-cache")
    assert out["task"]["cache"] == out["actor"]["cache"] == str(tmp_path / "worker-cache")
