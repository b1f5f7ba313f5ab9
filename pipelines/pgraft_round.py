"""The round pipeline: generate → reward → filter → train → evaluate, for `run.rounds` rounds.

    ray job submit --working-dir . -- python pipelines/pgraft_round.py --config configs/digits.yaml
    python pipelines/pgraft_round.py --config configs/digits.yaml      # local Ray, same file

This process only orchestrates: models are loaded, sampled, scored and trained in Ray actors
and train ranks placed by resources, and what passes between stages and rounds is a
location in storage (shards, tables, the task's models, each round's fine-tuned model).
Every stage skips what is already complete, so rerunning the same command after the driver
died resumes where the round stopped; earlier rounds are never deleted.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (ray job submit): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgraft import contract  # noqa: E402
from pgraft.config import Config, ConfigError, load_config  # noqa: E402
from pgraft.errors import PgraftError  # noqa: E402

# Stages this pipeline runs, in order, every round (each where its StageSpec.applies to the config:
# evaluate when train.eval_samples_per_prompt > 0). Each reads only what a stage before it writes.
STAGES = ("generate", "reward", "filter", "train", "evaluate")


def base_to_pretrain(cfg: Config) -> str | None:
    """Which of the task's base models (TaskSpec.bases) the run samples from: the one whose folder
    under task.dir is model.path (None: the task has no choice of bases, or the run brings its own)."""
    from pgraft.models.fetch import child, is_remote

    spec = cfg.task.spec()
    for base in spec.bases if spec is not None else ():
        here = child(cfg.task.dir, base)
        if is_remote(here) or is_remote(cfg.model.path):
            same = here.rstrip("/") == cfg.model.path.rstrip("/")
        else:
            same = Path(here).expanduser().absolute() == Path(cfg.model.path).expanduser().absolute()
        if same:
            return base
    return None


def check_pretrain_options(cfg: Config) -> None:
    """task.dir's models must have been made with the task.pretrain_options the config asks for
    (those its summary.json records); otherwise one line, rather than a run on other models."""
    from pgraft.models.fetch import is_remote, local_folder
    from pgraft.storage import open_storage

    store = open_storage(cfg.task.dir if is_remote(cfg.task.dir) else str(local_folder(cfg.task.dir)))
    summary = json.loads(store.get_bytes("summary.json"))
    made_with = summary.get("pretrain_options", summary)  # earlier sets recorded some options at the top level
    for key, wanted in cfg.task.pretrain_options.items():
        if key in made_with and made_with[key] != wanted:
            raise ConfigError(f"config error: task.pretrain_options.{key}: the models in {cfg.task.dir} were pretrained "
                              f"with {key}={made_with[key]!r}, not {wanted!r}; point task.dir at another folder (or "
                              "delete this one) to pretrain them anew")


def publish_task_models(cfg: Config, progress: bool = True) -> None:
    """Pretrain the task's models in a Ray task (TaskSpec.pretrain) and publish them to
    `task.dir`, once: every node then fetches them from there (the driver trains nothing). Only
    the base model the run samples from is trained; a later run that samples from another base
    of the task adds it to the same task.dir."""
    import cluster
    from pgraft.models.adapters import MODEL_CARD
    from pgraft.models.fetch import model_file_exists

    spec = cfg.task.spec()
    if spec is None or not cfg.task.pretrain:
        return
    base = base_to_pretrain(cfg)
    # summary.json is written last, locally and in storage: its presence means a whole set of models.
    have_set = model_file_exists(cfg.task.dir, "summary.json")
    if have_set:
        check_pretrain_options(cfg)
        if base is None or model_file_exists(cfg.task.dir, f"{base}/{MODEL_CARD}"):
            return
    options = dict(cfg.task.pretrain_options, **({"bases": base} if base is not None else {}))
    pretrain = functools.partial(spec.pretrain, **options) if options else spec.pretrain
    what = f" ({base} base" + (", added to the published set)" if have_set else ")") if base else ""
    print(f"pretraining the {spec.name} task{what} in a Ray task, published to {cfg.task.dir} (once; fetched afterwards)")
    placement = cluster.plan_placement(1, "cpu", "task", cfg.generate.resources)
    summary = cluster.run_task(pretrain, (cfg.task.dir, cfg.task.seed, placement.threads), placement,
                               "task pretraining", cfg.cluster.placement_timeout_s)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in summary.items()
                      if ("alignment" in k or "accuracy" in k or k.startswith("base_")) and isinstance(v, float))
    print(f"  done in {summary['total_seconds']:.0f} s" + (f"; {shown}" if shown else ""))


def previous_model(cfg: Config, round_idx: int) -> str | None:
    """The model round `round_idx` samples from: round r−1's fine-tuned model (r > 0)."""
    from pgraft.models.fetch import model_file_exists
    from pgraft.storage import open_storage

    if round_idx == 0 or cfg.model.finetuned is not None and round_idx == cfg.run.round:
        return cfg.model.finetuned
    before = cfg.model_copy(deep=True)
    before.run.round = round_idx - 1
    location = before.trained_model()
    if not model_file_exists(location, contract.COMPOSITE_CARD):
        raise PgraftError(f"round {round_idx - 1} of {open_storage(cfg.run.uri).uri} has no fine-tuned model at "
                          f"{location}; run round {round_idx - 1} first (run.round={round_idx - 1}) or set model.finetuned")
    return location


