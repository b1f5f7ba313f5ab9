"""Filter stage: a GRS selection over a round's reward table (docs/DESIGN.md §3).

Reads only the reward parts; writes `filter/<name>/accepted/part-*.parquet`, then
`summary.json` (its commit marker) with the resolved parameters, the implied KL, per-prompt
counts and the parts written. Rerunning with new parameters under a new name adds a
selection beside the old ones in seconds, without touching shards or reward parts.

    pgraft filter --config C --set filter.name=thr07 --set filter.method=threshold --set filter.threshold=0.7
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from pgraft import contract
from pgraft.config import Config, FilterSection, identity_of
from pgraft.selection import Resolved, SelectionError, implied_kl
from pgraft.storage import Storage, open_storage
from pgraft.tables import fingerprint_parts
from pgraft.stagespec import Flag, StageSpec, stage_main
from stages.filter.errors import FilterError
from stages.filter.inputs import reward_parts
from stages.filter.output import AcceptedOutput



@dataclass
class FilterSummary:
    name: str
    method: str
    round: int
    reward_table: str
    parameters: dict
    spec: dict
    rows_in: int
    rows_dropped_nonfinite: int
    rows_considered: int  # after dedup
    rows_accepted: int
    acceptance_rate: float
    kl: float
    kl_formula: str
    kl_empirical: float
    per_prompt_accepted: dict[str, int]
    source: dict
    engine: str
    seconds: float = 0.0
    reused: bool = False
    location: str = ""
    notes: list[str] = field(default_factory=list)
    accepted_parts: list[str] = field(default_factory=list)  # under accepted/; empty: the older accepted.parquet
    nodes: list[str] = field(default_factory=list)  # Ray nodes that selected and wrote (Ray engine; local: none)

    def headline(self) -> str:
        return (f"filter round {self.round}: selection {self.name} accepted {self.rows_accepted} of {self.rows_considered} "
                f"({self.acceptance_rate:.1%}), implied KL {self.kl:.3f} nats" + (", reused" if self.reused else ""))

    def render(self) -> str:
        counts = list(self.per_prompt_accepted.values())
        lines = [
            f"filter: selection {self.name!r} ({self.method}) on {self.reward_table}, round {self.round}"
            + (" — already made with these parameters, reused" if self.reused else ""),
            f"  parameters  {json.dumps(self.parameters)}",
            f"  rows        {self.rows_in} in, {self.rows_considered} considered, {self.rows_accepted} accepted "
            f"({self.acceptance_rate:.2%})",
            f"  implied KL  {self.kl:.4f} nats ({self.kl_formula}); plug-in {self.kl_empirical:.4f}",
            f"  per prompt  {min(counts)}–{max(counts)} accepted over {len(counts)} prompts",
            f"  written to  {self.location}/ in {self.seconds:.2f} s ({self.engine} engine)",
        ]
        return "\n".join(lines + [f"  note        {n}" for n in self.notes])


def _identity(spec: dict) -> dict:
    """A stored filter spec less the fields marked as not changing which rows are accepted
    (engine, partitions, the selection's own name); unknown keys of older specs are kept."""
    fields = FilterSection.model_fields
    return {k: v for k, v in (spec or {}).items() if k not in fields or identity_of(fields[k]) != "how"}


def _check_existing(storage: Storage, cfg: Config, name: str, force: bool) -> dict | None:
    """The stored summary when this selection exists with the same spec; refuse a different one."""
    key = contract.selection_summary_key(cfg.run.round, name)
    if force or not storage.exists(key):
        return None  # --force always recomputes
    old = json.loads(storage.get_bytes(key))
    # How a selection was computed is not part of its identity: every engine accepts the same rows.
    mine = {"spec": _identity(cfg.filter.model_dump(mode="json")), "reward_table": cfg.reward.table_name(),
            "seed": cfg.run.seed}
    theirs = {"spec": _identity(old.get("spec")), "reward_table": old.get("reward_table"),
              "seed": old.get("source", {}).get("seed")}
    if mine == theirs:
        return old
    changed = sorted(k for k in set(mine["spec"]) | set(theirs["spec"]) if mine["spec"].get(k) != theirs["spec"].get(k))
    raise FilterError(f"selection {name!r} exists with other parameters "
                      f"({', '.join('filter.' + c for c in changed) or 'reward table/seed'}); "
                      "choose another filter.name or pass --force to replace it")


def _engine(name: str):
    """The engine's select function (imported on use: the Ray engine pulls in Ray)."""
    if name == "ray":
        from stages.filter.ray_engine import select_ray

        return select_ray
    from stages.filter.local import select_local

    return select_local


def run_filter(cfg: Config, progress: bool = True, force: bool = False, allow_partial: bool = False) -> FilterSummary:
    start = time.perf_counter()
    storage = open_storage(cfg.run.uri)
    rnd, name = cfg.run.round, cfg.filter.selection_name()
    location = storage.url(contract.filter_prefix(rnd, name))
    existing = _check_existing(storage, cfg, name, force)
    parts = reward_parts(storage, cfg, allow_partial)
    if existing is not None and existing["source"]["fingerprint"] == fingerprint_parts(storage, parts):
        summary = FilterSummary(**{k: v for k, v in existing.items() if k in FilterSummary.__dataclass_fields__})
        summary.reused, summary.location = True, location
        return summary

    output = AcceptedOutput(storage, rnd, name)
    try:
        got = _engine(cfg.filter.engine)(storage, parts, cfg, cfg.run.seed, output)
    except SelectionError as exc:
        output.discard()
        raise FilterError(str(exc)) from None
    except BaseException:
        output.discard()  # parts some partitions wrote before another failed
        raise
    res, stats = got.res, got.stats
    if got.accepted == 0:
        raise FilterError(
            f"selection {name!r} accepted 0 of {got.considered} rows (acceptance rate 0); rewards range "
            f"{stats.low:.4g}..{stats.high:.4g}: loosen {_knob(res)} or set filter.kl_budget"
        )
    rate = got.accepted / got.considered
    kl = implied_kl(res, got.considered, got.accepted, stats)
    notes = []
    if res.method in ("best_of_n", "top_k") and (res.n or res.m):
        group = res.n or res.m
        if any(size % group for size in stats.size_counts):
            notes.append(f"prompts whose sample count is not a multiple of {group} leave their last partial group out")
    summary = FilterSummary(
        name=name, method=res.method, round=rnd, reward_table=cfg.reward.table_name(), parameters=res.parameters(),
        spec=cfg.filter.model_dump(mode="json"), rows_in=got.rows_in, rows_dropped_nonfinite=got.dropped,
        rows_considered=got.considered, rows_accepted=got.accepted, acceptance_rate=rate,
        per_prompt_accepted={str(k): v for k, v in sorted(got.per_prompt.items())},
        source={"reward_table": cfg.reward.table_name(), "parts": len(parts), "fingerprint": got.fingerprint,
                "seed": cfg.run.seed},
        engine=cfg.filter.engine, location=location, notes=notes, accepted_parts=got.accepted_parts, nodes=got.nodes,
        **kl,
    )
    summary.seconds = time.perf_counter() - start
    storage.put_bytes(contract.selection_summary_key(rnd, name), json.dumps(asdict(summary), indent=1).encode())
    output.remove_stale(got.accepted_parts)
    return summary


def _knob(res: Resolved) -> str:
    return {"threshold": f"filter.threshold (now {res.threshold})", "quantile": "filter.quantile",
            "rejection": f"filter.alpha (now {res.alpha}) or filter.r_max", "best_of_n": "filter.n",
            "top_k": "filter.k"}[res.method]


STAGE = StageSpec(
    name="filter", run=run_filter, description="select rows of a reward table (GRS: threshold, best-of-N, top-K, rejection, quantile, dedup)",
    reads=("rewards",), writes=("selection",),
    flags=(Flag("--force", "force", "replace an existing selection of the same name made with other parameters"),
           Flag("--allow-partial", "allow_partial", "select from the reward parts that exist even if some shards lack one")),
)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)
