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

import io
import json
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import cluster
from pgraft import contract
from pgraft.config import Config
from pgraft.errors import PgraftError
from pgraft.models.adapters import check_flow_model, check_model_folder
from pgraft.shards import LATENTS_EXT, Sample, commit_shard_at, list_committed_at, write_shard
from pgraft.storage import Storage, open_storage
from pgraft.tables import arrow_schema, read_parquet, write_parquet
from pgraft.stagespec import StageSpec, stage_main

# Settings an inversion's records depend on: a rerun with other values would mix two inversions.
_SETTINGS = {"task": ("name", "seed"),  # the task's data and its split
             "model": ("path", "kind", "scheduler", "timestep_spacing", "num_inference_steps", "guidance_scale", "dtype"),
             "invert": ("data", "split", "conditional", "limit", "tolerance", "max_iterations", "samples_per_shard")}


class InvertError(PgraftError):
    """The invert stage cannot run as configured, or its input is unusable; the message says why."""


@dataclass(frozen=True)
class InvertUnit:
    shard_id: int
    source: str  # "task:<name>/<split>", or the input tar's location (for records and messages)
    indices: tuple[int, ...] = ()  # task data: the data points of this unit
    tar_key: str = ""  # WebDataset input: the tar's key under invert.data


# Input data -------------------------------------------------------------------------------

def _task_points(cfg: Config):
    """(x (N, ...) in model space, prompts) of the built-in task's real data."""
    spec = cfg.task.spec()
    if spec is not None:
        if cfg.invert.split not in spec.splits:
            raise InvertError(f"invert.split={cfg.invert.split}: task {spec.name} has the splits {list(spec.splits)}")
        return spec.real_data(cfg.invert.split, cfg.task.seed)
    raise InvertError("invert.data=task needs a built-in task (task.name); set invert.data to a WebDataset location")


def _tar_points(data: str, unit: InvertUnit, model_shape: tuple[int, ...]):
    """(x, prompts) of one input tar: each record's `x_0` tensor from `.latents.safetensors`, or
    its `.png` mapped to [-1, 1]; the prompt from its `.json`, if any. Other members are skipped
    unread (nothing in the data is executed or unpickled)."""
    import torch

    storage_uri = unit.source
    payload = open_storage(data).get_bytes(unit.tar_key)
    records: dict[str, dict] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, _, ext = Path(info.name).name.partition(".")
                if ext not in (LATENTS_EXT, "png", "json"):
                    continue
                records.setdefault(key, {})[ext] = tar.extractfile(info).read()
    except tarfile.TarError as exc:
        raise InvertError(f"invert.data: {storage_uri} is not a readable tar ({exc})") from None
    xs, prompts = [], []
    for key, parts in records.items():
        try:
            x, prompt = _decode_record(parts)
        except (ValueError, KeyError, AttributeError, OSError, RuntimeError) as exc:
            raise InvertError(f"invert.data: record {key} of {storage_uri} cannot be decoded ({exc})") from None
        if x is None:
            continue  # a record without data (e.g. only a .json)
        if tuple(x.shape) != tuple(model_shape):
            raise InvertError(f"invert.data: record {key} of {storage_uri} has shape {tuple(x.shape)}; the model "
                              f"takes {tuple(model_shape)}")
        xs.append(x)
        prompts.append(prompt)
    if not xs:
        raise InvertError(f"invert.data: {storage_uri} holds no record with {LATENTS_EXT} or png")
    return torch.stack(xs), prompts


def _decode_record(parts: dict):
    """(x or None, prompt) of one input record's members."""
    import torch
    from safetensors.torch import load as load_safetensors

    from pgraft.shards import decode_png

    if LATENTS_EXT in parts:
        tensors = load_safetensors(parts[LATENTS_EXT])
        if contract.FINAL_LATENT not in tensors:
            raise KeyError(f"no {contract.FINAL_LATENT!r} tensor in its {LATENTS_EXT} (it holds {sorted(tensors)})")
        x = tensors[contract.FINAL_LATENT].float()
    elif "png" in parts:
        x = torch.as_tensor(decode_png(parts["png"]), dtype=torch.float32) / 127.5 - 1.0
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    else:
        return None, ""
    prompt = json.loads(parts["json"]).get("prompt", "") if "json" in parts else ""
    return x, prompt if isinstance(prompt, str) else ""


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
    return {f"{section}.{key}": getattr(getattr(cfg, section), key) for section, keys in _SETTINGS.items() for key in keys}


def record_settings(storage: Storage, cfg: Config, name: str) -> None:
    """Write inversion/<name>/settings.json once; refuse to add records made with other settings."""
    mine = inversion_settings(cfg)
    key = contract.inversion_settings_key(name)
    if storage.exists(key):
        theirs = json.loads(storage.get_bytes(key))
        for field_name in sorted(set(mine) | set(theirs)):
            if theirs.get(field_name) != mine.get(field_name):
                raise InvertError(f"{storage.url(contract.inversion_prefix(name))} was made with {field_name}="
                                  f"{theirs.get(field_name)!r}, this config has {mine.get(field_name)!r}; use another "
                                  "invert.name, or delete that folder to invert again")
        return
    storage.put_bytes(key, json.dumps(mine, indent=1).encode())


