"""Evaluate stage: fresh seeds from run.seed alone; samples of another setting or another
model are refused with the key to change, never mixed or reused. (End to end: the round
pipeline tests.)"""

from __future__ import annotations

import shutil

import pytest
import yaml

from pgraft import contract
from pgraft.config import load_config
from pgraft.storage import open_storage
from stages.evaluate import EvaluateError, check_variant, eval_seed, variant_config


def config(uri, model, *extra):
    return load_config(None, [f"run.uri={uri}", f"model.path={model}", "task.pretrain=false", *extra])


def test_variant_runs_share_seeds_and_take_no_latents(tiny_digits, tmp_path):
    cfg = config(tmp_path / "run", tiny_digits, "run.round=3", "train.eval_samples_per_prompt=7")
    base = variant_config(cfg, "base", None)
    tuned = variant_config(cfg, "finetuned", "somewhere/model")
    assert base.run.seed == tuned.run.seed == eval_seed(0) != eval_seed(1)
    assert base.run.uri.endswith("round-003/eval/base") and base.run.round == 0
    assert base.generate.capture_steps == [] and base.generate.samples_per_prompt == 7
    assert tuned.model.finetuned == "somewhere/model" and base.model.finetuned is None


def test_other_sample_count_or_model_is_refused(tiny_digits, tmp_path):
    cfg = config(tmp_path / "run", tiny_digits, "train.eval_samples_per_prompt=4")
    store = open_storage(cfg.run.uri)
    model = tmp_path / "tuned"
    shutil.copytree(tiny_digits, model)
    check_variant(store, cfg, "finetuned", str(model))  # first time: records the model
    store.put_bytes(f"{contract.eval_prefix(0, 'finetuned')}/config.yaml",
                    yaml.safe_dump({"generate": {"samples_per_prompt": 4}}).encode())
    check_variant(store, cfg, "finetuned", str(model))  # same model, same count: fine
    more = config(tmp_path / "run", tiny_digits, "train.eval_samples_per_prompt=8")
    with pytest.raises(EvaluateError, match=r"holds samples made with another train.eval_samples_per_prompt \(4, now 8\)"):
        check_variant(store, more, "finetuned", str(model))
    (model / "unet" / "config.json").write_text("{}")  # retrained
    with pytest.raises(EvaluateError, match="holds samples of an earlier finetuned model"):
        check_variant(store, cfg, "finetuned", str(model))
