"""Reward work: the worker that scores one committed shard into one Parquet part, the
reward's configuration checks, and the tally of a run. The reward stage and the evaluate
stage's variants drive these.

A part is written whole or not at all, and parts that exist are skipped, so a rerun
finishes an interrupted run; the shards are only read (decoded samples and JSON, no latents).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pgraft import contract
from pgraft.config import Config, ConfigError
from pgraft.contract import CommitRecord
from pgraft.errors import PgraftError
from pgraft.hashing import get_hash
from pgraft.models.fetch import child, fetch_model, is_remote, model_file_exists
from pgraft.shards import DECODED, list_committed, read_shard
from pgraft.storage import open_storage
from pgraft.tables import arrow_schema, commit_reward_part, scored_parts
from pgraft.work.spec import Finished, WorkerSpec


class RewardError(PgraftError):
    """A reward function failed or returned something unusable; names the shard and key."""


@dataclass
class RewardSummary:
    run_uri: str
    round: int
    table: str
    shards: int
    skipped: int
    written: int
    rows_written: int
    seconds: float
    reward_mean: float | None
    table_prefix: str
    nodes: list[str] = field(default_factory=list)  # Ray node ids the parts were scored on
    torn: int = 0  # scored parts whose bytes no longer matched their record: moved aside and redone now

    def headline(self) -> str:
        mean = "n/a" if self.reward_mean is None else f"{self.reward_mean:.4f}"
        torn = f", {self.torn} torn ones redone" if self.torn else ""
        return (f"reward round {self.round}: table {self.table}, {self.shards} parts ({self.written} written now{torn}), "
                f"{self.rows_written} rows scored in {self.seconds:.1f} s, mean reward of new rows {mean}")

    def render(self) -> str:
        mean = "n/a" if self.reward_mean is None else f"{self.reward_mean:.4f}"
        return "\n".join([
            f"reward: {self.table} for round {self.round} of {self.run_uri}",
            f"  parts    {self.shards} shards, {self.skipped} already scored, {self.written} written now"
            + (f" ({self.torn} torn: moved aside under torn/ and redone)" if self.torn else ""),
            f"  rows     {self.rows_written} scored in {self.seconds:.1f} s; mean reward of new rows {mean}",
            f"  table at {self.table_prefix}/ (read it with DuckDB: SELECT * FROM '{self.table_prefix}/*.parquet')",
        ])


def reward_model_path(cfg: Config) -> str | None:
    """The reward's weights as configured (a path, storage URI or hub id); a reward that the
    task brings defaults to the task's weights for it (its RewardWeights folder under task.dir)."""
    if cfg.reward.model_path:
        return cfg.reward.model_path
    spec = cfg.task.spec()
    if spec is not None and cfg.reward.name in spec.reward_weights:
        return child(cfg.task.dir, spec.reward_weights[cfg.reward.name].folder)
    return None


class RewardWorker:
    """One per actor: builds the reward once, then scores shards into Parquet parts; a unit is
    (shard id, its commit record's fields). (Without Ray: `RewardWorker(cfg_tree)((sid, vars(record)))`.)"""

    def __init__(self, cfg_tree: dict):
        from pgraft.models.adapters import resolve_device
        from pgraft.rewards import make_reward

        self.cfg = Config.model_validate(cfg_tree)
        self.storage = open_storage(self.cfg.run.uri)
        self.table = self.cfg.reward.table_name()
        weights = reward_model_path(self.cfg)
        weights = fetch_model(weights) if weights and is_remote(weights) else weights  # this node's copy
        self.reward_fn = make_reward(self.cfg.reward.name, weights,
                                     resolve_device(self.cfg.reward.device), dict(self.cfg.reward.options))
        self.sample_hash = get_hash(self.cfg.reward.hash)

    def _score(self, images, prompts, metadata, keys, shard):
        from pgraft.rewards import as_output

        try:
            return as_output(self.reward_fn(images, prompts, metadata), len(images))
        except Exception as batch_exc:  # noqa: BLE001 - find the sample, then report it
            for i in range(len(images)):
                try:
                    as_output(self.reward_fn(images[i:i + 1], prompts[i:i + 1], metadata[i:i + 1]), 1)
                except Exception as exc:  # noqa: BLE001
                    raise RewardError(f"reward {self.cfg.reward.name} failed on {shard}, sample {keys[i]}: "
                                      f"{exc.__class__.__name__}: {exc}; nothing was written for this shard") from None
            raise RewardError(f"reward {self.cfg.reward.name} failed on {shard} (batch of {len(images)} from "
                              f"{keys[0]}): {batch_exc.__class__.__name__}: {batch_exc}") from None

    def __call__(self, job: tuple[int, dict]) -> dict:
        shard_id, record_fields = job
        cfg, rnd = self.cfg, self.cfg.run.round
        record = CommitRecord(**record_fields)
        samples = read_shard(self.storage, rnd, shard_id, record, wanted=DECODED)
        shard = record.shard
        rewards, extra = [], {}
        for lo in range(0, len(samples), cfg.reward.batch_size):
            batch = samples[lo:lo + cfg.reward.batch_size]
            out = self._score([s.decoded for s in batch], [s.meta.prompt for s in batch],
                              [vars(s.meta) for s in batch], [s.key for s in batch], shard)
            rewards.append(out.rewards)
            for name, column in out.columns.items():
                if name in contract.REWARD_COLUMNS:
                    raise RewardError(f"reward {cfg.reward.name} returns column {name!r}, a reserved reward-table column")
                extra.setdefault(name, []).append(np.asarray(column))
        metas = [s.meta for s in samples]
        columns = {
            "key": [m.key for m in metas], "shard": [shard] * len(metas), "round": [rnd] * len(metas),
            "prompt_id": [m.prompt_id for m in metas], "prompt": [m.prompt for m in metas],
            "sample_idx": [m.sample_idx for m in metas], "seed": [m.seed for m in metas],
            "reward": np.concatenate(rewards) if rewards else np.zeros(0), "reward_name": [cfg.reward.name] * len(metas),
            "sample_hash": [self.sample_hash(s.decoded, vars(s.meta)) for s in samples],
        }
        table = pa.table(columns, schema=arrow_schema(contract.REWARD_COLUMNS))
        for name, parts in extra.items():
            table = table.append_column(name, pa.array(np.concatenate(parts)))
        commit_reward_part(self.storage, contract.reward_part_key(rnd, self.table, shard_id), table)
        finite = table["reward"].to_numpy()
        finite = finite[np.isfinite(finite)]
        return {"rows": table.num_rows, "reward_sum": float(finite.sum()), "finite": int(len(finite))}


