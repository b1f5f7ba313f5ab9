"""`pgraft` command line: thin wrappers; the logic lives in the stage and library modules."""

from __future__ import annotations

import argparse
import sys
import time

from pgraft.config import load_config
from pgraft.errors import PgraftError

# Errors that are the user's to fix: shown as one line, no traceback.
USER_ERRORS = (PgraftError, FileNotFoundError)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config (default: all defaults = the digits task)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set generate.samples_per_prompt=8 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


STAGES = ("generate", "reward", "filter", "train", "evaluate", "invert", "train-corrector")
# Stage-specific flags: (flag, keyword argument of the stage's run function, help).
STAGE_FLAGS = {
    "filter": [("--force", "force", "replace an existing selection of the same name made with other parameters"),
               ("--allow-partial", "allow_partial", "select from the reward parts that exist even if some shards lack one")],
}


def _stage_runner(name: str):
    import importlib

    module = name.replace("-", "_")  # `pgraft train-corrector` runs stages/train_corrector.py
    return getattr(importlib.import_module(f"stages.{module}"), f"run_{module}")


def _add_stage_args(parser: argparse.ArgumentParser, name: str) -> None:
    add_config_args(parser)
    for flag, _, help_text in STAGE_FLAGS.get(name, []):
        parser.add_argument(flag, action="store_true", help=help_text)


def run_stage(name: str, argv: list[str] | None = None) -> int:
    """Entry point shared by `pgraft <stage>` and `python -m stages.<stage>`."""
    parser = argparse.ArgumentParser(prog=f"pgraft {name}")
    _add_stage_args(parser, name)
    args = parser.parse_args(argv)
    return _guarded(name, lambda: _run_and_print(name, args))


def _run_and_print(name: str, args) -> None:
    cfg = load_config(args.config, args.overrides)
    flags = {kwarg: getattr(args, kwarg) for _, kwarg, _ in STAGE_FLAGS.get(name, [])}
    summary = _stage_runner(name)(cfg, progress=not args.quiet, **flags)
    print(summary.render())


def _guarded(name: str, fn) -> int:
    try:
        result = fn()
    except USER_ERRORS as exc:
        print(f"pgraft {name}: error: {exc}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0  # a command's own exit code (status: 1 = incomplete)


def _pretrain(args) -> None:
    from pgraft.tasks.digits import pretrain_and_publish

    start = time.perf_counter()
    summary = pretrain_and_publish(args.out, seed=args.seed, ddpm_steps=args.ddpm_steps, flow_steps=args.flow_steps,
                                   classifier_epochs=args.classifier_epochs,
                                   eval_samples_per_digit=args.eval_samples_per_digit, progress=not args.quiet)
    print(f"pretrain digits: wrote ddpm/, flow/, classifier/ under {args.out} in {time.perf_counter() - start:.0f} s")
    for key, value in summary.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


def _demo(args) -> None:
    from pgraft.report import write_report
    from pipelines.pgraft_round import run_round_pipeline

    cfg = load_config(args.config, args.overrides)
    run_round_pipeline(cfg, progress=not args.quiet)
    print(f"report: {write_report(cfg.run.uri)} (pgraft report {cfg.run.uri} writes it again; "
          f"pgraft status {cfg.run.uri} lists what each round holds)")


def _status(args) -> int:
    from pgraft.runs import read_run, render_status

    run = read_run(args.run)
    print(render_status(run))
    return 0 if run.last_round_complete else 1


def _report(args) -> None:
    from pgraft.report import write_report

    path = write_report(args.run, args.out, progress=not args.quiet)
    print(f"report: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgraft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="train a built-in task's base models and reward classifier")
    pre.add_argument("task", choices=["digits"])
    pre.add_argument("--out", required=True, help="folder or storage location (s3://…) for ddpm/, flow/, classifier/")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--ddpm-steps", type=int, default=800)
    pre.add_argument("--flow-steps", type=int, default=500)
    pre.add_argument("--classifier-epochs", type=int, default=30)
    pre.add_argument("--eval-samples-per-digit", type=int, default=50, help="0 skips the alignment measurement")
    pre.add_argument("--quiet", action="store_true")

    for stage in STAGES:
        _add_stage_args(sub.add_parser(stage, help=f"run the {stage} stage"), stage)

    demo = sub.add_parser("demo", help="run the round pipeline on the embedded default (pretrains digits if needed)")
    add_config_args(demo)

    status = sub.add_parser("status", help="per round and stage, what a run holds and whether it is complete")
    status.add_argument("run", help="the run's location (run.uri): a folder or s3://bucket/prefix")
    report = sub.add_parser("report", help="one self-contained HTML page of a run: rewards, selections, evaluation, samples")
    report.add_argument("run", help="the run's location (run.uri): a folder or s3://bucket/prefix")
    report.add_argument("--out", default=None, help="HTML file to write (default: RUN/report.html for a local run, "
                        "./<run name>-report.html for s3://)")
    report.add_argument("--quiet", action="store_true")

    args, rest = parser.parse_known_args(argv)
    if args.command in STAGES:
        return run_stage(args.command, (argv if argv is not None else sys.argv[1:])[1:])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "status":
        return _guarded("status", lambda: _status(args))
    if args.command == "report":
        return _guarded("report", lambda: _report(args))
    if args.command == "pretrain":
        return _guarded("pretrain", lambda: _pretrain(args))
    return _guarded("demo", lambda: _demo(args))


if __name__ == "__main__":
    sys.exit(main())
