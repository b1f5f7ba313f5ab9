"""Evaluate stage: fresh-seed samples from the base and from the round's fine-tuned composite,
drawn by the generate workers, scored by the reward workers, summarised by a summary worker;
the variants share each pool (`cluster.keep_warm`), so each kind of actor starts once.

Each variant is laid out under round-NNN/eval/<variant>/ as a one-round run of its own
(config.yaml, round-000/generate/ shards without intermediate latents, round-000/rewards/
parts), so it reuses the generate and reward stages whole: restartable actors, resumable
units, the same per-sample seeds. The seeds derive from run.seed alone, so both variants and
every round see the same fresh noise, and none of it is ever used for training.

    pgraft evaluate --config C            # the round's base vs its trained model
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

import yaml

import cluster
from pgraft import contract
from pgraft.artifacts import EvalVariant
from pgraft.config import Config, first_difference, identity
from pgraft.contract import EvalSummary
from pgraft.errors import PgraftError
from pgraft.models.fetch import model_digest, model_file_exists
from pgraft.storage import join_key, open_storage
from pgraft.stagespec import StageSpec, stage_main
from pgraft.work.evaluate import summary_spec
from pgraft.work.generate import GenerateJob
from pgraft.work.reward import RewardJob

# Fresh seeds: the round index of the per-sample seed for evaluation, which no generate stage uses.
EVAL_SEED_ROUND = 10**6


class EvaluateError(PgraftError):
    """Evaluation cannot run; the message says why."""


def eval_seed(run_seed: int) -> int:
    """The run seed of every evaluation variant: derived from run.seed, the same each round."""
    return contract.sample_seed(run_seed, EVAL_SEED_ROUND, 0, 0) % (1 << 31)


def variant_config(cfg: Config, variant: str, finetuned: str | None) -> Config:
    """The one-round run that samples `variant`: fresh seeds, no intermediate latents."""
    out = cfg.model_copy(deep=True)
    out.run.uri = open_storage(cfg.run.uri).url(contract.eval_prefix(cfg.run.round, variant))
    out.run.round, out.run.seed = 0, eval_seed(cfg.run.seed)
    out.model.finetuned = finetuned
    out.generate.samples_per_prompt = cfg.train.eval_samples_per_prompt
    out.generate.capture_steps = []
    return out


# What a variant's figures are a function of: the fields marked WHAT in these sections of its
# one-round run config (the seeds, the sampler, the samples per prompt, the task, the reward).
VARIANT_SECTIONS = ("run", "task", "model", "generate", "reward")


def _earlier_variant_config(storage, variant: EvalVariant) -> dict | None:
    key = join_key(variant.prefix, contract.CONFIG_KEY)
    return (yaml.safe_load(storage.get_bytes(key)) or {}) if storage.exists(key) else None


def check_variant(storage, cfg: Config, variant: str, model: str | None) -> None:
    """Samples already under eval/<variant>/ must come from the same model and settings;
    otherwise say which key changed instead of mixing them (or reusing stale ones)."""
    artifact = EvalVariant(cfg.run.round, variant)
    where = artifact.location(storage)
    earlier = _earlier_variant_config(storage, artifact)
    if earlier is not None:
        differs = first_difference(identity(earlier, VARIANT_SECTIONS),
                                   identity(variant_config(cfg, variant, model), VARIANT_SECTIONS), common_only=True)
        if differs is not None:
            key, old, new = differs
            shown = "train.eval_samples_per_prompt" if key == "generate.samples_per_prompt" else key
            raise EvaluateError(f"{where} holds samples made with another {shown} ({old!r}, now {new!r}); "
                                "delete it to evaluate again")
    digest = model_digest(model) if model else None
    if storage.exists(artifact.model_key) and json.loads(storage.get_bytes(artifact.model_key)).get("digest") != digest:
        raise EvaluateError(f"{where} holds samples of an earlier {variant} model (retrained since?); "
                            "delete it to evaluate again")
    storage.put_bytes(artifact.model_key, json.dumps({"model": model, "digest": digest}).encode())


def earlier_base_evaluation(storage, cfg: Config) -> tuple[int, dict] | None:
    """(round, summary) of an earlier round's evaluation of the base with the same seeds, sampler,
    samples per prompt, task and reward: the base is the same in every round of a run, so its
    figures are too, and later rounds reuse them instead of sampling them again."""
    mine = identity(variant_config(cfg, "base", None), VARIANT_SECTIONS)
    for rnd in range(cfg.run.round):
        artifact = EvalVariant(rnd, "base")
        earlier = _earlier_variant_config(storage, artifact)
        if earlier is None or not storage.exists(artifact.summary_key):
            continue
        if first_difference(identity(earlier, VARIANT_SECTIONS), mine) is None:
            return rnd, json.loads(storage.get_bytes(artifact.summary_key))
    return None


def evaluate_variants(cfg: Config, models: dict[str, str | None], progress: bool = True) -> dict[str, dict]:
    """Fresh-seed samples of each variant's model (`models`: variant → model, None for the base)
    under round-NNN/eval/<variant>/, drawn by the generate workers and scored by the reward
    workers, then summarised; each summary is written beside its samples and returned (`nodes`:
    every node that did its work). The variants share pools: one generate pool samples them
    all in turn (its actors swap the model), one reward pool scores them, one actor summarises."""
    cfg = cfg.with_absolute_paths()
    storage = open_storage(cfg.run.uri)
    configs = {variant: variant_config(cfg, variant, model) for variant, model in models.items()}
    for variant, model in models.items():
        check_variant(storage, cfg, variant, model)
    label = f"evaluate round {cfg.run.round}"
    with cluster.keep_warm():
        sampled = {variant: cluster.run_job(GenerateJob(c), f"{label} {variant}: generate", progress)
                   for variant, c in configs.items()}
        # After every generate: a reward job lists the committed shards when it is made.
        scored = {variant: cluster.run_job(RewardJob(c), f"{label} {variant}: reward", progress)
                  for variant, c in configs.items()}
    units = [(variant, c.model_dump(mode="json")) for variant, c in configs.items()]
    results = {}
    for done in cluster.execute(summary_spec(cfg), units, desc=f"{label}: summaries", progress=False):
        results[done.unit[0]] = {**done.value, "node_id": done.node_id}
    for variant in models:  # in the order asked
        result = results[variant]
        result["nodes"] = sorted({result["node_id"], *sampled[variant].nodes, *scored[variant].nodes})
        storage.put_bytes(EvalVariant(cfg.run.round, variant).summary_key, json.dumps(result, indent=1).encode())
    return {variant: results[variant] for variant in models}


def evaluate_variant(cfg: Config, variant: str, model: str | None, progress: bool = True) -> dict:
    """`evaluate_variants` of one variant."""
    return evaluate_variants(cfg, {variant: model}, progress)[variant]


def run_evaluate(cfg: Config, progress: bool = True, finetuned: str | None = None) -> EvalSummary:
    """Evaluate the round's base (`base`) and its fine-tuned composite (`finetuned`, the
    train stage's model unless given)."""
    start = time.perf_counter()
    cfg = cfg.with_absolute_paths()
    if cfg.train.eval_samples_per_prompt < 1:
        raise EvaluateError("train.eval_samples_per_prompt is 0: nothing to evaluate")
    finetuned = finetuned or cfg.trained_model()
    storage = open_storage(cfg.run.uri)
    if not model_file_exists(finetuned, contract.COMPOSITE_CARD):
        raise EvaluateError(f"round {cfg.run.round} has no fine-tuned model at {finetuned}; run `pgraft train` first")
    summary = EvalSummary(round=cfg.run.round, reward=cfg.reward.name, seed=eval_seed(cfg.run.seed),
                          samples_per_prompt=cfg.train.eval_samples_per_prompt)
    models = {"base": None, "finetuned": finetuned}
    reused = earlier_base_evaluation(storage, cfg)
    if reused is not None:
        rnd, base = reused
        del models["base"]
        summary.variants["base"] = {**base, "reused_from_round": rnd}
        print(f"evaluate round {cfg.run.round}: base as evaluated in round {rnd} (same base, seeds and reward)", flush=True)
    summary.variants.update(evaluate_variants(cfg, models, progress))
    summary.seconds = time.perf_counter() - start
    storage.put_bytes(contract.eval_summary_key(cfg.run.round), json.dumps(asdict(summary), indent=1).encode())
    return summary


STAGE = StageSpec(
    name="evaluate", run=run_evaluate, description="fresh-seed samples of the base and the fine-tuned composite, scored and summarised",
    reads=("task", "training"), writes=("evaluation",),
    applies=lambda cfg: cfg.train.eval_samples_per_prompt > 0,
)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
