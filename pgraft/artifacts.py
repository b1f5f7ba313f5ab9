"""Artifacts: one class per kind of stage output, owning where it lives in a run, what marks it
complete, its summary type and its state (docs/DESIGN.md §8).

The layout functions of `pgraft.contract` name the keys; an artifact groups those of one output
(a round's shards, a reward table, a selection, a training, an evaluation, an inversion, a
corrector) and answers "what is there?" from storage alone. `pgraft status` and `pgraft report`
ask artifacts (pgraft/runs.py), and each stage declares the kinds it reads and writes
(`StageSpec.reads/writes`, names from `ARTIFACTS`).

Every stage summary follows one protocol (`Summary`): `headline()` (one line for job logs),
`render()` (the stage's printout) and `nodes` (the Ray nodes that did the work).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from pgraft import contract
from pgraft.storage import Storage

COMPLETE, PARTIAL, MISSING = "complete", "partial", "missing"


@runtime_checkable
class Summary(Protocol):
    """What every stage's run function returns."""

    nodes: list[str]

    def headline(self) -> str: ...

    def render(self) -> str: ...


@dataclass
class State:
    """An artifact's state in storage: COMPLETE (its commit marker exists), PARTIAL or MISSING."""

    kind: str  # the artifact kind (ARTIFACTS key)
    name: str  # the table, selection, training, inversion or corrector name ("" where a round has one)
    state: str
    detail: str  # what exists, in words
    summary: dict | None = None  # the artifact's summary (or plan), when there is one

    @property
    def stage(self) -> str:
        """The stage that writes this kind of artifact."""
        return ARTIFACTS[self.kind].stage


def _json(storage: Storage, key: str, keys: set[str] | None = None) -> dict | None:
    present = key in keys if keys is not None else storage.exists(key)
    return json.loads(storage.get_bytes(key)) if present else None


def names_under(keys, prefix: str) -> list[str]:
    """Immediate child folder names under `prefix/` among `keys`."""
    start = len(prefix) + 1
    return sorted({k[start:].split("/", 1)[0] for k in keys if k.startswith(prefix + "/") and "/" in k[start:]})


@dataclass(frozen=True)
class Artifact:
    kind: ClassVar[str]
    stage: ClassVar[str]  # the stage that writes it

    @property
    def prefix(self) -> str:
        raise NotImplementedError

    def location(self, storage: Storage) -> str:
        return storage.url(self.prefix)


@dataclass(frozen=True)
class Shards(Artifact):
    """A round's WebDataset shards (generate), each counted once its commit record exists."""

    kind: ClassVar[str] = "shards"
    stage: ClassVar[str] = "generate"
    round: int

    @property
    def prefix(self) -> str:
        return contract.generate_prefix(self.round)

    @property
    def plan_key(self) -> str:
        return contract.generate_plan_key(self.round)

    def shard_key(self, shard_id: int) -> str:
        return contract.shard_key_at(self.prefix, shard_id)

    def commit_key(self, shard_id: int) -> str:
        return contract.commit_key_at(self.prefix, shard_id)

    def committed_count(self, keys: set[str]) -> int:
        return sum(1 for k in keys if k.startswith(self.prefix + "/") and k.endswith(".json")
                   and (sid := contract.shard_id_of(k)) is not None and self.shard_key(sid) in keys)

    def state(self, storage: Storage, keys: set[str], fallback_plan: dict | None = None) -> State:
        """`fallback_plan`: the plan implied by the run's config, for rounds older than plan.json."""
        committed = self.committed_count(keys)
        plan = _json(storage, self.plan_key, keys) or (fallback_plan if committed else None)
        if plan is None:
            return State(self.kind, "", PARTIAL if committed else MISSING, f"{committed} shards committed, plan unknown")
        state = COMPLETE if committed >= plan["units"] else PARTIAL
        return State(self.kind, "", state, f"{committed}/{plan['units']} shards, {plan['samples']} samples planned",
                     summary={**plan, "committed": committed})


@dataclass(frozen=True)
class RewardTable(Artifact):
    """A round's reward table: one Parquet part per committed shard."""

    kind: ClassVar[str] = "rewards"
    stage: ClassVar[str] = "reward"
    round: int
    table: str

    @property
    def prefix(self) -> str:
        return contract.rewards_prefix(self.round, self.table)

    def part_key(self, shard_id: int) -> str:
        return contract.reward_part_key(self.round, self.table, shard_id)

    def state(self, keys: set[str], shards: int, generated: bool) -> State:
        parts = len(contract.committed_parts(k for k in keys if k.startswith(self.prefix + "/")))
        return State(self.kind, self.table, COMPLETE if generated and parts >= shards else PARTIAL, f"{parts}/{shards} parts")

    @staticmethod
    def names(keys, round_idx: int) -> list[str]:
        return names_under(keys, f"{contract.round_prefix(round_idx)}/rewards")


@dataclass(frozen=True)
class Selection(Artifact):
    """A filter selection: its accepted parts, complete once its summary.json exists."""

    kind: ClassVar[str] = "selection"
    stage: ClassVar[str] = "filter"
    round: int
    name: str

    @property
    def prefix(self) -> str:
        return contract.filter_prefix(self.round, self.name)

    @property
    def summary_key(self) -> str:
        return contract.selection_summary_key(self.round, self.name)

    def state(self, storage: Storage, keys: set[str] | None = None) -> State:
        summary = _json(storage, self.summary_key, keys)
        if summary is None:
            return State(self.kind, self.name, PARTIAL, "no summary.json (interrupted): rerun the filter")
        params = " ".join(f"{k}={v}" for k, v in summary["parameters"].items() if k != "seed")
        return State(self.kind, self.name, COMPLETE, f"{summary['method']} {params}: {summary['rows_accepted']} of "
                     f"{summary['rows_considered']} accepted, implied KL {summary['kl']:.3f}", summary)

    @staticmethod
    def names(keys, round_idx: int) -> list[str]:
        return names_under(keys, f"{contract.round_prefix(round_idx)}/filter")


