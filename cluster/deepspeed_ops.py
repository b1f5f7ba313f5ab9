"""DeepSpeed's CPU communication op, built once per environment and never waited on forever.

On a CPU node DeepSpeed JIT-builds `deepspeed_shm_comm` (C++, ~40 s on 2 cores) the first time a
process group starts. torch guards that build with a bare lock file (`FileBaton`: created with
O_EXCL, removed when the build ends) that records no owner: a builder killed mid-build leaves it
behind, and every later start on the node then waits on it forever.

The op is built per Python environment (`<sys.prefix>/torch_extensions`, unless
TORCH_EXTENSIONS_DIR says otherwise): torch's default folder in the home directory is shared by
every environment of the user, and two environments' builds differ (their sources' paths), so
each start in one rebuilt the op the other had just built (~40 s each time).

The build is also pinned to this environment's own `ninja` (the `ninja` package DeepSpeed
installs beside the interpreter). A machine often has a second one (Debian's /usr/bin/ninja),
and which one torch runs depends on PATH: an activated shell or a Ray worker finds the
environment's, `make` and `.venv/bin/python` without activation find the system's. The two
versions record a build's command differently in `.ninja_log`, so each took the other's build
for stale and rebuilt the op: six rebuilds (~6 min of CPU) in one run of the suite.

`ensure_built()` closes both holes. Every pgraft process builds under an `flock` on a sidecar file
in the same folder; the kernel drops an flock when its holder dies. So a pgraft process holding
the flock that still finds torch's lock file knows the builder that left it is gone, and clears
it before building. `make install` and the Docker image run `python -m cluster.deepspeed_ops` so
that nodes start with the op built; `cluster.train_group.join_group` calls `ensure_built()`
before any DeepSpeed start, so a node without the prebuilt op builds it once, safely.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

OP_NAME = "deepspeed_shm_comm"
# torch's own lock file in the op's build folder (torch.utils.file_baton.FileBaton).
TORCH_LOCK = "lock"
# Our sidecar: held with flock for the whole build; it holds the holder's pid, for people.
BUILDER_LOCK = "pgraft-builder.lock"


def use_environment_folder() -> None:
    """Point torch's JIT builds of this process at this environment's own folder, unless
    TORCH_EXTENSIONS_DIR is set (or the environment is read-only: torch's default then)."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return
    folder = Path(sys.prefix) / "torch_extensions"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    if os.access(folder, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)


def build_directory(name: str = OP_NAME) -> Path:
    """Where torch builds (and later loads) the op: TORCH_EXTENSIONS_DIR or its default."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def environment_first(path: str, executable: str) -> str:
    """PATH with the folder of `executable` (the environment's bin) first, when it holds ninja."""
    bin_dir = str(Path(executable).parent)
    if not (Path(bin_dir) / "ninja").exists():
        return path
    return os.pathsep.join([bin_dir] + [p for p in path.split(os.pathsep) if p and p != bin_dir])


@contextmanager
def environment_ninja():
    """Within this block, torch's builds run this environment's ninja whatever PATH says."""
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = environment_first(before, sys.executable)
    try:
        yield
    finally:
        os.environ["PATH"] = before


@contextmanager
def builder_lock(folder: Path):
    """Hold the build folder's flock; with it held, a torch lock file left there is stale (its
    builder died: a live pgraft builder would hold the flock) and is removed."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / BUILDER_LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            stale = folder / TORCH_LOCK
            if stale.exists():
                stale.unlink(missing_ok=True)
                print(f"deepspeed ops: removed a stale build lock {stale} (its builder is gone)", file=sys.stderr)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_built(verbose: bool = False) -> float:
    """Build (or load the built) CPU shared-memory op in this process; seconds it took."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_environment_folder()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        return 0.0  # this accelerator has no such op (CUDA nodes use NCCL)
    start = time.perf_counter()
    with builder_lock(build_directory(builder.name)), environment_ninja():
        builder.load(verbose=verbose)
    return time.perf_counter() - start


def main() -> int:
    seconds = ensure_built(verbose=False)
    print(f"deepspeed ops: {OP_NAME} ready in {build_directory()} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
