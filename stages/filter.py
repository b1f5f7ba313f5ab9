"""Filter stage: a GRS selection over a round's reward table (docs/DESIGN.md §3).

Reads only the reward parts; writes `filter/<name>/accepted.parquet`, then `summary.json`
(its commit marker) with the resolved parameters, the implied KL and per-prompt counts.
Rerunning with new parameters under a new name adds a selection beside the old ones in
seconds, without touching shards or reward parts.

    pgraft filter --config C --set filter.name=thr07 --set filter.method=threshold --set filter.threshold=0.7
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pgraft import contract
from pgraft.config import Config
from pgraft.errors import PgraftError
from pgraft.selection import (
    Resolved,
    RowSelection,
    SelectionError,
    add_threshold_ratio,
    hash_codes,
    implied_kl,
    resolve,
    select_rows,
)
from pgraft.shards import list_committed
from pgraft.storage import Storage, open_storage
from pgraft.tables import (
    arrow_schema,
    fingerprint_parts,
    list_reward_parts,
    read_parquet,
    read_reward_table,
    write_parquet,
)

# Columns the Ray Data engine reads (the local engine reads fewer).
_READ_COLUMNS = ["key", "shard", "prompt_id", "sample_idx", "reward", "sample_hash"]


class FilterError(PgraftError):
    """The selection cannot be made or would clash with an existing one; says what to do."""


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
            f"  written to  {self.location}/ in {self.seconds:.2f} s",
        ]
        return "\n".join(lines + [f"  note        {n}" for n in self.notes])


def _reward_parts(storage: Storage, cfg: Config, allow_partial: bool) -> list[str]:
    rnd, table = cfg.run.round, cfg.reward.table_name()
    committed = list_committed(storage, rnd)
    parts = list_reward_parts(storage, rnd, table)
    if not parts:
        raise FilterError(f"no reward table {table!r} in round {rnd} of {storage.uri}; run `pgraft reward` first")
    missing = sorted(set(committed) - set(parts))
    if missing and not allow_partial:
        shown = ", ".join(contract.shard_name(s) for s in missing[:10]) + (" …" if len(missing) > 10 else "")
        raise FilterError(f"reward table {table!r} lacks parts for {len(missing)} committed shard(s): {shown}; "
                          "rerun `pgraft reward` or pass --allow-partial")
    return [parts[s] for s in sorted(parts)]


def _check_existing(storage: Storage, cfg: Config, name: str, force: bool) -> dict | None:
    """The stored summary when this selection exists with the same spec; refuse a different one."""
    key = contract.selection_summary_key(cfg.run.round, name)
    if force or not storage.exists(key):
        return None  # --force always recomputes
    old = json.loads(storage.get_bytes(key))
    # The engine is not part of a selection's identity: both give the same accepted set.
    mine = {"spec": cfg.filter.model_dump(mode="json", exclude={"engine"}), "reward_table": cfg.reward.table_name(),
            "seed": cfg.run.seed}
    theirs = {"spec": {k: v for k, v in (old.get("spec") or {}).items() if k != "engine"},
              "reward_table": old.get("reward_table"), "seed": old.get("source", {}).get("seed")}
    if mine == theirs:
        return old
    changed = sorted(k for k in set(mine["spec"]) | set(theirs["spec"]) if mine["spec"].get(k) != theirs["spec"].get(k))
    raise FilterError(f"selection {name!r} exists with other parameters "
                      f"({', '.join('filter.' + c for c in changed) or 'reward table/seed'}); "
                      "choose another filter.name or pass --force to replace it")


def _nonfinite(rewards: np.ndarray, keys, cfg: Config) -> np.ndarray:
    bad = ~np.isfinite(rewards)
    if bad.any() and cfg.filter.nan_policy == "error":
        idx = np.flatnonzero(bad)
        shown = ", ".join(str(keys[i]) for i in idx[:5]) + (" …" if len(idx) > 5 else "")
        raise FilterError(f"{len(idx)} reward(s) are NaN or infinite ({shown}); fix the reward, or set "
                          "filter.nan_policy=drop to leave them out")
    return bad


def _select_local(storage, parts, cfg, seed):
    """One process. Reads only the numeric columns (and sample_hash for dedup): `key` and
    `shard` of the accepted rows follow from (prompt_id, sample_idx) and the part's shard."""
    columns = ["prompt_id", "sample_idx", "reward"] + (["sample_hash"] if cfg.filter.dedup else [])
    source = read_reward_table(storage, parts, columns=columns, with_part_ids=True)
    table = source.table
    rewards = table["reward"].to_numpy()
    prompt_id, sample_idx = table["prompt_id"].to_numpy(), table["sample_idx"].to_numpy()
    bad = _nonfinite(rewards, _LazyKeys(prompt_id, sample_idx), cfg)
    if bad.any():
        table = table.filter(pa.array(~bad))
        rewards, prompt_id, sample_idx = rewards[~bad], prompt_id[~bad], sample_idx[~bad]
    if table.num_rows == 0:
        raise FilterError("the reward table has no usable rows")
    sizes = _prompt_sizes(prompt_id)
    res = resolve(cfg.filter, rewards, sizes, seed)
    codes = hash_codes(table["sample_hash"]) if res.dedup else None
    chosen = select_rows(prompt_id, sample_idx, rewards, codes, res)
    idx = chosen.index
    part_ids = table["_part"].to_numpy()[idx]
    accepted = pa.table({
        "key": [contract.sample_key(int(p), int(s)) for p, s in zip(prompt_id[idx], sample_idx[idx])],
        "shard": [f"{contract.shard_name(int(sid))}.tar" for sid in part_ids],
        "prompt_id": prompt_id[idx], "sample_idx": sample_idx[idx], "reward": rewards[idx],
    })
    return res, chosen, accepted, rewards, sizes, int(bad.sum()), source.fingerprint


