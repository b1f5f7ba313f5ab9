"""The paper's headline config, configs/sd2-vqascore.yaml, never rots: with `--set` overrides that
point it at a tiny random SD 2 and a tiny random LLaVA-style VLM, both in a moto S3 bucket, a whole
round runs on CPU through the real loading code (models fetched from S3 by the actors)."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest

from pgraft.config import load_config
from pgraft.errors import ConfigError
from pgraft.report import render_report
from pgraft.storage import open_storage
from pgraft.tables import list_reward_parts, read_reward_table
from pipelines.pgraft_round import run_round_pipeline


def tiny_t2i_config(s3_uri, prompts_file, *extra):
    bucket = s3_uri.rsplit("/", 1)[0]
    return load_config("configs/sd2-vqascore.yaml", [
        f"run.uri={s3_uri}", f"task.dir={bucket}/models/t2i", "model.dtype=float32", "model.device=cpu",
        "model.num_inference_steps=4", f"generate.prompts={prompts_file}", "generate.samples_per_prompt=4",
        "generate.capture_steps=[2]", "generate.samples_per_shard=8", "generate.num_workers=1",
        "reward.num_workers=1", "reward.device=cpu", "filter.k=1", "filter.m=4", "train.t_step=2", "train.epochs=2",
        "train.batch_size=2", "train.num_workers=1", "train.lora_rank=2", "train.eval_samples_per_prompt=2", *extra,
    ])


@pytest.mark.deepspeed
def test_the_sd2_vqascore_config_runs_a_round_on_tiny_models_in_s3(ray_local, s3_uri, tiny_sd_factory, tmp_path):
    from tiny_models import save_tiny_vlm

    bucket = s3_uri.rsplit("/", 1)[0]
    models = open_storage(f"{bucket}/models/t2i")
    models.upload_folder(tiny_sd_factory("v_prediction"), "sd2")
    models.upload_folder(save_tiny_vlm(tmp_path / "vlm"), "vqa")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\ntwo cats on a sofa\n")
    cfg = tiny_t2i_config(s3_uri, prompts)
    assert (cfg.model.kind, cfg.reward.name, cfg.train.mode) == ("stable_diffusion", "vqascore", "lora")

    run_round_pipeline(cfg, progress=False)
    store = open_storage(cfg.run.uri)
    parts = list_reward_parts(store, 0, "vqascore")
    rewards = read_reward_table(store, [parts[k] for k in sorted(parts)]).table
    rows = duckdb.sql("SELECT prompt, count(*), min(reward), max(reward) FROM rewards GROUP BY prompt ORDER BY prompt").fetchall()
    assert [(p, n) for p, n, _, _ in rows] == [("a red apple", 4), ("two cats on a sofa", 4)]
    assert all(0 < lo <= hi < 1 for _, _, lo, hi in rows)
    selection = json.loads(store.get_bytes("round-000/filter/top_k-1/summary.json"))
    assert selection["rows_in"] == 8 and selection["rows_accepted"] == 2
    card = json.loads(store.get_bytes("round-000/train/top_k-1-t2/model/composite.json"))
    assert card["finetuned"] == "lora" and card["switch_step"] == 2
    assert store.exists("round-000/train/top_k-1-t2/model/lora/adapter.safetensors")
    evaluation = json.loads(store.get_bytes("round-000/eval/summary.json"))["variants"]
    for variant in evaluation.values():
        assert variant["samples"] == 4 and 0 < variant["reward_mean"] < 1
        assert variant["frechet_distance"] is None and variant["feature_space"] == "pixels (64×64)"
    page = render_report(cfg.run.uri)
    assert "data:image/png;base64," in page and "vqascore" in page
    assert "<td>two cats on a sofa</td>" in page  # sample grids are labelled with the prompts file's lines
    assert np.isfinite(rewards["reward"].to_numpy()).all()


def test_t2i_inputs_are_checked_before_any_actor_starts(s3_endpoint, s3_uri, tmp_path):
    from pipelines.pgraft_round import run_round_pipeline as run

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match=r"generate.prompts: prompts file '.*empty.txt' is empty"):
        run(tiny_t2i_config(s3_uri, empty), progress=False)
    with pytest.raises(ConfigError, match=r"generate.prompts: prompts file '.*missing.txt' does not exist"):
        run(tiny_t2i_config(s3_uri, tmp_path / "missing.txt"), progress=False)
