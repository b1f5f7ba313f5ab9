"""The round pipeline end to end, and the method check: one P-GRAFT round on digits must raise
the mean reward of fresh samples, by a margin a t-test finds clear."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
from scipy import stats

from helpers import two_round_config
from pgraft import contract
from pgraft.config import load_config
from pgraft.errors import ConfigError, PgraftError
from pgraft.shards import list_committed, read_shard
from pgraft.storage import open_storage
from pgraft.tasks.digits import pretrain_digits
from pipelines.pgraft_round import run_round_pipeline

# The method check's sizes (README, "Developing"): the base's pretraining steps, and the fresh
# samples per prompt of each evaluated variant (10 prompts). Measured on the embedded default's
# denoiser at seeds 0 and 1 (500 samples a variant): effect sizes d = 0.45 and 0.25. The smallest
# count with power ≥ 0.99 at p < 1e-3 for the weaker one is 2·((3.09 + 2.33) / 0.25)² = 940 a
# variant, hence 100 per prompt (at seed 0, which the test runs, 500 gave p = 1.6e-12).
BASE_STEPS = 400
EVAL_PER_PROMPT = 100


def test_two_rounds_second_samples_from_the_first_model(two_round_run):
    cfg, results = two_round_run
    tmp_path = Path(cfg.run.uri).parent
    assert [r["round"] for r in results] == [0, 1]
    store = open_storage(cfg.run.uri)
    round1 = list_committed(store, 1)
    meta = read_shard(store, 1, 0, round1[0], wanted=("json",))[0].meta
    first = cfg.model_copy(deep=True)
    first.run.round = 0
    assert meta.finetuned == first.trained_model() and meta.round == 1
    card = json.loads((tmp_path / "run/round-001/train/best_of_n-4-t3/model/composite.json").read_text())
    assert card["switch_step"] == 3
    trained = json.loads((tmp_path / "run/round-001/train/best_of_n-4-t3/summary.json").read_text())
    assert trained["samples"] == 4 and trained["steps"] == 2  # train.epochs=2 over 4 accepted latents, batch 4
    # Evaluation ran in actors and left Parquet tables and a summary per round.
    for rnd in (0, 1):
        summary = json.loads((tmp_path / f"run/round-{rnd:03d}/eval/summary.json").read_text())
        assert set(summary["variants"]) == {"base", "finetuned"}
        for name, variant in summary["variants"].items():
            held = variant.get("reused_from_round", rnd)  # the round whose eval/<name>/ holds the samples
            table = tmp_path / f"run/round-{held:03d}/eval/{name}/round-000/rewards/digits_alignment/*.parquet"
            mean, n = duckdb.sql(f"SELECT avg(reward), count(*) FROM '{table}'").fetchall()[0]
            assert n == 8 and variant["samples"] == 8 and variant["reward_mean"] == pytest.approx(mean)
            assert variant["frechet_distance"] > 0 and variant["diversity"] > 0
            assert set(variant["per_prompt_mean"]) == {"0", "1"}
        record = json.loads((tmp_path / f"run/round-{rnd:03d}/pipeline.json").read_text())
        assert set(record["stages"]) == {"generate", "reward", "filter", "train", "evaluate"}
    # Fresh seeds are the same for both variants and every round, so the base, the same in every round,
    # is evaluated once per run: round 1 reuses round 0's figures and samples nothing for it.
    evals = [json.loads((tmp_path / f"run/round-{r:03d}/eval/summary.json").read_text())["variants"] for r in (0, 1)]
    assert evals[1]["base"] == {**evals[0]["base"], "reused_from_round": 0}
    assert store.list("round-000/eval/base/round-000/generate") and not store.list("round-001/eval/base")


def test_rerun_after_completion_redoes_nothing_and_keeps_earlier_rounds(two_round_run):
    cfg, _ = two_round_run
    store = open_storage(cfg.run.uri)

    def contents():  # the records of when the stages ran (pipeline.json, the evaluation's seconds) aside
        return {k: store.get_bytes(k) for k in store.list("")
                if not k.endswith(("pipeline.json", "eval/summary.json"))}

    before = contents()
    run_round_pipeline(cfg, progress=False)
    assert contents() == before


def test_a_round_whose_previous_round_has_no_model_is_one_line(ray_local, tiny_digits, classifier_dir, tmp_path):
    cfg = two_round_config(tmp_path / "run", tiny_digits, classifier_dir, "run.round=1", "run.rounds=1")
    with pytest.raises(PgraftError, match=r"round 0 of .* has no fine-tuned model at .*round-000/train/best_of_n-4-t3/model; "
                                          r"run round 0 first"):
        run_round_pipeline(cfg, progress=False)
    assert not (tmp_path / "run/round-001").exists()


@pytest.mark.deepspeed
def test_one_pgraft_round_raises_the_reward_of_fresh_samples(ray_local, tmp_path):
    """Method check, docs/DESIGN.md §6 at small scale: the embedded default's digits denoiser,
    briefly trained (BASE_STEPS), 640 samples, best-of-8, P-GRAFT at step 15 of 20 (t = 200),
    200 steps at lr 3e-4. Statistic: Welch's one-sided t-test on the prompt alignment of
    10 × EVAL_PER_PROMPT fresh samples from the composite sampler against as many from the base
    (fresh seeds, never used in training), drawn and scored by the evaluate stage's actors;
    required p < 1e-3."""
    models = tmp_path / "models"
    cfg = load_config("configs/digits.yaml", [
        f"run.uri={tmp_path / 'run'}", f"task.dir={models}", f"task.pretrain_options.ddpm_steps={BASE_STEPS}",
        "generate.samples_per_prompt=64", "generate.capture_steps=[15]", "filter.n=8",
        "train.t_step=15", "train.epochs=null", "train.steps=200", "train.lr=3e-4",
        f"train.eval_samples_per_prompt={EVAL_PER_PROMPT}",
    ])
    # The embedded default's denoiser (task.pretrain_options), briefly trained.
    pretrain_digits(models, seed=0, flow_steps=0, classifier_epochs=20, progress=False, bases="ddpm",
                    **dict(cfg.task.pretrain_options, eval_samples_per_digit=0))
    run_round_pipeline(cfg, progress=False)
    store = open_storage(cfg.run.uri)

    def rewards(variant):
        table = store.local_path(f"{contract.eval_prefix(0, variant)}/round-000/rewards/digits_alignment")
        return duckdb.sql(f"SELECT reward FROM '{table}/*.parquet' ORDER BY key").fetchnumpy()["reward"]

    base, after = rewards("base"), rewards("finetuned")
    assert len(base) == len(after) == 10 * EVAL_PER_PROMPT
    test = stats.ttest_ind(after, base, equal_var=False, alternative="greater")
    print(f"base {base.mean():.3f} → P-GRAFT {after.mean():.3f}, Welch p = {test.pvalue:.2e}")
    assert after.mean() > base.mean() and test.pvalue < 1e-3
    assert np.isfinite(after).all()


@pytest.mark.deepspeed
def test_one_molecules_round_through_every_stage(ray_local, tiny_molecules, tmp_path):
    """A round of the molecules config on a tiny random model: SMILES in the shards (with RDKit
    views), canonical-SMILES hashes and QED in the reward table, best-of-8 after dedup, a trained
    composite, and the task's metrics in the evaluation and the report."""
    from rdkit import Chem

    from pgraft.report import render_report

    cfg = load_config("configs/molecules.yaml", [
        f"run.uri={tmp_path / 'run'}", "task.pretrain=false", f"model.path={tiny_molecules}",
        "model.num_inference_steps=4", "generate.samples_per_prompt=32", "generate.samples_per_shard=16",
        "generate.num_workers=1",
        "generate.capture_steps=[2]", "generate.store_views=true", "train.t_step=2", "train.epochs=1",
        "train.batch_size=2", "train.eval_samples_per_prompt=8",
    ])
    run_round_pipeline(cfg, progress=False)
    store = open_storage(cfg.run.uri)
    samples = [s for sid, rec in list_committed(store, 0).items() for s in read_shard(store, 0, sid, rec)]
    assert len(samples) == 32 and all(s.kind == "smiles" and Chem.MolFromSmiles(s.decoded) for s in samples)
    assert all(s.view.ndim == 3 for s in samples) and samples[0].latents["x_2"].shape == (32, 16)
    table = f"{tmp_path}/run/round-000/rewards/qed/*.parquet"
    rows = duckdb.sql(f"SELECT key, sample_hash, reward, qed FROM '{table}' ORDER BY key").fetchall()
    decoded = {s.key: s.decoded for s in samples}
    assert [h for _, h, _, _ in rows] == [Chem.MolToSmiles(Chem.MolFromSmiles(decoded[k])) for k, *_ in rows]
    assert all(0 < r == q < 1 for _, _, r, q in rows)
    selection = json.loads((tmp_path / "run/round-000/filter/best_of_n-8-dedup/summary.json").read_text())
    assert selection["rows_in"] == 32 and selection["rows_accepted"] == 4  # every group of 8 gives one molecule
    evaluation = json.loads((tmp_path / "run/round-000/eval/summary.json").read_text())["variants"]
    for variant in evaluation.values():
        assert variant["task_metrics"]["validity"] == 1.0 and variant["frechet_distance"] > 0
    page = render_report(cfg.run.uri)
    assert "round0.eval.finetuned.task_metrics.novelty" in page and "internal diversity" in page