class _LazyKeys:
    """Sample keys computed only for the rows an error message shows."""

    def __init__(self, prompt_id, sample_idx):
        self.prompt_id, self.sample_idx = prompt_id, sample_idx

    def __getitem__(self, i):
        return contract.sample_key(int(self.prompt_id[i]), int(self.sample_idx[i]))


def _prompt_sizes(prompt_id: np.ndarray) -> np.ndarray:
    counts = np.bincount(prompt_id) if prompt_id.min() >= 0 and prompt_id.max() < 50_000_000 else \
        np.unique(prompt_id, return_counts=True)[1]
    return counts[counts > 0]


def _select_ray_data(storage, parts, cfg, seed):
    """The same rule through Ray Data: rewards are gathered for the global parameters, rows
    are selected per prompt group with `select_rows`, accepted rows come back to the driver."""
    import ray

    import cluster

    cluster.connect()
    locations = [storage.arrow_location(part) for part in parts]
    ds = ray.data.read_parquet([path for _, path in locations], filesystem=locations[0][0], columns=_READ_COLUMNS)
    slim = ds.select_columns(["prompt_id", "sample_idx", "reward"]).to_pandas()  # 24 bytes a row on the driver
    bad = _nonfinite(slim["reward"].to_numpy(), _LazyKeys(slim["prompt_id"].to_numpy(), slim["sample_idx"].to_numpy()), cfg)
    if bad.any():
        ds = ds.filter(lambda row: math.isfinite(row["reward"]))
    rewards = slim["reward"].to_numpy()[~bad]
    sizes = _prompt_sizes(slim["prompt_id"].to_numpy()[~bad])
    res = resolve(cfg.filter, rewards, sizes, seed)

    def per_prompt(batch: dict) -> dict:
        codes = hash_codes(pa.array(batch["sample_hash"])) if res.dedup else None
        chosen = select_rows(batch["prompt_id"], batch["sample_idx"], batch["reward"], codes, res)
        out = {name: batch[name][chosen.index] for name in ("key", "shard", "prompt_id", "sample_idx", "reward")}
        out["reshaped_reward"] = chosen.reshaped_reward
        out["rank_in_prompt"] = chosen.rank_in_prompt
        return out

    partitions = max(2, min(64, len(parts)))  # Ray's default (200) is far too many for small tables
    result = ds.groupby("prompt_id", num_partitions=partitions).map_groups(per_prompt, batch_format="numpy").to_pandas()
    considered = (int(ds.groupby(["prompt_id", "sample_hash"], num_partitions=partitions).count().count())
                  if res.dedup else len(rewards))
    counts = result.groupby("prompt_id").size()
    chosen = RowSelection(index=np.arange(len(result)), reshaped_reward=result["reshaped_reward"].to_numpy(),
                          rank_in_prompt=result["rank_in_prompt"].to_numpy(), rows_considered=considered,
                          per_prompt={int(k): int(v) for k, v in counts.items()})
    accepted = pa.Table.from_pandas(result[["key", "shard", "prompt_id", "sample_idx", "reward"]], preserve_index=False)
    return res, chosen, accepted, rewards, sizes, int(bad.sum()), fingerprint_parts(storage, parts)


