"""Generate stage: roll out prompts × M samples on Ray actors and cache X_t in WebDataset shards.

Work is split into units of `generate.samples_per_shard` samples, one shard each. A unit is
done once its commit record exists; a rerun redoes only units without one, so the stage is
resumable and never writes a sample twice. Seeds come from (run seed, round, prompt_id,
sample_idx), so the same config gives byte-identical shards.

    pgraft generate --config configs/digits.yaml --set generate.samples_per_prompt=8
    python -m stages.generate --config configs/digits.yaml
"""

from __future__ import annotations

import sys

import cluster
from pgraft.config import Config
from pgraft.stagespec import StageSpec, stage_main

# The worker, the planning and the tally live in the library (the evaluate stage drives them
# too); their names stay importable from here.
from pgraft.work.generate import (
    CALLS_PER_ACTOR,
    ActorClock,
    GenerateError,
    GenerateJob,
    GenerateSummary,
    GenerateWorker,
    WorkUnit,
    device_idle_fraction,
    plan_units,
    record_run_config,
    resolve_prompts,
)

__all__ = ["CALLS_PER_ACTOR", "STAGE", "ActorClock", "GenerateError", "GenerateJob", "GenerateSummary", "GenerateWorker",
           "WorkUnit", "device_idle_fraction", "main", "plan_units", "record_run_config", "resolve_prompts", "run_generate"]


def run_generate(cfg: Config, progress: bool = True, label: str | None = None) -> GenerateSummary:
    """Generate the round's missing shards; `label` names the work in progress lines (the
    evaluate stage's variants are one-round runs of their own: "evaluate round 3 base: generate")."""
    job = GenerateJob(cfg)
    return cluster.run_job(job, label or f"generate round {job.cfg.run.round}", progress, job.spec(CALLS_PER_ACTOR))


STAGE = StageSpec(
    name="generate", run=run_generate, description="roll out prompts × M samples on Ray actors and cache X_t in WebDataset shards",
    reads=("task",), writes=("shards",),
)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