def check_reward_config(cfg: Config) -> None:
    """Cheap checks before any actor starts: the reward exists, its weights are where named."""
    from pgraft.rewards import reward_factory

    name = cfg.reward.name
    factory = reward_factory(name)
    get_hash(cfg.reward.hash)
    path = reward_model_path(cfg)
    spec = cfg.task.spec()
    weights = spec.reward_weights.get(name) if spec is not None else None
    if weights is not None and not model_file_exists(path, weights.marker):
        raise ConfigError(f"config error: reward.model_path: no {name} weights ({weights.marker}) at {path!r} "
                          f"(publish them there, e.g. `pgraft pretrain {spec.name} --out DIR` for a task that trains "
                          "them, or set reward.model_path)")
    check_weights = getattr(factory, "check_weights", None)  # a reward's own cheap check of its weights
    if check_weights is not None:
        check_weights(path, dict(cfg.reward.options))


class RewardJob:
    """One reward run as its driver sees it: the checked config, one unit per committed shard
    (shard id, commit record fields) and which are scored already, then the tally of the
    parts written now."""

    def __init__(self, cfg: Config):
        cfg = cfg.with_absolute_paths()
        check_reward_config(cfg)
        storage = open_storage(cfg.run.uri)
        rnd, table = cfg.run.round, cfg.reward.table_name()
        committed = list_committed(storage, rnd)
        if not committed:
            raise RewardError(f"no committed shards in round {rnd} of {storage.uri}; run `pgraft generate` first")
        self.cfg, self.table = cfg, table
        self.done, torn = scored_parts(storage, rnd, table)  # a rerun redoes torn parts
        self.units = [(sid, vars(rec)) for sid, rec in sorted(committed.items())]
        self.summary = RewardSummary(run_uri=storage.uri, round=rnd, table=table, shards=len(committed), skipped=0,
                                     written=0, rows_written=0, seconds=0.0, reward_mean=None,
                                     table_prefix=storage.url(contract.rewards_prefix(rnd, table)), torn=len(torn))
        self.reward_sum, self.finite = 0.0, 0

    def is_committed(self, unit: tuple[int, dict]) -> bool:
        return unit[0] in self.done

    def spec(self) -> WorkerSpec:
        cfg = self.cfg
        return WorkerSpec(RewardWorker, (cfg.model_dump(mode="json"),), cfg.reward.device, "reward.device",
                          cfg.reward.num_workers, cfg.reward.resources, 1, cfg.cluster.placement_timeout_s,
                          cfg.cluster.max_restarts, cfg.reward.cpus_per_worker)

    def add(self, done: Finished) -> None:
        """One shard's part, written now."""
        result = done.value
        self.summary.written += 1
        self.summary.rows_written += result["rows"]
        self.reward_sum += result["reward_sum"]
        self.finite += result["finite"]

    def finish(self, seconds: float, skipped: int, workers: int, nodes: list[str]) -> RewardSummary:
        """The run's summary: `skipped` parts existed before; `workers` actors on `nodes` wrote the rest."""
        summary = self.summary
        summary.skipped, summary.nodes = skipped, list(nodes)
        summary.reward_mean = self.reward_sum / self.finite if self.finite else None
        summary.seconds = seconds
        return summary
