"""`pgraft` command line: thin wrappers built from the registries (stages, tasks); the logic
lives in the stage, pipeline and library modules.

    pgraft <stage> --config C [--set key=value ...]     one stage (stages/__init__.py lists them)
    pgraft pretrain <task> --out DIR                    a task's models (pgraft/tasks lists them)
    pgraft demo | status RUN | report RUN
"""

from __future__ import annotations

import argparse
import sys
import time

from pgraft.stagespec import add_config_args, guarded, stage_main
from stages import get_stage, known_stages


def _pretrain(argv: list[str]) -> int:
    """`pgraft pretrain TASK --out DIR [--seed N] [the task's own options]`."""
    from pgraft.tasks import get_task, known_tasks

    first = argparse.ArgumentParser(prog="pgraft pretrain", add_help=False)
    first.add_argument("task", nargs="?", help=f"a registered task ({', '.join(known_tasks())}) or a plug-in module:attr")
    known, _ = first.parse_known_args(argv)
    if known.task is None or known.task.startswith("-"):
        first.print_usage(sys.stderr)
        print(f"pgraft pretrain: error: name a task: {', '.join(known_tasks())} (or a plug-in module:attr)", file=sys.stderr)
        return 2
    try:
        spec = get_task(known.task)
    except Exception as exc:  # noqa: BLE001 - a user error: one line
        print(f"pgraft pretrain: error: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"pgraft pretrain {known.task}", description=spec.description)
    parser.add_argument("task")
    parser.add_argument("--out", required=True, help="folder or storage location (s3://…) for the task's models")
    parser.add_argument("--seed", type=int, default=0)
    for flag, (kind, default, help_text) in spec.pretrain_options.items():
        parser.add_argument(flag, type=kind, default=default, help=f"{help_text} (default {default})")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    options = {flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_"))
               for flag in spec.pretrain_options}

    def run() -> None:
        start = time.perf_counter()
        summary = spec.pretrain(args.out, seed=args.seed, progress=not args.quiet, **options)
        print(f"pretrain {spec.name}: wrote its models under {args.out} in {time.perf_counter() - start:.0f} s")
        for key, value in summary.items():
            print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")

    return guarded("pretrain", run)


def _demo(args) -> None:
    from pgraft.config import load_config
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in known_stages():  # a stage: only its own module is imported
        return stage_main(get_stage(argv[0]), argv[1:])
    if argv and argv[0] == "pretrain":
        return _pretrain(argv[1:])

    parser = argparse.ArgumentParser(prog="pgraft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in known_stages():
        sub.add_parser(stage, help=f"run the {stage} stage (pgraft {stage} --help)")
    sub.add_parser("pretrain", help="train a task's base models and reward weights (pgraft pretrain TASK --help)")
    demo = sub.add_parser("demo", help="run the round pipeline on the embedded default (pretrains the task if needed)")
    add_config_args(demo)
    status = sub.add_parser("status", help="per round and stage, what a run holds and whether it is complete")
    status.add_argument("run", help="the run's location (run.uri): a folder or s3://bucket/prefix")
    report = sub.add_parser("report", help="one self-contained HTML page of a run: rewards, selections, evaluation, samples")
    report.add_argument("run", help="the run's location (run.uri): a folder or s3://bucket/prefix")
    report.add_argument("--out", default=None, help="HTML file to write (default: RUN/report.html for a local run, "
                        "./<run name>-report.html for s3://)")
    report.add_argument("--quiet", action="store_true")

    args = parser.parse_args(argv)
    commands = {"status": _status, "report": _report, "demo": _demo}
    return guarded(args.command, lambda: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