ENGINES = {"local": _select_local, "ray": _select_ray_data}


def run_filter(cfg: Config, progress: bool = True, force: bool = False, allow_partial: bool = False) -> FilterSummary:
    start = time.perf_counter()
    storage = open_storage(cfg.run.uri)
    rnd, name = cfg.run.round, cfg.filter.selection_name()
    location = storage.url(contract.filter_prefix(rnd, name))
    existing = _check_existing(storage, cfg, name, force)
    parts = _reward_parts(storage, cfg, allow_partial)
    if existing is not None and existing["source"]["fingerprint"] == fingerprint_parts(storage, parts):
        summary = FilterSummary(**{k: v for k, v in existing.items() if k in FilterSummary.__dataclass_fields__})
        summary.reused, summary.location = True, location
        return summary

    try:
        res, chosen, accepted, rewards, sizes, dropped, fingerprint = ENGINES[cfg.filter.engine](storage, parts, cfg, cfg.run.seed)
    except SelectionError as exc:
        raise FilterError(str(exc)) from None
    rows_in = len(rewards)
    rate = len(chosen.index) / chosen.rows_considered if chosen.rows_considered else 0.0
    if len(chosen.index) == 0:
        raise FilterError(
            f"selection {name!r} accepted 0 of {chosen.rows_considered} rows (acceptance rate 0); rewards range "
            f"{rewards.min():.4g}..{rewards.max():.4g}: loosen {_knob(res)} or set filter.kl_budget"
        )
    reshaped = add_threshold_ratio(res, chosen.reshaped_reward, rate)
    accepted = accepted.append_column("reshaped_reward", pa.array(reshaped, pa.float64()))
    accepted = accepted.append_column("rank_in_prompt", pa.array(chosen.rank_in_prompt, pa.int64()))
    order = pc.sort_indices(accepted, sort_keys=[("prompt_id", "ascending"), ("rank_in_prompt", "ascending")])
    accepted = accepted.take(order).cast(arrow_schema(contract.ACCEPTED_COLUMNS))

    kl = implied_kl(res, chosen.rows_considered, len(chosen.index), rewards, sizes)
    notes = []
    if res.method in ("best_of_n", "top_k") and (res.n or res.m):
        group = res.n or res.m
        if np.any(sizes % group):
            notes.append(f"prompts whose sample count is not a multiple of {group} leave their last partial group out")
    summary = FilterSummary(
        name=name, method=res.method, round=rnd, reward_table=cfg.reward.table_name(), parameters=res.parameters(),
        spec=cfg.filter.model_dump(mode="json"), rows_in=rows_in, rows_dropped_nonfinite=dropped,
        rows_considered=chosen.rows_considered, rows_accepted=len(chosen.index), acceptance_rate=rate,
        per_prompt_accepted={str(k): v for k, v in sorted(chosen.per_prompt.items())},
        source={"reward_table": cfg.reward.table_name(), "parts": len(parts), "fingerprint": fingerprint,
                "seed": cfg.run.seed},
        engine=cfg.filter.engine, location=location, notes=notes, **kl,
    )
    write_parquet(storage, contract.accepted_key(rnd, name), accepted)
    summary.seconds = time.perf_counter() - start
    storage.put_bytes(contract.selection_summary_key(rnd, name), json.dumps(asdict(summary), indent=1).encode())
    return summary


def _knob(res: Resolved) -> str:
    return {"threshold": f"filter.threshold (now {res.threshold})", "quantile": "filter.quantile",
            "rejection": f"filter.alpha (now {res.alpha}) or filter.r_max", "best_of_n": "filter.n",
            "top_k": "filter.k"}[res.method]


def read_accepted(storage: Storage, round_idx: int, name: str) -> pa.Table:
    """The accepted table of a selection, checked to exist (for the train stage)."""
    if not storage.exists(contract.selection_summary_key(round_idx, name)):
        raise FilterError(f"selection {name!r} does not exist in round {round_idx} of {storage.uri}; run `pgraft filter`")
    return read_parquet(storage, contract.accepted_key(round_idx, name))


def main(argv: list[str] | None = None) -> int:
    from pgraft.cli import run_stage

    return run_stage("filter", argv)


if __name__ == "__main__":
    sys.exit(main())
