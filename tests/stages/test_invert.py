"""Invert stage on a real local Ray: a tiny flow model, the task's digits and a WebDataset input."""

from __future__ import annotations

import io
import json

import duckdb
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pgraft import contract
from pgraft.config import load_config
from pgraft.inversion import euler_sample, rms
from pgraft.models.adapters import ModelError, load_adapter
from pgraft.shards import iter_tar_samples, list_committed_at, read_shard_bytes_at
from pgraft.storage import open_storage
from stages.invert import InvertError, run_invert


def invert_config(model_path, uri, *extra):
    return load_config(None, [
        f"run.uri={uri}", f"model.path={model_path}", "model.num_inference_steps=4", "model.device=cpu",
        "model.guidance_scale=1.0", "invert.limit=40", "invert.samples_per_shard=16", "invert.batch_size=8",
        "invert.num_workers=1", "invert.tolerance=1e-5", "invert.max_iterations=40", *extra,
    ])


def read_records(store, name):
    prefix = contract.inversion_shards_prefix(name)
    out = []
    for sid, record in sorted(list_committed_at(store, prefix).items()):
        data = read_shard_bytes_at(store, prefix, sid, record, "rerun")
        out.extend(iter_tar_samples(data, prefix, ("latents.safetensors", "json"), meta_cls=contract.InversionMeta))
    return out


def test_invert_task_digits_then_resume_only_the_missing_unit(ray_local, warm_pools, tiny_digits_flow, tmp_path):
    cfg = invert_config(tiny_digits_flow, tmp_path / "run")
    summary = run_invert(cfg, progress=False)
    assert (summary.samples, summary.shards, summary.skipped) == (40, 3, 0)
    store = open_storage(cfg.run.uri)
    records = read_records(store, "digits-train")
    assert len(records) == 40 and len({r.key for r in records}) == 40
    # Each record's x_T is Φ⁻¹ of its x_0: the forward Euler sampler lands back on x_0.
    adapter = load_adapter(cfg.model)
    velocity, grid = adapter.velocity_field([""] * 40, 1.0), adapter.euler_grid()
    z = torch.stack([r.latents[contract.INITIAL_NOISE] for r in records])
    x = torch.stack([r.latents[contract.FINAL_LATENT] for r in records])
    errors = rms(euler_sample(velocity, z, grid) - x)
    recorded = torch.tensor([r.meta.reconstruction_error for r in records])
    assert torch.allclose(errors, recorded, atol=1e-6)
    assert (errors[torch.tensor([r.meta.converged for r in records])] < 1e-3).all()
    from pgraft.tasks.digits import real_data

    real, _ = real_data("train")
    assert torch.equal(x, real[:40])  # the data, as the model sees it, in data-set order
    # The Parquet table (read back by DuckDB) agrees with the shards and the summary.
    parts = str(tmp_path / "run" / "inversion" / "digits-train" / "table" / "*.parquet")
    n, converged, worst = duckdb.sql(f"select count(*), sum(converged::int), max(reconstruction_error) "
                                     f"from '{parts}'").fetchall()[0]
    assert (n, converged) == (40, summary.converged) and worst == pytest.approx(summary.reconstruction_error_max)
    assert summary.converged == sum(r.meta.converged for r in records)

    prefix = contract.inversion_shards_prefix("digits-train")
    before = {sid: store.get_bytes(contract.shard_key_at(prefix, sid)) for sid in range(3)}
    store.delete(contract.commit_key_at(prefix, 1))
    again = run_invert(cfg, progress=False)
    assert (again.samples, again.skipped) == (40, 2)  # only the uncommitted unit was redone
    after = {sid: store.get_bytes(contract.shard_key_at(prefix, sid)) for sid in range(3)}
    assert after == before  # byte-identical redo

    with pytest.raises(InvertError, match=r"was made with invert.tolerance=1e-05, this config has 0.01; use another "
                                          r"invert.name"):
        run_invert(invert_config(tiny_digits_flow, tmp_path / "run", "invert.tolerance=0.01"), progress=False)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_webdataset(folder, shape=(8, 8), count=6, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "data-000000.tar", "wb") as f:
        writer = wds.TarWriter(f)
        for i in range(count):
            writer.write({"__key__": f"img{i:03d}", "png": _png(rng.integers(0, 256, shape, dtype=np.uint8)),
                          "json": json.dumps({"prompt": f"a handwritten digit {i % 3}"}).encode(),
                          "cls": b"7"})  # a member the stage does not read
        writer.close()
    return folder


