"""An object-store outage in the middle of a stage is ridden out (storage.outage_s): the fault
proxy in front of the moto S3 server cuts every connection, and refuses none through, for
OUTAGE_S seconds during generate (once a shard is committed), during a reward part write and
during a train checkpoint. Each stage finishes without a rerun, and every committed object
matches its record. (benchmarks/outage.py takes the store away for 40 s per stage.)"""

from __future__ import annotations

import time

from helpers import OutageWhen, stage_config
from pgraft import contract
from pgraft.commits import list_committed, whole
from pgraft.storage import open_storage
from pgraft.tables import scored_parts
from stages.filter import run_filter
from stages.generate import run_generate
from stages.reward import run_reward
from stages.train import run_train

OUTAGE_S = 4.0


def direct(uri: str, endpoint: str):
    """The run's store through moto's own endpoint: the test's look while the proxy cuts."""
    store = open_storage(uri)
    store.endpoint = endpoint
    return store


def timed(stage, cfg):
    start = time.monotonic()
    summary = stage(cfg, progress=False)
    return summary, start, time.monotonic()


def rode_out(outage: OutageWhen, start: float, end: float) -> bool:
    """The outage began while the stage ran, and the stage outlasted it."""
    fired = outage.join()
    return fired is not None and start < fired and end >= fired + OUTAGE_S


def test_generate_reward_and_train_ride_out_a_storage_outage(ray_local, tiny_digits, classifier_dir, s3_uri,
                                                             s3_faults):
    cfg = stage_config(tiny_digits, s3_uri, classifier_dir, "generate.num_workers=1", "reward.num_workers=1",
                       "filter.name=bo4", "filter.n=4", "train.selection=bo4", "train.t_step=3", "train.batch_size=8",
                       "train.steps=4", "train.checkpoint_every=2", "storage.outage_s=60")
    look = direct(s3_uri, s3_faults.direct)

    outage = OutageWhen(lambda: len(look.list(contract.generate_prefix(0))) >= 2, s3_faults, OUTAGE_S)
    generated, start, end = timed(run_generate, cfg)
    assert rode_out(outage, start, end) and generated.written == 9  # every shard in this one run
    committed = list_committed(look, 0)
    assert len(committed) == 9 and all(whole(look, contract.shard_key(0, sid), rec.bytes, rec.sha256)
                                       for sid, rec in committed.items())

    outage = OutageWhen(lambda: len(look.list(contract.rewards_prefix(0, "digits_alignment"))) >= 1, s3_faults, OUTAGE_S)
    scored, start, end = timed(run_reward, cfg)
    assert rode_out(outage, start, end) and scored.written == 9
    parts, torn = scored_parts(look, 0, "digits_alignment")
    assert len(parts) == 9 and torn == []

    run_filter(cfg, progress=False)
    checkpoints = f"{contract.train_prefix(0, cfg.train_output()[1])}/checkpoints"
    outage = OutageWhen(lambda: any("/step" in k for k in look.list(checkpoints)), s3_faults, OUTAGE_S)
    trained, start, end = timed(run_train, cfg)
    assert rode_out(outage, start, end) and trained.steps == 4 and trained.resumed_from == 0
    assert look.exists(f"{contract.model_prefix(0, cfg.train_output()[1])}/{contract.COMPOSITE_CARD}")
    assert s3_faults.cut > 0
