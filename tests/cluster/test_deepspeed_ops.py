"""DeepSpeed's CPU op: built under a lock the kernel releases, so a builder killed half-way
leaves nothing that makes the next DeepSpeed start on the node wait forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.deepspeed_ops import (BUILDER_LOCK, OP_NAME, TORCH_LOCK, builder_lock, environment_first,
                                   use_environment_folder)

REPO = Path(__file__).resolve().parents[2]


def test_a_torch_lock_found_under_the_builder_lock_is_stale_and_removed(tmp_path, capsys):
    folder = tmp_path / OP_NAME
    folder.mkdir()
    (folder / TORCH_LOCK).touch()  # what a builder killed mid-build leaves
    with builder_lock(folder):
        assert not (folder / TORCH_LOCK).exists()
        assert (folder / BUILDER_LOCK).read_text().strip() == str(os.getpid())
    assert "removed a stale build lock" in capsys.readouterr().err


def test_each_python_environment_builds_into_its_own_folder_unless_told_otherwise(tmp_path, monkeypatch):
    """Two environments sharing torch's folder in the home directory would rebuild each other's op."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    use_environment_folder()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv" / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    use_environment_folder()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")


def test_builds_run_the_environments_own_ninja_whatever_path_says(tmp_path):
    """Two ninja versions on one machine (the environment's and the system's) each took the
    other's build for stale: the environment's bin goes first, once, when it holds ninja."""
    venv_bin, other = tmp_path / "venv" / "bin", tmp_path / "other"
    venv_bin.mkdir(parents=True)
    python = str(venv_bin / "python")
    assert environment_first(f"/usr/bin:{other}", python) == f"/usr/bin:{other}"  # no ninja there: as it was
    (venv_bin / "ninja").touch()
    assert environment_first(f"/usr/bin:{other}", python) == f"{venv_bin}:/usr/bin:{other}"
    assert environment_first(f"/usr/bin:{venv_bin}:{other}", python) == f"{venv_bin}:/usr/bin:{other}"
    assert environment_first(f"{venv_bin}:/usr/bin", python) == f"{venv_bin}:/usr/bin"


def test_the_builder_lock_is_exclusive_between_processes(tmp_path):
    """A second process waits for the first's flock (so it never takes a live build's lock for
    a stale one), and gets it as soon as the holder is gone."""
    folder = tmp_path / OP_NAME
    hold = ("import sys, time; from pathlib import Path; from cluster.deepspeed_ops import builder_lock\n"
            "with builder_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (folder / TORCH_LOCK).touch()  # the live holder's build in progress
        take = ("import sys; from pathlib import Path; from cluster.deepspeed_ops import builder_lock\n"
                "with builder_lock(Path(sys.argv[1])):\n    print('taken', flush=True)")
        taker = subprocess.Popen([sys.executable, "-c", take, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            taker.wait(timeout=3)  # waits on the live holder
        assert (folder / TORCH_LOCK).exists()  # a live build's lock is left alone
        holder.kill()
        assert taker.communicate(timeout=60)[0].strip() == "taken"
        assert not (folder / TORCH_LOCK).exists()  # its holder is gone: cleared
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.deepspeed
def test_a_build_killed_half_way_does_not_hang_the_next_start(tmp_path):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    folder = tmp_path / "extensions" / OP_NAME
    lock = folder / TORCH_LOCK
    cmd = [sys.executable, "-m", "cluster.deepspeed_ops"]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while not compiling(first.pid) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists() and compiling(first.pid), "the build never got to compiling under torch's lock"
    os.killpg(first.pid, signal.SIGKILL)  # the builder and its compiler, mid-build
    first.wait()
    assert lock.exists()  # left behind: before, every later start waited on it forever
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "removed a stale build lock" in again.stderr and f"{OP_NAME} ready" in again.stdout
    assert not lock.exists()
    assert (folder / f"{OP_NAME}.so").is_file(), "no built op"


@pytest.mark.deepspeed
def test_starts_with_another_ninja_first_on_path_load_the_built_op_without_rebuilding_it():
    """The op `make install` built into this environment: a start whose PATH finds the system's
    ninja first (make, or the venv's python run without activation) and one whose PATH finds the
    environment's (an activated shell, a Ray worker) each load it as built. Before, each rebuilt
    it over the other's build (their ninja versions log a build's command differently)."""
    bin_dir = str(Path(sys.executable).parent)
    bare = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != bin_dir)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}  # the environment's own folder
    cmd = [sys.executable, "-m", "cluster.deepspeed_ops"]

    def start(path: str) -> str:
        done = subprocess.run(cmd, cwd=REPO, env=dict(env, PATH=path), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and f"{OP_NAME} ready" in done.stdout, done.stderr[-2000:]
        return done.stdout

    folder = Path(start(bare).split(" ready in ")[1].split(" (")[0])  # built now unless make install did
    log = (folder / ".ninja_log").read_text()
    for path in (f"{bin_dir}{os.pathsep}{bare}", bare):
        start(path)
    assert (folder / ".ninja_log").read_text() == log, "a start with another PATH rebuilt the op"


def compiling(pid: int) -> bool:
    """Whether the process `pid` has a C++ compiler running below it."""
    import psutil

    try:
        return any("cc1plus" in child.name() for child in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False
