"""Invert work: the input data of an inversion (the task's real data, or WebDataset tars) and
the worker that inverts one unit of it into a committed shard and a table part (docs/DESIGN.md
§5). The invert stage plans the units and drives these.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pgraft import contract
from pgraft.config import Config
from pgraft.errors import PgraftError
from pgraft.shards import LATENTS_EXT, Sample, commit_shard_at, write_shard
from pgraft.storage import open_storage
from pgraft.tables import arrow_schema, write_parquet


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
        if spec.real_data is None:
            raise InvertError(f"task {spec.name} has no real data to invert; set invert.data to a WebDataset location")
        return spec.real_data(cfg.invert.split, cfg.task.seed, cfg.task.dir)
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


# Worker -----------------------------------------------------------------------------------

class InvertWorker:
    """One per actor: loads the flow model once, then turns units into committed shards.
    (Without Ray: `InvertWorker(cfg_tree)(unit)` commits one unit's shard and table part.)"""

    def __init__(self, cfg_tree: dict):
        from pgraft.models.adapters import load_adapter

        self.cfg = Config.model_validate(cfg_tree)
        self.storage = open_storage(self.cfg.run.uri)
        # Φ is the base sampler itself: a noise corrector plays no part in inverting it.
        self.adapter = load_adapter(self.cfg.model.model_copy(update={"noise_corrector": None, "finetuned": None}))
        self.grid = self.adapter.euler_grid()
        # How a record's x_0 is decoded: a class-conditional model's card names its task, whose
        # decoding it is (pixels without one); a latent model's x_0 would need its VAE, so those
        # models' records carry no decoded sample.
        self.decode = getattr(self.adapter, "decode", None)
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

    def __call__(self, unit: InvertUnit) -> dict:
        import pyarrow as pa

        from pgraft.inversion import invert
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
            images = self.decode(x) if self.decode is not None else [None] * len(x)
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
                samples.append(Sample(meta, latents, images[i], self.adapter.sample_kind))
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
        return {"shard_id": unit.shard_id, "count": len(samples)}