def test_invert_a_webdataset_conditionally(ray_local, tiny_digits_flow, tmp_path):
    data = write_webdataset(tmp_path / "data")
    cfg = invert_config(tiny_digits_flow, tmp_path / "run", f"invert.data={data}", "invert.conditional=true",
                        "invert.name=mine", "model.guidance_scale=2.0")
    summary = run_invert(cfg, progress=False)
    assert (summary.samples, summary.conditional) == (6, True)
    records = read_records(open_storage(cfg.run.uri), "mine")
    assert [r.meta.prompt for r in records] == [f"a handwritten digit {i % 3}" for i in range(6)]
    assert {r.meta.guidance_scale for r in records} == {2.0}
    assert records[0].meta.source.endswith("data/data-000000.tar")
    # Conditional: the velocity of each record's own prompt maps its noise back to it.
    adapter = load_adapter(cfg.model)
    z = torch.stack([r.latents[contract.INITIAL_NOISE] for r in records])
    x = torch.stack([r.latents[contract.FINAL_LATENT] for r in records])
    guided = adapter.velocity_field([r.meta.prompt for r in records], 2.0)
    assert (rms(euler_sample(guided, z, adapter.euler_grid()) - x) < 2e-3).all()
    unguided = adapter.velocity_field([""] * 6, 1.0)
    assert rms(euler_sample(unguided, z, adapter.euler_grid()) - x).mean() > 1e-3  # the condition mattered


def test_invert_bad_input_is_one_line(ray_local, tiny_digits, tiny_digits_flow, tmp_path):
    with pytest.raises(ModelError, match=r"pgraft invert inverts a flow sampler, but model.path .* samples with "
                                         r"DDIMScheduler .* inverse noise correction needs a flow model"):
        run_invert(invert_config(tiny_digits, tmp_path / "run"), progress=False)
    wrong = write_webdataset(tmp_path / "wrong", shape=(16, 16))
    with pytest.raises(InvertError, match=r"record img000 of .*data-000000.tar has shape \(1, 16, 16\); the model takes "
                                          r"\(1, 8, 8\)"):
        run_invert(invert_config(tiny_digits_flow, tmp_path / "run2", f"invert.data={wrong}"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvertError, match="holds no .tar shards"):
        run_invert(invert_config(tiny_digits_flow, tmp_path / "run3", f"invert.data={tmp_path / 'empty'}"),
                   progress=False)


def test_cli_one_line_errors_before_any_worker(tiny_digits, tmp_path, capsys):
    from pipelines.cli import main as cli_main

    args = ["--set", f"run.uri={tmp_path / 'run'}", "--set", f"model.path={tiny_digits}", "--quiet"]
    assert cli_main(["invert", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "inverse noise correction needs a flow model" in err
    assert cli_main(["train-corrector", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pgraft train-corrector: error:") and "flow model" in err
    assert cli_main(["generate", *args, "--set", f"model.noise_corrector={tmp_path}"]) == 2
    assert "needs a flow model" in capsys.readouterr().err


def test_invert_a_webdataset_on_s3(ray_local, tiny_digits_flow, s3_uri, tmp_path):
    data = write_webdataset(tmp_path / "data", count=5)
    location = f"{s3_uri.rsplit('/', 1)[0]}/webdataset"
    open_storage(location).upload_folder(data, "")
    cfg = invert_config(tiny_digits_flow, s3_uri, f"invert.data={location}", "invert.name=from-s3",
                        "invert.num_workers=1")
    summary = run_invert(cfg, progress=False)
    assert summary.samples == 5 and summary.location == f"{s3_uri}/inversion/from-s3"
    records = read_records(open_storage(s3_uri), "from-s3")
    assert [r.meta.source for r in records] == [f"{location}/data-000000.tar"] * 5
