"""Train-corrector stage on a real local Ray (a train group + DeepSpeed for the flow kind), and the
corrector in front of the generate stage's sampler."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from cluster import WorkerError
from pgraft import contract
from pgraft.config import load_config
from pgraft.models.adapters import ModelError, initial_noise
from pgraft.models.corrector import load_corrector
from pgraft.shards import Sample, commit_shard_at, list_committed, read_shard, write_shard
from pgraft.storage import open_storage
from stages.generate import run_generate
from stages.invert import run_invert
from stages.train_corrector import CorrectorError, run_train_corrector

SHIFT, SCALE = 0.7, 1.6


def corrector_config(model_path, uri, *extra):
    return load_config(None, [
        f"run.uri={uri}", f"model.path={model_path}", "model.num_inference_steps=4", "model.device=cpu",
        "model.guidance_scale=1.0", "invert.name=synthetic", "corrector.channels=[8,16]", "corrector.steps=30",
        "corrector.batch_size=64", "corrector.checkpoint_every=10", "corrector.sampling_steps=2", *extra,
    ])


def write_synthetic_inversion(uri, model_path, count=400, unconverged=20, seed=0):
    """An inversion whose converged inverse noises are SHIFT + SCALE·N(0, I); the non-converged
    ones are NaN, so using them would show."""
    store = open_storage(str(uri))
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count + unconverged):
        ok = i < count
        z = SHIFT + SCALE * torch.randn(1, 8, 8, generator=gen) if ok else torch.full((1, 8, 8), float("nan"))
        meta = contract.InversionMeta(key=contract.inversion_key(0, i), index=i, source="synthetic", prompt="",
                                      model=str(model_path), num_inference_steps=4, guidance_scale=1.0, iterations=4,
                                      max_step_iterations=1, converged=ok, residual=0.0, reconstruction_error=0.0)
        samples.append(Sample(meta, {contract.INITIAL_NOISE: z, contract.FINAL_LATENT: torch.zeros(1, 8, 8)}, None))
    with tempfile.TemporaryDirectory() as scratch:
        tar = Path(scratch) / "shard.tar"
        commit_shard_at(store, contract.inversion_shards_prefix("synthetic"), tar, write_shard(samples, tar, -1), 0)
    settings = {"model.path": str(model_path), "model.num_inference_steps": 4, "invert.conditional": False}
    store.put_bytes(contract.inversion_settings_key("synthetic"), json.dumps(settings).encode())
    store.put_bytes(contract.inversion_summary_key("synthetic"), b"{}")
    return store


@pytest.mark.parametrize("kind", ["gaussian", "flow"])
@pytest.mark.deepspeed
def test_corrector_learns_the_shift_and_scale_of_its_inverse_noises(ray_local, tiny_digits_flow, tmp_path, kind):
    cfg = corrector_config(tiny_digits_flow, tmp_path / "run", f"corrector.kind={kind}")
    write_synthetic_inversion(cfg.run.uri, cfg.model.path)
    summary = run_train_corrector(cfg, progress=False)
    assert (summary.kind, summary.samples, summary.left_out) == (kind, 400, 20)  # non-converged: counted, left out
    assert summary.steps == (30 if kind == "flow" else 0)
    corrector = load_corrector(summary.model_dir)
    assert corrector.card["base_model"] == str(tiny_digits_flow) and corrector.card["num_inference_steps"] == 4
    z = corrector.correct(torch.randn(4000, 1, 8, 8, generator=torch.Generator().manual_seed(9)))
    assert torch.isfinite(z).all()
    assert z.mean().item() == pytest.approx(SHIFT, abs=0.05)
    assert z.std().item() == pytest.approx(SCALE, abs=0.08)
    if kind == "flow":
        assert (tmp_path / "run" / "corrector" / "flow-synthetic" / "checkpoints" / "step0000030").is_dir()
    # A rerun with the same settings returns the finished corrector; other settings under the same name are refused.
    assert run_train_corrector(cfg, progress=False) == summary
    with pytest.raises(CorrectorError, match="was fitted to other inverse noises, with other settings or for another "
                                             "base model; use another corrector.name"):
        run_train_corrector(corrector_config(tiny_digits_flow, tmp_path / "run", f"corrector.kind={kind}",
                                             f"corrector.name={kind}-synthetic", "corrector.ridge=0.5"), progress=False)


@pytest.mark.deepspeed
def test_unconverged_inversions_only_when_asked(ray_local, tiny_digits_flow, tmp_path):
    cfg = corrector_config(tiny_digits_flow, tmp_path / "run", "corrector.kind=gaussian",
                           "corrector.include_unconverged=true")
    write_synthetic_inversion(cfg.run.uri, cfg.model.path)
    with pytest.raises(CorrectorError, match="the inverse noise of u000000_000400 is not finite"):
        run_train_corrector(cfg, progress=False)
    empty = corrector_config(tiny_digits_flow, tmp_path / "run2", "corrector.kind=gaussian")
    write_synthetic_inversion(empty.run.uri, empty.model.path, count=0)
    with pytest.raises(CorrectorError, match=r"has 0 usable inverse noises \(20 did not converge\)"):
        run_train_corrector(empty, progress=False)
    with pytest.raises(CorrectorError, match="is not a finished inversion; run `pgraft invert` with invert.name=other"):
        run_train_corrector(corrector_config(tiny_digits_flow, tmp_path / "run", "corrector.inversion=other"),
                            progress=False)


@pytest.mark.deepspeed
def test_invert_train_corrector_generate_end_to_end(ray_local, tiny_digits, tiny_digits_flow, tmp_path):
    from tiny_models import save_tiny_digits

    cfg = corrector_config(tiny_digits_flow, tmp_path / "run", "invert.name=digits", "invert.limit=64",
                           "invert.samples_per_shard=32", "invert.num_workers=1", "invert.tolerance=1e-4")
    inversion = run_invert(cfg, progress=False)
    assert inversion.samples == 64
    summary = run_train_corrector(cfg, progress=False)
    assert summary.samples == inversion.converged and summary.left_out == 64 - inversion.converged
    corrector_dir = summary.model_dir

    generate = [f"model.path={tiny_digits_flow}", "model.num_inference_steps=4", "model.device=cpu",
                "model.guidance_scale=1.0", f"model.noise_corrector={corrector_dir}", "generate.capture_steps=[2]",
                "generate.prompts=['', a handwritten digit 3]", "generate.samples_per_prompt=4",
                "generate.samples_per_shard=4", "generate.num_workers=1"]
    gen_cfg = load_config(None, [f"run.uri={tmp_path / 'run'}", *generate])
    run_generate(gen_cfg, progress=False)
    store = open_storage(gen_cfg.run.uri)
    samples = [s for sid, rec in list_committed(store, 0).items() for s in read_shard(store, 0, sid, rec)]
    assert len(samples) == 8 and {s.meta.noise_corrector for s in samples} == {corrector_dir}
    # x_T is the corrected z of each sample's own ε, and it is what the base flow started from.
    seeds = [s.meta.seed for s in samples]
    expected = load_corrector(corrector_dir).correct(initial_noise(seeds, (1, 8, 8)))
    stored = torch.stack([s.latents[contract.INITIAL_NOISE] for s in samples])
    assert torch.allclose(stored, expected, atol=1e-5)
    assert not torch.allclose(stored, initial_noise(seeds, (1, 8, 8)), atol=1e-2)

    # Another base: its weights are compared where they are loaded, so a worker stops with the one line.
    other_base = save_tiny_digits(tmp_path / "other-flow", "flow", seed=1)
    with pytest.raises(WorkerError, match=r"worker failed to start: model.noise_corrector .* was fitted for the base "
                                          r"model .* not model.path .*other-flow' \(their weights differ\)"):
        run_generate(load_config(None, [f"run.uri={tmp_path / 'bad'}", *generate, f"model.path={other_base}"]),
                     progress=False)
    # Bad input, one line each, before any worker starts.
    for overrides, message in [
        (["model.num_inference_steps=8"], "fitted to inversions with 4 Euler steps; model.num_inference_steps is 8"),
        ([f"model.path={tiny_digits}"], "noise_corrector is set, but model.path .* samples with DDIMScheduler .* needs "
                                        "a flow model"),
        ([f"model.noise_corrector={tiny_digits_flow}"], "is not a noise corrector folder"),
    ]:
        with pytest.raises(ModelError, match=message):
            run_generate(load_config(None, [f"run.uri={tmp_path / 'bad'}", *generate, *overrides]), progress=False)


def test_summary_round_trips(tmp_path):
    summary = contract.CorrectorSummary(name="n", kind="flow", inversion="i", samples=3, left_out=1, parameters=10,
                                        base_parameters=100, steps=5, resumed_from=0, final_loss=0.5, seconds=1.0,
                                        model_dir="m", fingerprint="f", nodes=["a"])
    back = contract.CorrectorSummary.from_json(json.dumps(asdict(summary)).encode(), "x")
    assert back == summary and "10.0% of the base model" in back.render()
