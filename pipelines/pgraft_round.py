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

from pgraft.config import Config, ConfigError, load_config  # noqa: E402

# Stages this pipeline runs, in order, every round.
STAGES = ("generate", "reward", "filter", "train")


def ensure_task_models(cfg: Config, progress: bool = True) -> None:
    """Pretrain the built-in task's models once, when the configured model folder is missing."""
    if cfg.task.name != "digits" or Path(cfg.model.path).exists():
        return
    from pgraft.tasks.digits import pretrain_digits

    print(f"pretraining the digits task into {cfg.task.dir} (once; cached afterwards)")
    summary = pretrain_digits(cfg.task.dir, seed=cfg.task.seed, progress=progress)
    print(f"  done in {summary['total_seconds']:.0f} s; base alignment "
          f"{summary.get('ddpm_alignment_at_guidance_0.7', float('nan')):.3f}")


def finetuned_model_dir(cfg: Config, round_idx: int) -> str:
    """A local folder holding round `round_idx`'s fine-tuned model (fetched if the run is on S3)."""
    from pgraft import contract
    from pgraft.storage import open_storage

    storage = open_storage(cfg.run.uri)
    selection = cfg.train.selection or cfg.filter.selection_name()
    prefix = f"{contract.train_prefix(round_idx, cfg.train.output_name(selection))}/model"
    local = storage.local_path(prefix)
    if local is not None:
        return local
    target = Path(cfg.train.cache_dir).expanduser() / "models" / prefix.replace("/", "_")
    storage.download_prefix(prefix, target)
    return str(target)


def run_round_pipeline(cfg: Config, progress: bool = True) -> list[dict]:
    """Run `run.rounds` rounds from `run.round`; round r > first samples from round r−1's model."""
    from stages.filter import run_filter
    from stages.generate import resolve_prompts, run_generate
    from stages.reward import reward_model_path, run_reward
    from stages.train import run_train

    if cfg.run.rounds > 1 and cfg.train.mode == "lora":
        raise ConfigError("config error: train.mode: lora supports one round so far (run.rounds=1); "
                          "use train.mode=full for several rounds")
    ensure_task_models(cfg, progress)
    results = []
    previous = finetuned_model_dir(cfg, cfg.run.round - 1) if cfg.run.round > 0 and cfg.model.finetuned is None \
        else cfg.model.finetuned
    for rnd in range(cfg.run.round, cfg.run.round + cfg.run.rounds):
        round_cfg = cfg.model_copy(deep=True)
        round_cfg.run.round = rnd
        round_cfg.model.finetuned = previous
        print(f"== round {rnd}" + (f" (sampling from {round_cfg.model.finetuned})" if round_cfg.model.finetuned else ""))
        for run_stage in (run_generate, run_reward, run_filter, run_train):
            print(run_stage(round_cfg, progress=progress).render())
        result = {"round": rnd}
        previous = finetuned_model_dir(cfg, rnd)  # this round's model: next round samples from it
        if cfg.train.eval_samples_per_prompt:
            from pgraft.evaluate import sample_rewards

            trained = round_cfg.model.model_copy(update={"finetuned": previous})
            args = (round_cfg.reward, reward_model_path(round_cfg), resolve_prompts(round_cfg.generate.prompts),
                    cfg.train.eval_samples_per_prompt)
            before = sample_rewards(round_cfg.model, *args)
            after = sample_rewards(trained, *args)
            result.update(reward_before=float(before.mean()), reward_after=float(after.mean()))
            print(f"round {rnd}: mean {round_cfg.reward.name} on {len(after)} fresh samples "
                  f"{before.mean():.4f} (sampler of this round) → {after.mean():.4f} (after its training)")
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    from pgraft.cli import _guarded, add_config_args

    parser = argparse.ArgumentParser(prog="pgraft_round")
    add_config_args(parser)
    args = parser.parse_args(argv)
    return _guarded("round", lambda: run_round_pipeline(load_config(args.config, args.overrides), not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