@pytest.mark.deepspeed
def test_one_layout_round_through_every_stage(ray_local, tmp_path):
    """A round of the layout config on a tiny random model and a corpus built from a COCO file the
    test writes: layouts in the shards, quality terms in the reward table, best-of-4, a trained
    composite, the quality terms and the encoder's Fréchet distance in the evaluation, boxes drawn
    in the report."""
    from pgraft.report import render_report
    from pgraft.tasks.layout.data import CLASSES
    from pgraft.tasks.layout.task import CORPUS, read_source, save_corpus
    from tiny_models import save_tiny_layout

    rng = np.random.default_rng(0)
    annotations, images = [], []
    for page in range(40):
        images.append({"id": page, "width": 100, "height": 140, "file_name": f"p{page}.png"})
        for k in range(3):
            y = 10 + 40 * k + rng.integers(0, 5)
            annotations.append({"id": len(annotations), "image_id": page, "category_id": 1 + (k == 0),
                                "bbox": [10, int(y), 80, 30]})
    coco = tmp_path / "ann.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}))
    task_dir = save_tiny_layout(tmp_path / "task")
    save_corpus(*read_source(coco), task_dir / CORPUS)

    cfg = load_config("configs/layout.yaml", [
        f"run.uri={tmp_path / 'run'}", "task.pretrain=false", f"task.dir={task_dir}", "model.num_inference_steps=4",
        "generate.prompts=[title text text]", "generate.samples_per_prompt=16", "generate.samples_per_shard=8",
        "generate.num_workers=1",
        "generate.capture_steps=[2]", "filter.n=4", "train.t_step=2", "train.epochs=1", "train.batch_size=2",
        "train.eval_samples_per_prompt=8",
    ])
    run_round_pipeline(cfg, progress=False)
    store = open_storage(cfg.run.uri)
    samples = [s for sid, rec in list_committed(store, 0).items() for s in read_shard(store, 0, sid, rec)]
    assert len(samples) == 16 and all(s.kind == "layout" and s.decoded["classes"] == ["title", "text", "text"]
                                      for s in samples)
    assert samples[0].latents["x_2"].shape == (16, 4)  # 16 element rows of (x, y, w, h)
    table = f"{tmp_path}/run/round-000/rewards/layout_quality/*.parquet"
    rows = duckdb.sql(f"SELECT reward, overlap, alignment, out_of_page FROM '{table}'").fetchall()
    assert len(rows) == 16 and all(r == pytest.approx(-(o + 10 * a + p)) for r, o, a, p in rows)
    selection = json.loads((tmp_path / "run/round-000/filter/best_of_n-4/summary.json").read_text())
    assert selection["rows_accepted"] == 4
    evaluation = json.loads((tmp_path / "run/round-000/eval/summary.json").read_text())["variants"]
    for variant in evaluation.values():
        assert set(variant["task_metrics"]) == {"overlap", "alignment", "out_of_page"}
        assert variant["frechet_distance"] > 0 and variant["feature_space"] == "layout encoder"
    page = render_report(cfg.run.uri)
    assert "<td>title text text</td>" in page and "round0.eval.finetuned.task_metrics.alignment" in page


