"""Invert stage: push a data set back through a flow model's Euler sampler (Inverse Noise
Correction, docs/DESIGN.md §5), on Ray actors.

Each data point x is mapped to its inverse noise z = Φ⁻¹(x) by backward Euler, every step
solved by fixed-point iteration (`invert.tolerance`, `invert.max_iterations`); the forward
sampler is then run from z to measure ‖Φ(z) − x‖. Output under inversion/<name>/:
`shards/` (WebDataset: x_0 and x_T = z per record, the image, an InversionMeta json) and
`table/part-NNNNNN.parquet` (per sample: reconstruction error, iterations, converged).
Work is split into units; a unit is done once its shard's commit record exists (written
last), so a rerun redoes only the rest and never writes a record twice.

    pgraft invert --config configs/digits-inc.yaml
    pgraft invert --config configs/digits-inc.yaml --set invert.data=s3://bucket/shards --set invert.name=mine
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

import numpy as np

import cluster
from pgraft import contract
from pgraft.config import Config, first_difference, identity
from pgraft.models.adapters import check_flow_model, check_model_folder
from pgraft.commits import drop_torn_shards
from pgraft.shards import list_committed_at
from pgraft.storage import Storage, open_storage
from pgraft.tables import read_parquet
from pgraft.stagespec import StageSpec, stage_main

# The input data and the worker live in the library; their names stay importable from here.
from pgraft.work.invert import InvertError, InvertUnit, InvertWorker, _task_points

# Settings an inversion's records depend on: a rerun with other values would mix two inversions.
# What an inversion's records are a function of: the fields marked WHAT in these sections (the
# task's data and split, the flow sampler, the inversion's own settings).
SETTINGS_SECTIONS = ("task", "model", "invert")


# Planning ---------------------------------------------------------------------------------

def plan_units(cfg: Config) -> list[InvertUnit]:
    """Work units: slices of the task data, or one unit per input tar (sorted by name)."""
    if cfg.invert.data == "task":
        x, _ = _task_points(cfg)
        n = min(len(x), cfg.invert.limit or len(x))
        source = f"task:{cfg.task.name}/{cfg.invert.split}"
        step = cfg.invert.samples_per_shard
        return [InvertUnit(i, source, tuple(range(lo, min(lo + step, n)))) for i, lo in enumerate(range(0, n, step))]
    store = open_storage(cfg.invert.data)
    tars = sorted(k for k in store.list("") if k.endswith(".tar"))
    if not tars:
        raise InvertError(f"invert.data: {cfg.invert.data!r} holds no .tar shards (or does not exist)")
    return [InvertUnit(i, store.url(key), tar_key=key) for i, key in enumerate(tars[:cfg.invert.limit])]


def inversion_settings(cfg: Config) -> dict:
    """The settings of the sampler that is inverted: the base alone (a noise corrector or a
    fine-tuned composite plays no part in Φ)."""
    base = cfg.model_copy(update={"model": cfg.model.model_copy(update={"noise_corrector": None, "finetuned": None})})
    return identity(base, SETTINGS_SECTIONS)


def record_settings(storage: Storage, cfg: Config, name: str) -> None:
    """Write inversion/<name>/settings.json once; refuse to add records made with other settings."""
    mine = inversion_settings(cfg)
    key = contract.inversion_settings_key(name)
    if storage.exists(key):
        # Keys both have: a settings.json of an older version lacks fields marked since.
        differs = first_difference(json.loads(storage.get_bytes(key)), mine, common_only=True)
        if differs is not None:
            field_name, old, new = differs
            raise InvertError(f"{storage.url(contract.inversion_prefix(name))} was made with {field_name}={old!r}, "
                              f"this config has {new!r}; use another invert.name, or delete that folder to invert again")
        return
    storage.put_bytes(key, json.dumps(mine, indent=1).encode())


# Driver -----------------------------------------------------------------------------------

def summarize(storage: Storage, cfg: Config, units: int, skipped: int, seconds: float, nodes: list[str]):
    """The inversion's summary from its table parts (what the driver reads: no tensors)."""
    name = cfg.invert.name
    parts = sorted(k for k in storage.list(f"{contract.inversion_prefix(name)}/table") if k.endswith(".parquet"))
    tables = [read_parquet(storage, k) for k in parts]
    cols = {c: np.concatenate([t.column(c).to_numpy() for t in tables]) for c in
            ("reconstruction_error", "iterations", "converged", "noise_rms")}
    return contract.InversionSummary(
        name=name, source=cfg.invert.data if cfg.invert.data != "task" else f"task:{cfg.task.name}/{cfg.invert.split}",
        model=cfg.model.path, num_inference_steps=cfg.model.num_inference_steps, conditional=cfg.invert.conditional,
        samples=len(cols["converged"]), converged=int(cols["converged"].sum()),
        reconstruction_error_mean=float(cols["reconstruction_error"].mean()),
        reconstruction_error_max=float(cols["reconstruction_error"].max()),
        iterations_mean=float(cols["iterations"].mean()),
        noise_rms=float(np.sqrt(np.mean(cols["noise_rms"] ** 2))), shards=units, skipped=skipped, seconds=seconds,
        nodes=nodes, location=storage.url(contract.inversion_prefix(name)),
    )


def run_invert(cfg: Config, progress: bool = True) -> contract.InversionSummary:
    start = time.perf_counter()
    cfg = cfg.with_absolute_paths()
    check_model_folder(cfg.model.model_copy(update={"noise_corrector": None, "finetuned": None}))
    check_flow_model(cfg.model, "pgraft invert inverts a flow sampler")
    storage = open_storage(cfg.run.uri)
    storage.check_writable()
    name = cfg.invert.name
    units = plan_units(cfg)
    record_settings(storage, cfg, name)
    committed = list_committed_at(storage, contract.inversion_shards_prefix(name))
    drop_torn_shards(storage, contract.inversion_shards_prefix(name), committed)  # torn ones are redone below
    spec = cluster.WorkerSpec(InvertWorker, (cfg.model_dump(mode="json"),), cfg.model.device, "model.device",
                              cfg.invert.num_workers, cfg.invert.resources, 1, cfg.cluster.placement_timeout_s,
                              cfg.cluster.max_restarts, cfg.invert.cpus_per_worker)
    run = cluster.execute(spec, units, lambda unit: unit.shard_id in committed, f"invert {name}", progress)
    for _ in run:
        pass  # each unit commits its own shard and table part; the summary reads the parts
    summary = summarize(storage, cfg, len(units), run.skipped, time.perf_counter() - start, run.nodes)
    storage.put_bytes(contract.inversion_summary_key(name), json.dumps(asdict(summary), indent=1).encode())
    return summary


STAGE = StageSpec(
    name="invert", run=run_invert, description="push a data set back through a flow sampler (Inverse Noise Correction)",
    reads=("task",), writes=("inversion",),
)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
