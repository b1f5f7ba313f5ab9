"""What a run holds, read from storage alone: per round and stage, what exists and whether it is
complete. `pgraft status` prints it; `pgraft report` draws it.

A stage is *complete* when its commit marker exists (docs/FORMAT.md): every planned shard's
commit record, a reward part per committed shard, a selection's or a training's summary.json,
the evaluation's summary.json. Anything short of that is *partial* (some output, no marker)
or *missing*. A round is complete when generate is, and a trained and exported model whose selection is
complete and was made from a complete reward table, and (when the round evaluates) the
evaluation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pgraft import contract
from pgraft.errors import PgraftError
from pgraft.storage import Storage, open_storage

COMPLETE, PARTIAL, MISSING = "complete", "partial", "missing"
_ROUND_RE = re.compile(r"^round-(\d{3})/")
_CHECKPOINT_RE = re.compile(r"/checkpoints/step(\d+)/")  # train_group.save_and_report names them stepNNNNNNN


class NotARunError(PgraftError):
    """The location holds no pgraft run (no config.yaml, no round folder)."""


@dataclass
class StageState:
    stage: str  # generate, reward, filter, train, evaluate
    name: str  # the table, selection or training name ("" for generate and evaluate)
    state: str  # COMPLETE, PARTIAL or MISSING
    detail: str  # what exists, in words: "5/5 shards", "best_of_n n=8: 80 of 640 accepted"
    summary: dict | None = None  # the stage's summary.json, when complete


@dataclass
class RoundState:
    round: int
    stages: list[StageState] = field(default_factory=list)
    pipeline: dict | None = None  # round-NNN/pipeline.json: stage wall times, when the round pipeline ran it
    evaluates: bool = True  # whether the run's config asks for an evaluation

    def of(self, stage: str) -> list[StageState]:
        return [s for s in self.stages if s.stage == stage]

    def done(self, stage: str) -> dict[str, StageState]:
        """The complete outputs of a stage, by name."""
        return {s.name: s for s in self.of(stage) if s.state == COMPLETE}

    @property
    def complete(self) -> bool:
        """Generate complete, and one chain that holds together: an exported training whose
        selection is complete, made from a complete reward table; plus the evaluation if asked.
        An older finished training does not make a round complete while its chain is broken."""
        if not self.done("generate") or (self.evaluates and not self.done("evaluate")):
            return False
        tables, selections = self.done("reward"), self.done("filter")
        return any((selection := selections.get(train.summary["selection"])) is not None
                   and selection.summary["reward_table"] in tables for train in self.done("train").values())


@dataclass
class RunState:
    uri: str
    config: dict
    rounds: list[RoundState]

    @property
    def last_round_complete(self) -> bool:
        return bool(self.rounds) and self.rounds[-1].complete


def _json(storage: Storage, key: str) -> dict | None:
    return json.loads(storage.get_bytes(key)) if storage.exists(key) else None


def _names_under(keys: list[str], prefix: str) -> list[str]:
    """Immediate child folder names under `prefix/` among `keys`."""
    start = len(prefix) + 1
    return sorted({k[start:].split("/", 1)[0] for k in keys if k.startswith(prefix + "/") and "/" in k[start:]})


def planned_units(config: dict) -> dict | None:
    """The generate plan implied by a run's config.yaml (inline prompts only), for runs whose
    rounds predate plan.json: shards of `samples_per_shard` over prompts × samples_per_prompt."""
    generate = config.get("generate", {})
    prompts = generate.get("prompts")
    if isinstance(prompts, str) and Path(prompts).is_file():  # a prompts file, where this machine can read it
        prompts = [line for line in Path(prompts).read_text().splitlines() if line.strip()]
    if not isinstance(prompts, list) or not prompts:
        return None
    samples = len(prompts) * int(generate["samples_per_prompt"])
    return {"units": -(-samples // int(generate["samples_per_shard"])), "samples": samples}


def _generate_state(storage: Storage, keys: set[str], rnd: int, config: dict) -> tuple[StageState, int]:
    prefix = contract.generate_prefix(rnd)
    committed = sum(1 for k in keys if k.startswith(prefix + "/") and k.endswith(".json")
                    and contract.shard_id_of(k) is not None and contract.shard_key_at(prefix, contract.shard_id_of(k)) in keys)
    plan_key = contract.generate_plan_key(rnd)
    plan = _json(storage, plan_key) if plan_key in keys else (planned_units(config) if committed else None)
    if plan is None:
        state = PARTIAL if committed else MISSING
        return StageState("generate", "", state, f"{committed} shards committed, plan unknown"), committed
    state = COMPLETE if committed >= plan["units"] else PARTIAL
    return StageState("generate", "", state, f"{committed}/{plan['units']} shards, {plan['samples']} samples planned",
                      summary=plan), committed


def _named_states(keys: list[str], base: str, stage: str, missing: str, state_of) -> list[StageState]:
    """`state_of(name)` for every output folder under `base` (tables, selections, trainings),
    or one MISSING state when there is none."""
    return [state_of(name) for name in _names_under(keys, base)] or [StageState(stage, "", MISSING, missing)]


def _reward_states(keys: list[str], rnd: int, shards: int, generated: bool) -> list[StageState]:
    base = f"{contract.round_prefix(rnd)}/rewards"

    def state_of(table: str) -> StageState:
        parts = sum(1 for k in keys if k.startswith(f"{base}/{table}/") and contract.part_shard_id(k) is not None)
        return StageState("reward", table, COMPLETE if generated and parts >= shards else PARTIAL, f"{parts}/{shards} parts")

    return _named_states(keys, base, "reward", "no reward table", state_of)


def _filter_states(storage: Storage, keys: list[str], rnd: int) -> list[StageState]:
    def state_of(name: str) -> StageState:
        summary = _json(storage, contract.selection_summary_key(rnd, name))
        if summary is None:
            return StageState("filter", name, PARTIAL, "no summary.json (interrupted): rerun the filter")
        params = " ".join(f"{k}={v}" for k, v in summary["parameters"].items() if k != "seed")
        return StageState("filter", name, COMPLETE, f"{summary['method']} {params}: {summary['rows_accepted']} of "
                          f"{summary['rows_considered']} accepted, implied KL {summary['kl']:.3f}", summary)

    return _named_states(keys, f"{contract.round_prefix(rnd)}/filter", "filter", "no selection", state_of)


def _train_states(storage: Storage, keys: list[str], rnd: int) -> list[StageState]:
    base = f"{contract.round_prefix(rnd)}/train"

    def state_of(name: str) -> StageState:
        summary = _json(storage, contract.train_summary_key(rnd, name))
        card = f"{contract.model_prefix(rnd, name)}/{contract.COMPOSITE_CARD}" in keys
        steps = {int(m.group(1)) for k in keys if k.startswith(f"{base}/{name}/") for m in [_CHECKPOINT_RE.search(k)] if m}
        checkpoints = f"{len(steps)} checkpoint(s)" if steps else "no checkpoint"
        if summary is not None and card:
            return StageState("train", name, COMPLETE, f"{summary['steps']} steps on {summary['samples']} latents "
                              f"from x_{summary['t_step']}; model exported; {checkpoints}", summary)
        what = "model folder without summary" if card else "not exported"
        return StageState("train", name, PARTIAL, f"{checkpoints}, {what}: rerun train to resume")

    return _named_states(keys, base, "train", "not trained", state_of)


def _eval_state(storage: Storage, keys: list[str], rnd: int) -> StageState:
    summary = _json(storage, contract.eval_summary_key(rnd))
    if summary is not None:
        ft = summary["variants"].get("finetuned", {})
        base = summary["variants"].get("base", {})
        detail = (f"reward {base.get('reward_mean', float('nan')):.3f} → {ft.get('reward_mean', float('nan')):.3f} "
                  f"on {summary['samples_per_prompt']} fresh samples per prompt")
        return StageState("evaluate", "", COMPLETE, detail, summary)
    prefix = f"{contract.round_prefix(rnd)}/eval/"
    variants = sorted({k[len(prefix):].split("/", 1)[0] for k in keys if k.startswith(prefix)})
    if variants:
        return StageState("evaluate", "", PARTIAL, f"variants started: {', '.join(variants)}; rerun evaluate")
    return StageState("evaluate", "", MISSING, "not evaluated")


def round_state(storage: Storage, keys: list[str], rnd: int, config: dict) -> RoundState:
    key_set = set(keys)
    pipeline = _json(storage, contract.pipeline_record_key(rnd)) if contract.pipeline_record_key(rnd) in key_set else None
    # Whether this round evaluates: what the round pipeline ran, else the config the run started with.
    evaluates = ("evaluate" in pipeline["stages"] if pipeline is not None
                 else bool(config.get("train", {}).get("eval_samples_per_prompt", 0)))
    generate, shards = _generate_state(storage, key_set, rnd, config)
    state = RoundState(rnd, [generate], evaluates=evaluates)
    state.stages += _reward_states(keys, rnd, shards, generate.state == COMPLETE)
    state.stages += _filter_states(storage, keys, rnd)
    state.stages += _train_states(storage, keys, rnd)
    if evaluates or any(k.startswith(f"{contract.round_prefix(rnd)}/eval/") for k in keys):
        state.stages.append(_eval_state(storage, keys, rnd))
    state.pipeline = pipeline
    return state


def read_run(uri: str) -> RunState:
    """Every round of the run at `uri` (local folder or s3://), or NotARunError in one line."""
    storage = open_storage(uri)
    if not storage.exists(contract.CONFIG_KEY):
        raise NotARunError(f"{storage.uri} is not a pgraft run (no {contract.CONFIG_KEY}); "
                           "give the run.uri of a run that has generated at least once")
    config = yaml.safe_load(storage.get_bytes(contract.CONFIG_KEY)) or {}
    keys = storage.list("")
    rounds = sorted({int(m.group(1)) for k in keys for m in [_ROUND_RE.match(k)] if m})
    states = []
    for rnd in rounds:
        prefix = contract.round_prefix(rnd) + "/"
        round_keys = [k for k in keys if k.startswith(prefix)]
        states.append(round_state(storage, round_keys, rnd, config))
    return RunState(storage.uri, config, states)


def render_status(run: RunState) -> str:
    """A terminal table: one line per round and stage, then the verdict on the last round."""
    rows = [("round", "stage", "name", "state", "detail")]
    for rnd in run.rounds:
        for s in rnd.stages:
            rows.append((str(rnd.round), s.stage, s.name or "-", s.state, s.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"run {run.uri}"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    if not run.rounds:
        lines.append("no round started yet")
    else:
        last = run.rounds[-1]
        verdict = "complete" if last.complete else "incomplete: rerun the stages not complete above (they resume)"
        lines.append(f"last round {last.round}: {verdict}")
    return "\n".join(lines)


def rounds_table(run: RunState) -> list[dict]:
    """One row per round: samples, the trained selection's accepted count and implied KL, and
    the evaluation (base → fine-tuned mean reward ± s.e., Fréchet distance, diversity)."""
    rows = []
    for st in run.rounds:
        generate = st.of("generate")[0].summary or {}
        trained = next((s.summary for s in st.of("train") if s.state == COMPLETE), None)
        selections = {s.name: s.summary for s in st.of("filter") if s.state == COMPLETE}
        selection = selections.get(trained["selection"]) if trained else next(iter(selections.values()), None)
        evaluation = next((s.summary for s in st.of("evaluate") if s.state == COMPLETE), None)
        row = {"round": st.round, "complete": st.complete, "samples": generate.get("samples"),
               "accepted": selection["rows_accepted"] if selection else None,
               "kl": selection["kl"] if selection else None}
        for variant in ("base", "finetuned"):
            v = (evaluation or {}).get("variants", {}).get(variant, {})
            for key in ("reward_mean", "reward_stderr", "frechet_distance", "diversity"):
                row[f"{variant}_{key}"] = v.get(key)
        rows.append(row)
    return rows


def render_rounds_table(run: RunState) -> str:
    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    header = ("round", "samples", "accepted", "implied KL", "mean reward base → fine-tuned (± s.e.)",
              "Fréchet distance base → fine-tuned", "diversity base → fine-tuned")
    rows = [header]
    for r in rounds_table(run):
        rows.append((f"{r['round']}" + ("" if r["complete"] else " (incomplete)"), num(r["samples"], "d"),
                     num(r["accepted"], "d"), num(r["kl"], ".3f"),
                     f"{num(r['base_reward_mean'], '.3f')} ± {num(r['base_reward_stderr'], '.3f')} → "
                     f"{num(r['finetuned_reward_mean'], '.3f')} ± {num(r['finetuned_reward_stderr'], '.3f')}",
                     f"{num(r['base_frechet_distance'], '.1f')} → {num(r['finetuned_frechet_distance'], '.1f')}",
                     f"{num(r['base_diversity'], '.2f')} → {num(r['finetuned_diversity'], '.2f')}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