@dataclass(frozen=True)
class Training(Artifact):
    """A train stage output: checkpoints, the exported model (what the next round samples) and
    summary.json; complete when both the summary and the model's composite card exist."""

    kind: ClassVar[str] = "training"
    stage: ClassVar[str] = "train"
    round: int
    name: str

    @property
    def prefix(self) -> str:
        return contract.train_prefix(self.round, self.name)

    @property
    def model_prefix(self) -> str:
        return contract.model_prefix(self.round, self.name)

    @property
    def summary_key(self) -> str:
        return contract.train_summary_key(self.round, self.name)

    def model_location(self, storage: Storage) -> str:
        return storage.url(self.model_prefix)

    def state(self, storage: Storage, keys: set[str]) -> State:
        summary = _json(storage, self.summary_key, keys)
        card = f"{self.model_prefix}/{contract.COMPOSITE_CARD}" in keys
        steps = {step for k in keys if k.startswith(self.prefix + "/") for step in [contract.checkpoint_step(k)]
                 if step is not None}
        checkpoints = f"{len(steps)} checkpoint(s)" if steps else "no checkpoint"
        if summary is not None and card:
            return State(self.kind, self.name, COMPLETE, f"{summary['steps']} steps on {summary['samples']} latents "
                         f"from x_{summary['t_step']}; model exported; {checkpoints}", summary)
        what = "model folder without summary" if card else "not exported"
        return State(self.kind, self.name, PARTIAL, f"{checkpoints}, {what}: rerun train to resume")

    @staticmethod
    def names(keys, round_idx: int) -> list[str]:
        return names_under(keys, f"{contract.round_prefix(round_idx)}/train")


@dataclass(frozen=True)
class EvalVariant(Artifact):
    """One evaluation variant (base, finetuned) of a round: a one-round run of its own."""

    kind: ClassVar[str] = "evaluation variant"
    stage: ClassVar[str] = "evaluate"
    round: int
    variant: str

    @property
    def prefix(self) -> str:
        return contract.eval_prefix(self.round, self.variant)

    @property
    def summary_key(self) -> str:
        return f"{self.prefix}/summary.json"

    @property
    def model_key(self) -> str:
        """Which model (location and weights digest) the variant's samples come from."""
        return f"{self.prefix}/model.json"


@dataclass(frozen=True)
class Evaluation(Artifact):
    """A round's evaluation: its variants, complete once round-NNN/eval/summary.json exists."""

    kind: ClassVar[str] = "evaluation"
    stage: ClassVar[str] = "evaluate"
    round: int

    @property
    def prefix(self) -> str:
        return f"{contract.round_prefix(self.round)}/eval"

    @property
    def summary_key(self) -> str:
        return contract.eval_summary_key(self.round)

    def variant(self, name: str) -> EvalVariant:
        return EvalVariant(self.round, name)

    def state(self, storage: Storage, keys: set[str]) -> State:
        summary = _json(storage, self.summary_key, keys)
        if summary is not None:
            ft, base = summary["variants"].get("finetuned", {}), summary["variants"].get("base", {})
            detail = (f"reward {base.get('reward_mean', float('nan')):.3f} → {ft.get('reward_mean', float('nan')):.3f} "
                      f"on {summary['samples_per_prompt']} fresh samples per prompt")
            return State(self.kind, "", COMPLETE, detail, summary)
        variants = names_under(keys, self.prefix)
        if variants:
            return State(self.kind, "", PARTIAL, f"variants started: {', '.join(variants)}; rerun evaluate")
        return State(self.kind, "", MISSING, "not evaluated")


@dataclass(frozen=True)
class Inversion(Artifact):
    """An inversion of a data set (invert): shards of (x_0, x_T) records, a table, settings, summary."""

    kind: ClassVar[str] = "inversion"
    stage: ClassVar[str] = "invert"
    name: str

    @property
    def prefix(self) -> str:
        return contract.inversion_prefix(self.name)

    @property
    def shards_prefix(self) -> str:
        return contract.inversion_shards_prefix(self.name)

    @property
    def settings_key(self) -> str:
        return contract.inversion_settings_key(self.name)

    @property
    def summary_key(self) -> str:
        return contract.inversion_summary_key(self.name)

    def part_key(self, shard_id: int) -> str:
        return contract.inversion_part_key(self.name, shard_id)


@dataclass(frozen=True)
class Corrector(Artifact):
    """A noise corrector (train-corrector): checkpoints (flow kind), model/ and summary.json."""

    kind: ClassVar[str] = "corrector"
    stage: ClassVar[str] = "train-corrector"
    name: str

    @property
    def prefix(self) -> str:
        return contract.corrector_prefix(self.name)

    @property
    def model_prefix(self) -> str:
        return contract.corrector_model_prefix(self.name)

    @property
    def summary_key(self) -> str:
        return contract.corrector_summary_key(self.name)


# Artifact kinds by the names stages declare in StageSpec.reads / writes ("task": the task's
# models under task.dir, published by its pretraining, not a run artifact).
ARTIFACTS: dict[str, type[Artifact]] = {cls.kind: cls for cls in
                                        (Shards, RewardTable, Selection, Training, Evaluation, Inversion, Corrector)}
