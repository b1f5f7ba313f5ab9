from __future__ import annotations

import pytest

from pgraft.config import Config, ConfigError, load_config, markdown_reference


def test_defaults_are_the_digits_task():
    cfg = load_config(None)
    assert cfg.model.kind == "class_unet" and cfg.task.name == "digits"
    assert cfg.generate.prompts[3] == "a handwritten digit 3"


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  uri: s3://b/p\n  seed: 3\ngenerate:\n  capture_steps: [15, 5]\n")
    cfg = load_config(path, ["generate.samples_per_prompt=8", "model.guidance_scale=1.5", "generate.capture_steps=[3,1]"])
    assert cfg.run.uri == "s3://b/p" and cfg.run.seed == 3
    assert cfg.generate.samples_per_prompt == 8 and cfg.model.guidance_scale == 1.5
    assert cfg.generate.capture_steps == [1, 3]  # sorted


@pytest.mark.parametrize("override, message", [
    ("generate.samples_per_promt=8", "config error: generate.samples_per_promt: unknown key"),
    ("generate.samples_per_prompt=-1", "config error: generate.samples_per_prompt: Input should be greater than or equal to 1 (got -1)"),
    ("model.kind=gan", "config error: model.kind:"),
    ("generate.capture_steps=[5,5]", "config error: generate.capture_steps: duplicate step indices in [5, 5]"),
    ("nosection.x=1", "config error: nosection: unknown key"),
    ("run.seed", "is not of the form key.path=value"),
    ("run.seed.x=1", "config error: run.seed: Input should be a valid integer"),
    ("task.pretrain_options={wdth: 16}", "config error: task.pretrain_options.wdth: task.pretrain_options.wdth is not an "
                                         "option of the digits task's pretraining; it takes classifier_epochs, ddpm_steps"),
    ("task.pretrain_options.width=wide", "config error: task.pretrain_options.width: task.pretrain_options.width takes "
                                         "a int, not 'wide'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_reference_lists_every_key():
    table = markdown_reference()
    for section, field in Config.model_fields.items():
        for name in field.annotation.model_fields:
            assert f"`{section}.{name}`" in table


def test_docs_config_reference_is_current():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md").read_text()
    assert markdown_reference() in doc, "regenerate docs/CONFIG.md with `python -m pgraft.config`"


def test_relative_locations_are_absolute_and_refused_inside_a_ray_job_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.uri=runs/x", "task.name=null", "model.path=/abs/model", "reward.name=clip_score", "reward.model_path=openai/clip"])
    out = cfg.with_absolute_paths()
    assert out.run.uri == str(tmp_path / "runs/x") and out.model.path == "/abs/model"
    assert out.reward.model_path == "openai/clip"  # not a local folder: a hub id stays as it is
    job_copy = tmp_path / "runtime_resources/working_dir_files/_ray_pkg_0123abcd"
    job_copy.mkdir(parents=True)
    monkeypatch.chdir(job_copy)  # where `ray job submit` runs the driver
    with pytest.raises(ConfigError, match=r"config error: run.uri: 'runs/x' is relative, and this job runs in Ray's "
                                          r"temporary copy of the working dir"):
        cfg.with_absolute_paths()
    assert load_config(None, ["run.uri=s3://b/run", "task.name=null", "model.path=s3://b/m", "reward.name=jpeg_compressibility"]).with_absolute_paths()


def test_every_config_field_has_an_identity_mark():
    from pgraft.config import identity_of

    unmarked = [f"{section}.{name}" for section, field in Config.model_fields.items()
                for name, inner in field.annotation.model_fields.items() if identity_of(inner) is None]
    assert not unmarked, f"fields without an identity mark (WHAT, HOW or PER_ROUND): {unmarked}"


def test_train_and_corrector_share_the_trainer_settings_with_their_own_defaults():
    from pgraft.config import CorrectorSection, TrainerSection, TrainSection, identity_of

    for section in (TrainSection, CorrectorSection):
        assert issubclass(section, TrainerSection)
        for name, base in TrainerSection.model_fields.items():
            field = section.model_fields[name]
            assert identity_of(field) == identity_of(base) and field.description.startswith(base.description)
            assert field.metadata[:1] == base.metadata[:1]  # the lower bound is the trainer's
    train, corrector = TrainSection(), CorrectorSection()
    assert (train.steps, train.batch_size, train.lr, train.checkpoint_every) == (400, 64, 1e-4, 100)
    assert (corrector.steps, corrector.batch_size, corrector.lr, corrector.checkpoint_every) == (2000, 256, 1e-3, 500)
    shared = {"micro_batch_size": None, "weight_decay": 0.0, "grad_clip": 1.0, "zero_stage": 0, "precision": "auto",
              "seed": 0, "num_workers": 1, "cpus_per_worker": None, "resources_per_worker": {}, "keep_checkpoints": 2,
              "max_failures": 2}
    assert {k: getattr(train, k) for k in shared} == shared == {k: getattr(corrector, k) for k in shared}
    TrainSection(zero_stage=3)
    with pytest.raises(ValueError, match="less than or equal to 2"):
        CorrectorSection(zero_stage=3)
    # The YAML keys stay in their sections.
    cfg = load_config(None, ["train.lr=0.5", "corrector.lr=0.25", "corrector.zero_stage=2"])
    assert (cfg.train.lr, cfg.corrector.lr, cfg.corrector.zero_stage) == (0.5, 0.25, 2)
    with pytest.raises(ConfigError, match="config error: corrector.zero_stage: Input should be less than or equal to 2"):
        load_config(None, ["corrector.zero_stage=3"])


def test_fingerprinted_trainer_settings_come_from_the_marks():
    from pgraft.config import CorrectorSection, TrainSection, identity_fields

    assert set(TrainSection.model_fields) - set(identity_fields(TrainSection(), "what")) == {
        "name", "cpus_per_worker", "resources_per_worker", "max_failures", "keep_checkpoints", "checkpoint_every",
        "eval_samples_per_prompt", "epochs"}
    assert set(CorrectorSection(kind="gaussian").fit_identity()) == {"kind", "include_unconverged", "covariance", "ridge"}
    assert set(CorrectorSection(kind="flow").fit_identity()) == {
        "kind", "include_unconverged", "covariance", "ridge", "channels", "layers_per_block", "sampling_steps",
        "coupling", "steps", "batch_size", "micro_batch_size", "lr", "weight_decay", "grad_clip", "zero_stage",
        "precision", "seed", "num_workers"}


@pytest.mark.parametrize("override, message", [
    ("reward.name=clip_score", "config error: reward.name: clip_score takes image samples, but the task makes smiles samples"),
    ("reward.hash=perceptual", "config error: reward.hash: perceptual takes image samples, but the task makes smiles samples"),
])
def test_a_reward_or_hash_for_images_on_molecules_is_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["task.name=molecules", override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_molecules_task_sets_its_own_defaults():
    cfg = load_config("configs/molecules.yaml")
    assert (cfg.model.kind, cfg.reward.name, cfg.reward.hash) == ("class_sequence", "qed", "canonical_smiles")
    assert load_config(None, ["task.name=molecules"]).model.kind == "class_sequence"
