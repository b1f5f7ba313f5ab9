"""What a stage declares about itself (docs/DESIGN.md §8), and the one command line every stage runs.

Each stage module defines `STAGE = StageSpec(...)`: its name, its run function, its own
command-line flags and the kinds of artifact (pgraft.artifacts) it reads and writes. The
registry in `stages/__init__.py` finds them by name; the `pgraft` command line and the round
pipeline are built from the registry, and `python -m stages.<name>` runs `stage_main` here,
so no stage imports the command line or another stage.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from pgraft.errors import PgraftError

# Errors that are the user's to fix: shown as one line, no traceback. Every OSError counts (a file
# missing, a permission refused, a working directory removed): its line says what failed.
USER_ERRORS = (PgraftError, OSError)


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


def _working_directory_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def raised_at(exc: BaseException) -> str:
    """The innermost frame of `exc`'s traceback as 'function (file:line)'; '' without a traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.name} ({os.path.basename(frame.filename)}:{frame.lineno})"


def os_error_message(exc: OSError) -> str:
    """What an OSError failed on, in one line. Its bare text can be just '[Errno 2] No such file or
    directory', which names nothing (os.getcwd after the working directory was removed), so: the
    file(s) the error carries; else, when the working directory is gone, that; else where it was
    raised (function, file:line)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, OSError):  # Ray's wrapper of a worker's error (an OSError itself, its text a traceback)
        exc = cause
    lines = [line for line in str(exc).splitlines() if line.strip()]
    reason = exc.strerror or (lines[-1] if lines else exc.__class__.__name__)
    names = [os.fsdecode(n) if isinstance(n, (str, bytes, os.PathLike)) else str(n)
             for n in (exc.filename, exc.filename2) if n is not None]
    if names:
        return f"{reason}: " + " -> ".join(repr(n) for n in names)
    where = raised_at(exc)
    if isinstance(exc, FileNotFoundError) and _working_directory_gone():
        return (f"the working directory no longer exists ({reason}" + (f", in {where}" if where else "")
                + "); run the command from a folder that exists")
    return f"{reason} (in {where})" if where else reason


def error_line(exc: BaseException) -> str:
    """The one line a user error is shown as."""
    return os_error_message(exc) if isinstance(exc, OSError) else str(exc)


def guarded(name: str, fn: Callable[[], Any]) -> int:
    """Run a command; a user error is one line on stderr and exit code 2."""
    try:
        result = fn()
    except USER_ERRORS as exc:
        print(f"pgraft {name}: error: {error_line(exc)}", file=sys.stderr)
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
