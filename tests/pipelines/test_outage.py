"""An object-store outage in the middle of a stage is ridden out (storage.outage_s). A round
(generate → reward → filter → train) runs in its own driver process, a job of the session's
Ray whose workers alone (by the job's runtime env) send their S3 traffic through a fault proxy
in front of the moto server, so no other test's traffic crosses it; the proxy cuts every connection,
and every new one, for OUTAGE_S seconds three times: once a shard is committed, once a reward
part is written, and once a train checkpoint's first object is uploaded. The round finishes
in one run, without a rerun, and every committed shard and reward part matches its record.
(benchmarks/outage.py takes the store away for 40 s per stage.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import OutageWhen
from pgraft import contract
from pgraft.commits import list_committed, whole
from pgraft.storage import open_storage
from pgraft.tables import scored_parts

# What these tests start (README, "Developing"): the tier they run in.
pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.beside]

REPO = Path(__file__).resolve().parents[2]
OUTAGE_S = 3.0


def test_a_round_rides_out_a_storage_outage_in_generate_reward_and_train(ray_local, tiny_digits, classifier_dir,
                                                                         s3_uri, s3_faults):
    look = open_storage(s3_uri)  # the test's own look goes to the server directly, past the proxy
    sets = [f"run.uri={s3_uri}", "task.pretrain=false", f"model.path={tiny_digits}", "model.num_inference_steps=6",
            "model.device=cpu", "generate.prompts=[a handwritten digit 1, a handwritten digit 2, a handwritten digit 3]",
            "generate.samples_per_prompt=8", "generate.samples_per_shard=4", "generate.capture_steps=[3]",
            f"reward.model_path={classifier_dir}", "filter.n=4", "train.t_step=3", "train.epochs=null",
            "train.steps=4", "train.checkpoint_every=2", "train.batch_size=8", "train.eval_samples_per_prompt=0",
            "storage.outage_s=60"]
    checkpoints = f"{contract.train_prefix(0, 'best_of_n-4-t3')}/{contract.CHECKPOINTS_DIR}"
    triggers = [lambda: len(look.list(contract.generate_prefix(0))) >= 3,  # plan + one shard and its record
                lambda: bool(look.list(contract.rewards_prefix(0, "digits_alignment"))),
                lambda: any("/step" in k for k in look.list(checkpoints))]

    def chain(index: int):
        """The next outage is armed once the one before has begun."""
        return lambda: len(outages) > index - 1 and outages[index - 1].result is not None and triggers[index]()

    outages = [OutageWhen(triggers[0], s3_faults, OUTAGE_S, timeout=600)]
    outages += [OutageWhen(chain(i), s3_faults, OUTAGE_S, timeout=600) for i in (1, 2)]
    # The driver joins the session's Ray as a job of its own; the job's runtime env points its
    # workers (and only them) at the proxy, as `ray job submit --runtime-env-json` would.
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, RAY_AUTH_MODE="token",
               AWS_ENDPOINT_URL=s3_faults.endpoint,
               RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps({"runtime_env": {"env_vars": {
                   "AWS_ENDPOINT_URL": s3_faults.endpoint}}}))
    done = subprocess.run([sys.executable, "pipelines/pgraft_round.py", "--quiet",
                           *[x for s in sets for x in ("--set", s)]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    began = [outage.join() for outage in outages]
    assert None not in began, f"an outage did not happen: {began}"
    assert s3_faults.cut > 0
    assert "unreachable" in done.stderr and "retrying for up to 60 s" in done.stderr  # said once per stalled call
    record = json.loads(look.get_bytes(contract.pipeline_record_key(0)))
    assert list(record["stages"]) == ["generate", "reward", "filter", "train"]
    committed = list_committed(look, 0)
    assert len(committed) == 6 and all(whole(look, contract.shard_key(0, sid), rec.bytes, rec.sha256)
                                       for sid, rec in committed.items())
    parts, torn = scored_parts(look, 0, "digits_alignment")
    assert len(parts) == 6 and torn == []
    assert look.exists(f"{contract.model_prefix(0, 'best_of_n-4-t3')}/{contract.COMPOSITE_CARD}")