# Workers ----------------------------------------------------------------------------------

class InvertWorker:
    """One per actor: loads the flow model once, then turns units into committed shards."""

    def __init__(self, cfg_tree: dict, threads: int | None = None):
        import torch

        from pgraft.models.adapters import load_adapter

        if threads:
            torch.set_num_threads(threads)
        self.cfg = Config.model_validate(cfg_tree)
        self.storage = open_storage(self.cfg.run.uri)
        # Φ is the base sampler itself: a noise corrector plays no part in inverting it.
        self.adapter = load_adapter(self.cfg.model.model_copy(update={"noise_corrector": None, "finetuned": None}))
        self.grid = self.adapter.euler_grid()
        self._task = None  # the task's data, loaded by the first unit that needs it

    def _points(self, unit: InvertUnit):
        if unit.indices:
            if self._task is None:  # once per actor, not once per unit
                self._task = _task_points(self.cfg)
            x, prompts = self._task
            idx = list(unit.indices)
            return x[idx], [prompts[i] for i in idx], idx
        x, prompts = _tar_points(self.cfg.invert.data, unit, self.adapter.latent_shape())
        return x, prompts, list(range(len(x)))

    def run_unit(self, unit: InvertUnit) -> dict:
        import pyarrow as pa

        from pgraft.inversion import invert
        from pgraft.models.class_pipeline import latents_to_uint8

        cfg, inv = self.cfg, self.cfg.invert
        x_all, prompts_all, indices = self._points(unit)
        if tuple(x_all.shape[1:]) != tuple(self.adapter.latent_shape()):
            raise InvertError(f"invert.data: {unit.source} holds data of shape {tuple(x_all.shape[1:])}; the model "
                              f"takes {tuple(self.adapter.latent_shape())}")
        guidance = cfg.model.guidance_scale if inv.conditional else 1.0
        samples, rows = [], []
        for lo in range(0, len(x_all), inv.batch_size):
            x = x_all[lo:lo + inv.batch_size]
            prompts = prompts_all[lo:lo + inv.batch_size] if inv.conditional else [""] * len(x)
            velocity = self.adapter.velocity_field(prompts, guidance)
            result = invert(velocity, x, self.grid, inv.tolerance, inv.max_iterations)
            errors = result.reconstruction_error(x, velocity, self.grid)
            images = latents_to_uint8(x) if self.adapter.kind == "class_unet" else [None] * len(x)
            for i in range(len(x)):
                position = lo + i
                meta = contract.InversionMeta(
                    key=contract.inversion_key(unit.shard_id, position), index=indices[position], source=unit.source,
                    prompt=prompts[i], model=cfg.model.path, num_inference_steps=cfg.model.num_inference_steps,
                    guidance_scale=guidance, iterations=int(result.iterations[i]),
                    max_step_iterations=int(result.max_step_iterations[i]), converged=bool(result.converged[i]),
                    residual=float(result.residual[i]), reconstruction_error=float(errors[i]),
                )
                latents = {contract.INITIAL_NOISE: result.noise[i], contract.FINAL_LATENT: x[i]}
                samples.append(Sample(meta, latents, images[i]))
                noise = result.noise[i].double()
                rows.append({**{k: getattr(meta, k) for k in ("key", "index", "prompt", "reconstruction_error",
                                                              "iterations", "max_step_iterations", "converged",
                                                              "residual")},
                             "shard": contract.shard_name(unit.shard_id), "noise_rms": float(noise.pow(2).mean().sqrt())})
        name = inv.name
        table = pa.Table.from_pylist([{col: row[col] for col in contract.INVERSION_COLUMNS} for row in rows],
                                     arrow_schema(contract.INVERSION_COLUMNS))
        write_parquet(self.storage, contract.inversion_part_key(name, unit.shard_id), table)
        with tempfile.TemporaryDirectory(prefix="pgraft-invert-") as scratch:
            tar = Path(scratch) / f"{contract.shard_name(unit.shard_id)}.tar"
            record = write_shard(samples, tar, -1)
            commit_shard_at(self.storage, contract.inversion_shards_prefix(name), tar, record, unit.shard_id)
        return {"shard_id": unit.shard_id, "count": len(samples), "node_id": cluster.current_node_id()}


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
    pending = [u for u in units if u.shard_id not in committed]
    nodes: list[str] = []
    if pending:
        pool = cluster.start_workers(InvertWorker, cfg.invert.num_workers, cfg.model.device, "model.device",
                                     len(pending), cfg.model_dump(mode="json"), extra_resources=cfg.invert.resources,
                                     timeout_s=cfg.cluster.placement_timeout_s, max_restarts=cfg.cluster.max_restarts)

        def on_result(result: dict) -> None:
            if result["node_id"] not in nodes:
                nodes.append(result["node_id"])

        cluster.run_pool(pool, "run_unit", pending, on_result, f"invert {name}", progress)
    summary = summarize(storage, cfg, len(units), len(units) - len(pending), time.perf_counter() - start, nodes)
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
