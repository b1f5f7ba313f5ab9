"""Generate stage: roll out prompts × M samples on Ray actors and cache X_t in WebDataset shards.

Work is split into units of `generate.samples_per_shard` samples, one shard each. A unit is
done once its commit record exists; a rerun redoes only units without one, so the stage is
resumable and never writes a sample twice. Seeds come from (run seed, round, prompt_id,
sample_idx), so the same config gives byte-identical shards.

    pgraft generate --config configs/digits.yaml --set generate.samples_per_prompt=8
    python -m stages.generate --config configs/digits.yaml
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

import cluster
from pgraft import contract
from pgraft.config import Config, ConfigError, ModelSection, config_to_yaml
from pgraft.contract import CommitRecord, SampleMeta
from pgraft.errors import PgraftError
from pgraft.models.adapters import (
    ModelAdapter,
    Rollout,
    check_capture_steps,
    check_model_folder,
    load_adapter,
    synchronize,
)
from pgraft.shards import Sample, commit_shard, list_committed, write_shard
from pgraft.storage import Storage, open_storage
from pgraft.stagespec import StageSpec, stage_main

# Calls in flight per generate actor: one unit's rollouts, the other's shard being written.
# More would only hold more units in memory: the actor's device thread runs one unit at a time.
CALLS_PER_ACTOR = 2

# Config fields that change what a sample is; a run refuses to continue if they change.
# (num_workers and batch_size only change how the work is spread.)
_NOT_IDENTITY = {("generate", "num_workers"), ("generate", "batch_size"), ("generate", "resources"), ("model", "device"),
                 ("run", "rounds"), ("run", "round"), ("run", "uri"), ("model", "finetuned")}  # uri: runs may move; finetuned: per round


class GenerateError(PgraftError):
    """The generate stage cannot run as configured; the message says why."""


@dataclass(frozen=True)
class WorkUnit:
    shard_id: int
    items: tuple[tuple[int, int], ...]  # (prompt_id, sample_idx) in shard order


@dataclass
class GenerateSummary:
    run_uri: str
    round: int
    units: int
    skipped: int  # already committed before this run
    written: int
    samples_written: int
    bytes_written: int
    seconds: float
    workers: int
    captured: dict[str, int] = field(default_factory=dict)  # latent name -> timestep
    shard_prefix: str = ""
    nodes: list[str] = field(default_factory=list)  # Ray node ids the shards were written on
    device_seconds: float = 0.0  # in rollouts, summed over actors
    device_idle_fraction: float = 0.0  # per actor, first rollout start to last commit; mean over actors
    working_seconds: float = 0.0  # per actor, first rollout start to last commit (no start-up); mean over actors

    def headline(self) -> str:
        """One line for job logs (the round pipeline prints one per finished stage)."""
        return (f"generate round {self.round}: {self.units} shards ({self.written} written now, {self.skipped} already "
                f"there), {self.samples_written} samples in {self.seconds:.1f} s on {self.workers} worker(s)")

    def render(self) -> str:
        rate = self.samples_written / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"generate: round {self.round} of {self.run_uri}",
            f"  shards   {self.units} planned, {self.skipped} already committed, {self.written} written now",
            f"  samples  {self.samples_written} written, {self.bytes_written / 1e6:.1f} MB, "
            f"{self.seconds:.1f} s on {self.workers} worker(s), {rate:.1f} samples/s",
        ]
        if self.samples_written:
            lines.append(f"  device   {self.device_seconds:.1f} s in rollouts, idle {self.device_idle_fraction:.1%} of "
                         f"each actor's time; {self.bytes_written / self.samples_written / 1e3:.1f} kB per sample")
        if self.captured:
            ordered = sorted(self.captured.items(), key=lambda item: contract.latent_order(item[0]))
            steps = ", ".join(f"{name} (t={t})" for name, t in ordered)
            lines.append(f"  latents  x_T, {steps}, x_0 per sample")
        lines.append(f"  shards at {self.shard_prefix}/")
        return "\n".join(lines)


def resolve_prompts(prompts: list[str] | str) -> list[str]:
    """The prompt list from the config: inline, or a text file with one prompt per line."""
    if isinstance(prompts, str):
        path = Path(prompts)
        if not path.is_file():
            raise ConfigError(f"config error: generate.prompts: prompts file {prompts!r} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"config error: generate.prompts: prompts file {str(path)!r} is empty")
    if not prompts:
        raise ConfigError("config error: generate.prompts: no prompts given")
    return list(prompts)


def plan_units(num_prompts: int, samples_per_prompt: int, samples_per_shard: int) -> list[WorkUnit]:
    items = [(p, s) for p in range(num_prompts) for s in range(samples_per_prompt)]
    return [WorkUnit(i, tuple(items[lo:lo + samples_per_shard]))
            for i, lo in enumerate(range(0, len(items), samples_per_shard))]


def _identity(cfg_tree: dict) -> dict:
    return {section: {k: v for k, v in values.items() if (section, k) not in _NOT_IDENTITY}
            for section, values in cfg_tree.items() if section in ("run", "model", "generate")}


def record_run_config(storage: Storage, cfg: Config) -> None:
    """Write RUN/config.yaml once; refuse to add samples to a run started with other settings."""
    mine = cfg.model_dump(mode="json")
    if storage.exists(contract.CONFIG_KEY):
        theirs = yaml.safe_load(storage.get_bytes(contract.CONFIG_KEY)) or {}
        a, b = _identity(theirs), _identity(mine)
        for section in sorted(set(a) | set(b)):
            for key in sorted(set(a.get(section, {})) | set(b.get(section, {}))):
                old, new = a.get(section, {}).get(key), b.get(section, {}).get(key)
                if old != new:
                    raise GenerateError(
                        f"{storage.url(contract.CONFIG_KEY)} was started with {section}.{key}={old!r}, "
                        f"this config has {new!r}; use a new run.uri (samples of one run must share one config)"
                    )
        return
    storage.put_bytes(contract.CONFIG_KEY, config_to_yaml(cfg).encode())


class BatchRollout(NamedTuple):
    items: tuple[tuple[int, int], ...]  # (prompt_id, sample_idx) per sample
    seeds: list[int]
    rollout: Rollout


def _load_adapter(model: ModelSection, threads: int | None) -> ModelAdapter:
    """The model, with `threads` torch threads (the CPUs the actor holds; None: torch's default)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return load_adapter(model)


class GenerateWorker:
    """One per actor: loads the model once, then turns work units into committed shards.

    A unit has a device phase (its rollouts) and a host phase (PNG and safetensors encoding,
    tar, sha256, upload, commit record). The actor runs `CALLS_PER_ACTOR` calls at once in
    Ray's threads; their device phases queue for the one device thread, so the next unit's
    rollouts run while this one's shard is written. A call still returns only once its shard
    is committed."""

    def __init__(self, cfg_tree: dict, prompts: list[str], threads: int | None = None):
        self.cfg = Config.model_validate(cfg_tree)
        self.prompts = prompts
        self.storage = open_storage(self.cfg.run.uri)
        # The model is loaded and run on one thread only, one unit after another: torch's
        # OpenMP gives each thread that runs ops a pool of its own, and with more pools than
        # cores (Ray's threads taking turns behind a lock) CPU rollouts ran a quarter slower.
        self.device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgraft-device")
        self.adapter = self.device_thread.submit(_load_adapter, self.cfg.model, threads).result()

    def run_unit(self, unit: WorkUnit) -> dict:
        rollouts, device_start, device_seconds = self.device_thread.submit(self._device_phase, unit).result()
        samples = [sample for batch in rollouts for sample in self._samples(batch)]
        record = self._write_and_commit(unit.shard_id, samples)
        return {"shard_id": unit.shard_id, "count": record.count, "bytes": record.bytes,
                "captured": rollouts[-1].rollout.captured_timesteps, "node_id": cluster.current_node_id(),
                "actor_id": cluster.current_actor_id(), "device_seconds": device_seconds,
                "device_start": device_start, "committed_at": time.time()}

    def _device_phase(self, unit: WorkUnit) -> tuple[list[BatchRollout], float, float]:
        """The unit's rollouts, when they started (wall clock: comparable across the processes
        of a restarted actor) and the seconds the device took."""
        device_start, clock = time.time(), time.perf_counter()
        rollouts = self._roll_out(unit)
        synchronize(self.adapter.device)  # so the seconds count the device's work, not its queueing
        return rollouts, device_start, time.perf_counter() - clock

    def _roll_out(self, unit: WorkUnit) -> list[BatchRollout]:
        """All the unit's model work, batch by batch."""
        cfg, rollouts = self.cfg, []
        for lo in range(0, len(unit.items), cfg.generate.batch_size):
            items = unit.items[lo:lo + cfg.generate.batch_size]
            seeds = [contract.sample_seed(cfg.run.seed, cfg.run.round, p, s) for p, s in items]
            rollout = self.adapter.rollout([self.prompts[p] for p, _ in items], seeds, cfg.generate.capture_steps)
            rollouts.append(BatchRollout(items, seeds, rollout))
        return rollouts

    def _samples(self, batch: BatchRollout) -> list[Sample]:
        cfg, rollout, samples = self.cfg, batch.rollout, []
        for i, ((prompt_id, sample_idx), seed) in enumerate(zip(batch.items, batch.seeds)):
            meta = SampleMeta(
                key=contract.sample_key(prompt_id, sample_idx), prompt=self.prompts[prompt_id],
                prompt_id=prompt_id, sample_idx=sample_idx, seed=seed, round=cfg.run.round, model=cfg.model.path,
                model_kind=cfg.model.kind, finetuned=cfg.model.finetuned, noise_corrector=cfg.model.noise_corrector,
                scheduler=rollout.scheduler,
                num_inference_steps=cfg.model.num_inference_steps, guidance_scale=cfg.model.guidance_scale,
                captured_steps=dict(rollout.captured_timesteps), timesteps=rollout.timesteps,
            )
            samples.append(Sample(meta, {k: v[i] for k, v in rollout.latents.items()}, rollout.images[i]))
        return samples

    def _write_and_commit(self, shard_id: int, samples: list[Sample]) -> CommitRecord:
        rnd = self.cfg.run.round
        with tempfile.TemporaryDirectory(prefix="pgraft-generate-") as scratch:
            local = Path(scratch) / f"{contract.shard_name(shard_id)}.tar"
            record = write_shard(samples, local, rnd)
            commit_shard(self.storage, local, record, rnd, shard_id)
        return record


@dataclass
class ActorClock:
    """One actor's device time and the span from its first rollout to its last commit."""

    first_start: float = math.inf
    last_end: float = -math.inf
    device_seconds: float = 0.0

    def add(self, result: dict) -> None:
        self.first_start = min(self.first_start, result["device_start"])
        self.last_end = max(self.last_end, result["committed_at"])
        self.device_seconds += result["device_seconds"]

    @property
    def idle_fraction(self) -> float:
        span = self.last_end - self.first_start
        return min(1.0, max(0.0, 1.0 - self.device_seconds / span)) if span > 0 else 0.0


def device_idle_fraction(clocks: list[ActorClock]) -> float:
    """The share of each actor's span its device spent idle, averaged over actors."""
    return sum(c.idle_fraction for c in clocks) / len(clocks) if clocks else 0.0


def run_generate(cfg: Config, progress: bool = True, label: str | None = None) -> GenerateSummary:
    """Generate the round's missing shards; `label` names the work in progress lines (the
    evaluate stage's variants are one-round runs of their own: "evaluate round 3 base: generate")."""
    start = time.perf_counter()
    cfg = cfg.with_absolute_paths()
    prompts = resolve_prompts(cfg.generate.prompts)
    check_capture_steps(cfg.generate.capture_steps, cfg.model.num_inference_steps)
    check_model_folder(cfg.model)
    storage = open_storage(cfg.run.uri)
    storage.check_writable()
    record_run_config(storage, cfg)

    rnd = cfg.run.round
    units = plan_units(len(prompts), cfg.generate.samples_per_prompt, cfg.generate.samples_per_shard)
    storage.put_bytes(contract.generate_plan_key(rnd), json.dumps(
        {"units": len(units), "samples": len(prompts) * cfg.generate.samples_per_prompt}).encode())
    committed = list_committed(storage, rnd)
    pending = [u for u in units if u.shard_id not in committed]
    summary = GenerateSummary(run_uri=storage.uri, round=rnd, units=len(units), skipped=len(units) - len(pending),
                              written=0, samples_written=0, bytes_written=0, seconds=0.0, workers=0,
                              shard_prefix=storage.url(contract.generate_prefix(rnd)))
    if pending:
        pool = cluster.start_workers(GenerateWorker, cfg.generate.num_workers, cfg.model.device, "model.device",
                                     len(pending), cfg.model_dump(mode="json"), prompts,
                                     extra_resources=cfg.generate.resources, timeout_s=cfg.cluster.placement_timeout_s,
                                     max_restarts=cfg.cluster.max_restarts, max_concurrency=CALLS_PER_ACTOR)
        summary.workers = len(pool.actors)
        clocks: dict[str, ActorClock] = defaultdict(ActorClock)  # by actor id

        def on_result(result: dict) -> None:
            summary.written += 1
            summary.samples_written += result["count"]
            summary.bytes_written += result["bytes"]
            summary.device_seconds += result["device_seconds"]
            summary.captured = result["captured"]
            if result["node_id"] not in summary.nodes:
                summary.nodes.append(result["node_id"])
            clocks[result["actor_id"]].add(result)

        cluster.run_pool(pool, "run_unit", pending, on_result, label or f"generate round {rnd}", progress,
                         calls_per_actor=CALLS_PER_ACTOR)
        summary.device_idle_fraction = device_idle_fraction(list(clocks.values()))
        spans = [c.last_end - c.first_start for c in clocks.values()]
        summary.working_seconds = sum(spans) / len(spans) if spans else 0.0
    summary.seconds = time.perf_counter() - start
    if not summary.captured and committed:
        from pgraft.shards import read_shard

        first = next(iter(committed))
        meta = read_shard(storage, rnd, first, committed[first], wanted=("json",))[0].meta
        summary.captured = meta.captured_steps
    return summary


STAGE = StageSpec(
    name="generate", run=run_generate, description="roll out prompts × M samples on Ray actors and cache X_t in WebDataset shards",
    reads=("task",), writes=("shards",),
)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