def _warn_local_locations_on_many_nodes(cfg: Config) -> None:
    import cluster

    nodes = cluster.alive_node_count()
    local = {key: value for key, value in (("run.uri", cfg.run.uri), ("task.dir", cfg.task.dir if cfg.task.pretrain else None),
                                           ("model.path", cfg.model.path), ("model.finetuned", cfg.model.finetuned),
                                           ("reward.model_path", cfg.reward.model_path))
             if value and "://" not in value and value.startswith("/")}
    if nodes > 1 and local:
        shown = ", ".join(f"{k}={v}" for k, v in local.items())
        print(f"warning: {shown}: local path(s) on a {nodes}-node cluster; they work only if every node mounts "
              "them (a shared file system). Use s3://… otherwise.", file=sys.stderr)


def run_round_pipeline(cfg: Config, progress: bool = True) -> list[dict]:
    """Run `run.rounds` rounds from `run.round`; round r > first samples from round r−1's model."""
    import cluster
    from pgraft.storage import open_storage

    if cfg.run.rounds > 1 and cfg.train.mode == "lora":
        raise ConfigError("config error: train.mode: lora supports one round so far (run.rounds=1); "
                          "use train.mode=full for several rounds")
    cfg = cfg.with_absolute_paths()
    cluster.connect()
    _warn_local_locations_on_many_nodes(cfg)
    publish_task_models(cfg, progress)
    storage = open_storage(cfg.run.uri)
    driver_node = cluster.current_node_id()
    results = []
    with cluster.keep_warm():  # pools and the train group stay up across stages and rounds while the cluster has room
        for rnd in range(cfg.run.round, cfg.run.round + cfg.run.rounds):
            results.append(_run_round(cfg, rnd, storage, driver_node, progress))
    from pgraft.runs import read_run, render_rounds_table

    print(render_rounds_table(read_run(storage.uri)), flush=True)
    return results


def _run_round(cfg: Config, rnd: int, storage, driver_node: str, progress: bool) -> dict:
    """One round's stages in order; its record (wall time and nodes per stage) is written to storage and returned."""
    from pgraft.stagespec import run_stage
    from stages import get_stage

    round_cfg = cfg.model_copy(deep=True)
    round_cfg.run.round = rnd
    round_cfg.model.finetuned = previous_model(cfg, rnd)
    print(f"== round {rnd}" + (f" (sampling from {round_cfg.model.finetuned})" if round_cfg.model.finetuned else ""))
    record = {"round": rnd, "driver_node": driver_node, "stages": {}}
    for name in STAGES:
        stage = get_stage(name)
        if not stage.applies(round_cfg):
            continue
        start = time.perf_counter()
        summary = run_stage(stage, round_cfg, progress=progress)  # holding the lease on the stage's output
        seconds = time.perf_counter() - start
        print(summary.headline(), flush=True)  # one line per finished stage: job logs stay readable
        record["stages"][name] = {"seconds": round(seconds, 2),
                                  "nodes": sorted(summary.nodes)}  # local filter: none (this process)
        if name == "evaluate":
            record["eval"] = {v: {"reward_mean": s["reward_mean"], "reward_stderr": s["reward_stderr"],
                                  "frechet_distance": s["frechet_distance"], "diversity": s["diversity"],
                                  **({"task_metrics": s["task_metrics"]} if "task_metrics" in s else {})}
                              for v, s in summary.variants.items()}
    storage.put_bytes(contract.pipeline_record_key(rnd), json.dumps(record, indent=1).encode())
    return record


def main(argv: list[str] | None = None) -> int:
    from pgraft.stagespec import add_config_args, guarded

    parser = argparse.ArgumentParser(prog="pgraft_round")
    add_config_args(parser)
    args = parser.parse_args(argv)
    return guarded("round", lambda: run_round_pipeline(load_config(args.config, args.overrides), not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