def test_the_pipeline_pretrains_only_the_base_the_run_samples_from(tmp_path):
    from pipelines.pgraft_round import base_to_pretrain

    task = tmp_path / "models"
    assert base_to_pretrain(load_config("configs/digits.yaml", [f"task.dir={task}"])) == "ddpm"  # model.path's default
    assert base_to_pretrain(load_config("configs/digits.yaml", [f"task.dir={task}"]).with_absolute_paths()) == "ddpm"
    assert base_to_pretrain(load_config("configs/digits.yaml", [f"task.dir={task}", f"model.path={task}/flow/"])) == "flow"
    assert base_to_pretrain(load_config(None, ["task.dir=s3://b/models", "model.path=s3://b/models/flow"])) == "flow"
    assert base_to_pretrain(load_config(None, [f"task.dir={task}", f"model.path={tmp_path / 'mine'}"])) is None


def test_models_pretrained_with_other_options_are_refused_not_mixed(tmp_path):
    from pipelines.pgraft_round import check_pretrain_options

    (tmp_path / "summary.json").write_text(json.dumps({"pretrain_options": {"width": 32, "ddpm_steps": 800}}))
    cfg = load_config("configs/digits.yaml", [f"task.dir={tmp_path}"])  # the embedded default asks for width 16
    with pytest.raises(ConfigError, match=r"^config error: task.pretrain_options.width: the models in \S+ were "
                                          r"pretrained with width=32, not 16; point task.dir at another folder"):
        check_pretrain_options(cfg)
    check_pretrain_options(load_config(None, [f"task.dir={tmp_path}", "task.pretrain_options={width: 32}"]))
    # A set from before summaries recorded their options: the keys it has at the top level count.
    (tmp_path / "summary.json").write_text(json.dumps({"ddpm_steps": 800, "flow_steps": 500}))
    check_pretrain_options(load_config(None, [f"task.dir={tmp_path}", "task.pretrain_options={ddpm_steps: 800}"]))
    with pytest.raises(ConfigError, match="ddpm_steps=800, not 200"):
        check_pretrain_options(load_config(None, [f"task.dir={tmp_path}", "task.pretrain_options={ddpm_steps: 200}"]))
