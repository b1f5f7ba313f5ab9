"""The round pipeline: generate → reward → filter → train, for `run.rounds` rounds.

    ray job submit --working-dir . -- python pipelines/pgraft_round.py --config configs/digits.yaml
    python pipelines/pgraft_round.py --config configs/digits.yaml      # local Ray, same file

Each stage talks to the next only through storage under `run.uri`, so any stage can be rerun
alone with `pgraft <stage>`. Stages that are not built yet are listed, not faked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (ray job submit): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgraft.config import Config, load_config  # noqa: E402

# Stages this pipeline runs, in order. Train joins when it lands.
STAGES = ("generate", "reward", "filter")


def ensure_task_models(cfg: Config, progress: bool = True) -> None:
    """Pretrain the built-in task's models once, when the configured model folder is missing."""
    if cfg.task.name != "digits" or Path(cfg.model.path).exists():
        return
    from pgraft.tasks.digits import pretrain_digits

    print(f"pretraining the digits task into {cfg.task.dir} (once; cached afterwards)")
    summary = pretrain_digits(cfg.task.dir, seed=cfg.task.seed, progress=progress)
    print(f"  done in {summary['total_seconds']:.0f} s; base alignment "
          f"{summary.get('ddpm_alignment_at_guidance_0.7', float('nan')):.3f}")


def run_round_pipeline(cfg: Config, progress: bool = True) -> None:
    from stages.filter import run_filter
    from stages.generate import run_generate
    from stages.reward import run_reward

    ensure_task_models(cfg, progress)
    if cfg.run.rounds > 1:
        print("note: rounds after the first need the train stage (not built yet); running one round")
    round_cfg = cfg.model_copy(deep=True)
    for run_stage in (run_generate, run_reward, run_filter):
        print(run_stage(round_cfg, progress=progress).render())
    print(f"stages run: {', '.join(STAGES)}; the train stage is not built yet")


def main(argv: list[str] | None = None) -> int:
    from pgraft.cli import _guarded, add_config_args

    parser = argparse.ArgumentParser(prog="pgraft_round")
    add_config_args(parser)
    args = parser.parse_args(argv)
    return _guarded("round", lambda: run_round_pipeline(load_config(args.config, args.overrides), not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
