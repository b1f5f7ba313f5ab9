"""Reward stage: score a round's committed shards into one Parquet part per shard.

Reads only what generate committed (images and JSON; latents are not loaded), never touches
the shards, and writes `rewards/<table>/part-<shard>.parquet` whole or not at all. Parts that
exist are skipped, so a rerun finishes an interrupted stage.

    pgraft reward --config configs/digits.yaml
    python -m stages.reward --config configs/digits.yaml --set reward.name=jpeg_compressibility
"""

from __future__ import annotations

import sys

import cluster
from pgraft.config import Config
from pgraft.stagespec import StageSpec, stage_main

# The worker, its checks and the tally live in the library (the evaluate stage drives them too);
# their names stay importable from here.
from pgraft.work.reward import (
    RewardError,
    RewardJob,
    RewardSummary,
    RewardWorker,
    check_reward_config,
    reward_model_path,
)

__all__ = ["STAGE", "RewardError", "RewardJob", "RewardSummary", "RewardWorker", "check_reward_config", "main",
           "reward_model_path", "run_reward"]


def run_reward(cfg: Config, progress: bool = True, label: str | None = None) -> RewardSummary:
    """Score the round's unscored shards; `label` names the work in progress lines (see run_generate)."""
    job = RewardJob(cfg)
    return cluster.run_job(job, label or f"reward {job.table} round {job.cfg.run.round}", progress)


STAGE = StageSpec(
    name="reward", run=run_reward, description="score a round's shards into a Parquet reward table",
    reads=("shards",), writes=("rewards",),
)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
