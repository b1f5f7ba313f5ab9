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
from pgraft.artifacts import COMPLETE, MISSING, PARTIAL, Evaluation, RewardTable, Selection, Shards, State, Training
from pgraft.errors import PgraftError
from pgraft.storage import Storage, open_storage

__all__ = ["COMPLETE", "MISSING", "PARTIAL", "RoundState", "RunState", "StageState", "read_run", "render_status"]
_ROUND_RE = re.compile(r"^round-(\d{3})/")


class NotARunError(PgraftError):
    """The location holds no pgraft run (no config.yaml, no round folder)."""


# A stage's state in a round is its artifact's (pgraft.artifacts): kind (and so stage), name, state, detail, summary.
StageState = State


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


def _named_states(names: list[str], kind: str, missing: str, state_of) -> list[StageState]:
    """`state_of(name)` for every output of a kind (tables, selections, trainings), or one MISSING
    state when there is none."""
    return [state_of(name) for name in names] or [State(kind, "", MISSING, missing)]


def round_state(storage: Storage, keys: list[str], rnd: int, config: dict) -> RoundState:
    key_set = set(keys)
    record_key = contract.pipeline_record_key(rnd)
    pipeline = json.loads(storage.get_bytes(record_key)) if record_key in key_set else None
    # Whether this round evaluates: what the round pipeline ran, else the config the run started with.
    evaluates = ("evaluate" in pipeline["stages"] if pipeline is not None
                 else bool(config.get("train", {}).get("eval_samples_per_prompt", 0)))
    generate = Shards(rnd).state(storage, key_set, planned_units(config))
    shards = Shards(rnd).committed_count(key_set)
    state = RoundState(rnd, [generate], evaluates=evaluates)
    state.stages += _named_states(RewardTable.names(keys, rnd), "rewards", "no reward table",
                                  lambda table: RewardTable(rnd, table).state(key_set, shards, generate.state == COMPLETE))
    state.stages += _named_states(Selection.names(keys, rnd), "selection", "no selection",
                                  lambda name: Selection(rnd, name).state(storage, key_set))
    state.stages += _named_states(Training.names(keys, rnd), "training", "not trained",
                                  lambda name: Training(rnd, name).state(storage, key_set))
    evaluation = Evaluation(rnd)
    if evaluates or any(k.startswith(evaluation.prefix + "/") for k in keys):
        state.stages.append(evaluation.state(storage, key_set))
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
