"""Generate work: plan a round's units (one shard each), the worker that turns a unit into a
committed shard, and the tally of a run (docs/DESIGN.md §7: the device thread, two units in
flight per actor). The generate stage and the evaluate stage's variants drive these.

A unit is done once its commit record exists; a rerun redoes only units without one. Seeds
come from (run seed, round, prompt_id, sample_idx), so the same config gives byte-identical
shards whichever actor, thread count aside, writes them.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from pgraft import contract
from pgraft.commits import drop_torn_shards
from pgraft.config import Config, ConfigError, config_to_yaml, first_difference, identity
from pgraft.contract import CommitRecord, SampleMeta
from pgraft.errors import PgraftError
from pgraft.models.adapters import Rollout, check_capture_steps, check_model_folder, load_adapter, synchronize
from pgraft.samples import IMAGE
from pgraft.shards import Sample, commit_shard, list_committed, write_shard
from pgraft.storage import Storage, open_storage
from pgraft.work.spec import Finished, WorkerSpec

# Calls in flight per generate actor: one unit's rollouts, the other's shard being written.
# More would only hold more units in memory: the actor's device thread runs one unit at a time.
CALLS_PER_ACTOR = 2


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
    torn: int = 0  # committed shards whose bytes no longer matched their record: moved aside and redone now

    def headline(self) -> str:
        """One line for job logs (the round pipeline prints one per finished stage)."""
        torn = f", {self.torn} torn ones redone" if self.torn else ""
        return (f"generate round {self.round}: {self.units} shards ({self.written} written now, {self.skipped} already "
                f"there{torn}), {self.samples_written} samples in {self.seconds:.1f} s on {self.workers} worker(s)")

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


# What a sample is a function of: the fields marked WHAT in these sections (pgraft/config.py).
# Placement (generate.num_workers, batch_size, resources, model.device), where the run lives
# (run.uri, run.rounds) and what differs per round (run.round, model.finetuned) are not.
SAMPLE_SECTIONS = ("run", "model", "generate")


def record_run_config(storage: Storage, cfg: Config) -> None:
    """Write RUN/config.yaml once; refuse to add samples to a run started with other settings."""
    if storage.exists(contract.CONFIG_KEY):
        theirs = yaml.safe_load(storage.get_bytes(contract.CONFIG_KEY)) or {}
        differs = first_difference(identity(theirs, SAMPLE_SECTIONS), identity(cfg, SAMPLE_SECTIONS))
        if differs is not None:
            key, old, new = differs
            raise GenerateError(
                f"{storage.url(contract.CONFIG_KEY)} was started with {key}={old!r}, "
                f"this config has {new!r}; use a new run.uri (samples of one run must share one config)"
            )
        return
    storage.put_bytes(contract.CONFIG_KEY, config_to_yaml(cfg).encode())


class BatchRollout(NamedTuple):
    items: tuple[tuple[int, int], ...]  # (prompt_id, sample_idx) per sample
    seeds: list[int]
    rollout: Rollout


class GenerateWorker:
    """One per actor: loads the model once, then turns work units into committed shards.

    A unit has a device phase (its rollouts) and a host phase (PNG and safetensors encoding,
    tar, sha256, upload, commit record). The actor runs `CALLS_PER_ACTOR` calls at once in
    Ray's threads; their device phases queue for the one device thread, so the next unit's
    rollouts run while this one's shard is written. A call still returns only once its shard
    is committed. (Without Ray: `GenerateWorker(cfg_tree, prompts)(unit)` writes one shard.)"""

    def __init__(self, cfg_tree: dict, prompts: list[str]):
        self.cfg = Config.model_validate(cfg_tree)
        self.prompts = prompts
        self.storage = open_storage(self.cfg.run.uri)
        # The model is loaded and run on one thread only, one unit after another: torch's
        # OpenMP gives each thread that runs ops a pool of its own, and with more pools than
        # cores (Ray's threads taking turns behind a lock) CPU rollouts ran a quarter slower.
        # torch's thread count, set in the actor before this worker is built, holds there too.
        self.device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgraft-device")
        self.adapter = self.device_thread.submit(load_adapter, self.cfg.model).result()
        # generate.store_views: a PNG of each non-image sample beside it, drawn the task's way.
        spec = self.cfg.task.spec()
        self.show = spec.show if self.cfg.generate.store_views and spec is not None else None

    def __call__(self, unit: WorkUnit) -> dict:
        rollouts, device_start, device_seconds = self.device_thread.submit(self._device_phase, unit).result()
        samples = [sample for batch in rollouts for sample in self._samples(batch)]
        record = self._write_and_commit(unit.shard_id, samples)
        return {"shard_id": unit.shard_id, "count": record.count, "bytes": record.bytes,
                "captured": rollouts[-1].rollout.captured_timesteps, "device_seconds": device_seconds,
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
            decoded = rollout.samples[i]
            view = self.show(decoded) if self.show is not None and rollout.sample_kind != IMAGE.name else None
            samples.append(Sample(meta, {k: v[i] for k, v in rollout.latents.items()}, decoded, rollout.sample_kind, view))
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


class GenerateJob:
    """One generate run as its driver sees it: the checked config, the planned units and which
    are committed already (checks, the run's config.yaml and the plan are written on
    construction, before any actor starts), then the tally of the units finished now."""

    def __init__(self, cfg: Config):
        cfg = cfg.with_absolute_paths()
        prompts = resolve_prompts(cfg.generate.prompts)
        check_capture_steps(cfg.generate.capture_steps, cfg.model.num_inference_steps)
        check_model_folder(cfg.model)
        storage = open_storage(cfg.run.uri)
        storage.check_writable()
        record_run_config(storage, cfg)

        rnd = cfg.run.round
        self.cfg, self.prompts, self.storage = cfg, prompts, storage
        self.units = plan_units(len(prompts), cfg.generate.samples_per_prompt, cfg.generate.samples_per_shard)
        storage.put_bytes(contract.generate_plan_key(rnd), json.dumps(
            {"units": len(self.units), "samples": len(prompts) * cfg.generate.samples_per_prompt}).encode())
        self.committed = list_committed(storage, rnd)
        # A rerun checks what earlier runs committed: a torn shard is moved aside and redone.
        torn = drop_torn_shards(storage, contract.generate_prefix(rnd), self.committed)
        self.summary = GenerateSummary(run_uri=storage.uri, round=rnd, units=len(self.units), skipped=0, written=0,
                                       samples_written=0, bytes_written=0, seconds=0.0, workers=0,
                                       shard_prefix=storage.url(contract.generate_prefix(rnd)), torn=len(torn))
        self.clocks: dict[str | None, ActorClock] = defaultdict(ActorClock)  # by actor id

    def is_committed(self, unit: WorkUnit) -> bool:
        return unit.shard_id in self.committed

    def spec(self, calls_per_actor: int = CALLS_PER_ACTOR) -> WorkerSpec:
        cfg = self.cfg
        return WorkerSpec(GenerateWorker, (cfg.model_dump(mode="json"), self.prompts), cfg.model.device, "model.device",
                          cfg.generate.num_workers, cfg.generate.resources, calls_per_actor,
                          cfg.cluster.placement_timeout_s, cfg.cluster.max_restarts, cfg.generate.cpus_per_worker)

    def add(self, done: Finished) -> None:
        """One unit's shard, committed now."""
        summary, result = self.summary, done.value
        summary.written += 1
        summary.samples_written += result["count"]
        summary.bytes_written += result["bytes"]
        summary.device_seconds += result["device_seconds"]
        summary.captured = result["captured"]
        self.clocks[done.actor_id].add(result)

    def finish(self, seconds: float, skipped: int, workers: int, nodes: list[str]) -> GenerateSummary:
        """The run's summary: `skipped` units were committed before, `workers` actors on `nodes` did the rest."""
        summary = self.summary
        summary.skipped, summary.workers, summary.nodes = skipped, workers, list(nodes)
        summary.device_idle_fraction = device_idle_fraction(list(self.clocks.values()))
        spans = [c.last_end - c.first_start for c in self.clocks.values()]
        summary.working_seconds = sum(spans) / len(spans) if spans else 0.0
        summary.seconds = seconds
        if not summary.captured and self.committed:
            from pgraft.shards import read_shard

            first = next(iter(self.committed))
            meta = read_shard(self.storage, self.cfg.run.round, first, self.committed[first], wanted=("json",))[0].meta
            summary.captured = meta.captured_steps
        return summary
