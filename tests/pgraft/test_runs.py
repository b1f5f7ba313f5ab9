"""`pgraft status RUN`: what each round and stage holds, complete or not, from storage alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.cli import main
from pgraft.runs import COMPLETE, MISSING, PARTIAL, NotARunError, read_run, render_rounds_table


def copy_run(two_round_run, tmp_path):
    cfg, _ = two_round_run
    return shutil.copytree(cfg.run.uri, tmp_path / "run")


def states(run, rnd):
    return {(s.stage, s.name): s.state for s in run.rounds[rnd].stages}


def test_a_finished_run_is_complete_everywhere_and_exits_0(two_round_run, capsys):
    cfg, _ = two_round_run
    run = read_run(cfg.run.uri)
    assert [r.round for r in run.rounds] == [0, 1] and run.last_round_complete
    for rnd in (0, 1):
        assert states(run, rnd) == {("generate", ""): COMPLETE, ("reward", "digits_alignment"): COMPLETE,
                                    ("filter", "best_of_n-4"): COMPLETE, ("train", "best_of_n-4-t3"): COMPLETE,
                                    ("evaluate", ""): COMPLETE}
    assert main(["status", cfg.run.uri]) == 0
    out = capsys.readouterr().out
    assert "2/2 shards, 16 samples planned" in out and "best_of_n n=4" in out and "last round 1: complete" in out


def test_a_half_finished_round_is_partial_and_exits_1(two_round_run, tmp_path, capsys):
    run_dir = copy_run(two_round_run, tmp_path)
    (run_dir / "round-001/generate/shard-000001.json").unlink()  # a shard whose commit record never landed
    (run_dir / "round-001/eval/summary.json").unlink()  # evaluation interrupted
    for ckpt in (run_dir / "round-001/train/best_of_n-4-t3").iterdir():
        if ckpt.name in ("summary.json", "model"):  # training interrupted after a checkpoint
            shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink()
    run = read_run(str(run_dir))
    assert not run.last_round_complete and run.rounds[0].complete
    assert states(run, 1) == {("generate", ""): PARTIAL, ("reward", "digits_alignment"): PARTIAL,
                              ("filter", "best_of_n-4"): COMPLETE, ("train", "best_of_n-4-t3"): PARTIAL,
                              ("evaluate", ""): PARTIAL}
    assert main(["status", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "1/2 shards" in out and "rerun train to resume" in out and "last round 1: incomplete" in out


def test_a_round_not_started_past_generate_lists_the_rest_missing(two_round_run, tmp_path):
    run_dir = copy_run(two_round_run, tmp_path)
    for stage in ("rewards", "filter", "train", "eval"):
        shutil.rmtree(run_dir / f"round-001/{stage}")
    run = read_run(str(run_dir))
    assert states(run, 1) == {("generate", ""): COMPLETE, ("reward", ""): MISSING, ("filter", ""): MISSING,
                              ("train", ""): MISSING, ("evaluate", ""): MISSING}


def test_a_round_the_pipeline_ran_without_evaluation_is_complete_without_one(two_round_run, tmp_path):
    run_dir = copy_run(two_round_run, tmp_path)
    record = json.loads((run_dir / "round-001/pipeline.json").read_text())
    del record["stages"]["evaluate"]  # as with --set train.eval_samples_per_prompt=0 for this round
    (run_dir / "round-001/pipeline.json").write_text(json.dumps(record))
    shutil.rmtree(run_dir / "round-001/eval")
    run = read_run(str(run_dir))
    assert run.last_round_complete and ("evaluate", "") not in states(run, 1)


def test_a_training_whose_selection_is_gone_does_not_complete_the_round(two_round_run, tmp_path):
    run_dir = copy_run(two_round_run, tmp_path)
    (run_dir / "round-001/filter/best_of_n-4/summary.json").unlink()  # the selection was being remade
    run = read_run(str(run_dir))
    assert states(run, 1)[("train", "best_of_n-4-t3")] == COMPLETE and not run.last_round_complete


def test_not_a_run_is_one_line_and_exits_2(tmp_path, capsys):
    with pytest.raises(NotARunError, match="is not a pgraft run"):
        read_run(str(tmp_path))
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a pgraft run (no config.yaml)" in err


def test_the_rounds_table_quotes_the_summaries(two_round_run):
    cfg, _ = two_round_run
    text = render_rounds_table(read_run(cfg.run.uri))
    summary = json.loads((Path(cfg.run.uri) / "round-001/eval/summary.json").read_text())
    ft = summary["variants"]["finetuned"]
    row = text.splitlines()[3]
    assert row.startswith("1 ") and f"{ft['reward_mean']:.3f} ± {ft['reward_stderr']:.3f}" in row
    assert f"{ft['frechet_distance']:.1f}" in row
