"""What a stage declares about itself (docs/DESIGN.md §8), and the one command line every stage runs.

Each stage module defines `STAGE = StageSpec(...)`: its name, its run function, its own
command-line flags and the kinds of artifact (pgraft.artifacts) it reads and writes. The
registry in `stages/__init__.py` finds them by name; the `pgraft` command line and the round
pipeline are built from the registry, and `python -m stages.<name>` runs `stage_main` here,
so no stage imports the command line or another stage.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from pgraft.errors import PgraftError

# Errors that are the user's to fix: shown as one line, no traceback.
USER_ERRORS = (PgraftError, FileNotFoundError)


@dataclass(frozen=True)
class Flag:
    """A stage's own on/off command-line flag, passed to its run function as `keyword=True`."""

    flag: str  # e.g. --force
    keyword: str  # the run function's keyword argument
    help: str


@dataclass(frozen=True)
class StageSpec:
    name: str  # the command (`pgraft <name>`) and the name in pipeline records
    run: Callable[..., Any]  # run(cfg, progress=True, **flags) -> a summary (pgraft.artifacts.Summary)
    description: str  # one line for `pgraft --help`
    reads: tuple[str, ...]  # artifact kinds it needs (pgraft.artifacts.ARTIFACTS keys; "task" = the task's models)
    writes: tuple[str, ...]  # artifact kinds it produces
    flags: tuple[Flag, ...] = ()
    applies: Callable[[Any], bool] = field(default=lambda cfg: True)  # whether a round pipeline runs it for cfg


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config (default: all defaults = the default task)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set generate.samples_per_prompt=8 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def stage_parser(spec: StageSpec, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog=f"pgraft {spec.name}", description=spec.description)
    add_config_args(parser)
    for flag in spec.flags:
        parser.add_argument(flag.flag, dest=flag.keyword, action="store_true", help=flag.help)
    return parser


def guarded(name: str, fn: Callable[[], Any]) -> int:
    """Run a command; a user error is one line on stderr and exit code 2."""
    try:
        result = fn()
    except USER_ERRORS as exc:
        print(f"pgraft {name}: error: {exc}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0  # a command's own exit code (status: 1 = incomplete)


def run_stage(spec: StageSpec, cfg, progress: bool = True, **flags):
    """Run a stage holding the lease on its output (pgraft.lease): a second driver of the same
    stage, round and run waits for this one, or stops with one line naming it. Every driver
    (the `pgraft` command line, `python -m stages.<name>`, the round pipeline) runs stages here."""
    from pgraft import contract
    from pgraft.lease import Lease
    from pgraft.storage import open_storage

    section = cfg.storage
    storage = open_storage(cfg.with_absolute_paths().run.uri)
    with Lease(storage, contract.lease_key(cfg.run.round, spec.name), f"{spec.name} round {cfg.run.round} of "
               f"{storage.uri}", section.lease_ttl_s, section.lease_wait_s):
        return spec.run(cfg, progress=progress, **flags)


def stage_main(spec: StageSpec, argv: list[str] | None = None) -> int:
    """`pgraft <stage>` and `python -m stages.<stage>`: load the config, run, print the summary."""
    from pgraft.config import load_config

    args = stage_parser(spec).parse_args(argv)

    def run() -> None:
        cfg = load_config(args.config, args.overrides)
        flags = {flag.keyword: getattr(args, flag.keyword) for flag in spec.flags}
        print(run_stage(spec, cfg, progress=not args.quiet, **flags).render())

    return guarded(spec.name, run)
