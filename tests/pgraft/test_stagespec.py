"""The command line's user errors: every OSError is one line that says what failed (the file it
names, a working directory that is gone, or where it was raised), never a bare errno."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from pgraft.stagespec import guarded, os_error_message
from pipelines.cli import main as cli_main


def raised(exc: OSError) -> OSError:
    """`exc` with a traceback, as a command would have raised it."""
    try:
        raise exc
    except OSError as caught:
        return caught


def test_an_error_that_names_files_shows_them():
    one = FileNotFoundError(errno.ENOENT, "No such file or directory", "/runs/a/config.yaml")
    assert os_error_message(one) == "No such file or directory: '/runs/a/config.yaml'"
    two = PermissionError(errno.EACCES, "Permission denied", "/tmp/a.tmp", None, b"/runs/a.json")  # None: winerror
    assert os_error_message(two) == "Permission denied: '/tmp/a.tmp' -> '/runs/a.json'"


def test_an_error_that_names_nothing_says_where_it_was_raised():
    message = os_error_message(raised(OSError(errno.EIO, "Input/output error")))
    assert message.startswith("Input/output error (in raised (test_stagespec.py:")
    assert os_error_message(OSError("the disk said no")) == "the disk said no"  # no traceback, no place to name


def test_an_error_from_a_ray_worker_is_its_own_line_not_the_remote_traceback():
    from ray.exceptions import RayTaskError

    cause = raised(PermissionError(errno.EACCES, "Permission denied", "/mnt/run/round-000"))
    wrapped = RayTaskError("generate", "Traceback (most recent call last):\n  ...\nPermissionError: ...", cause)
    assert os_error_message(wrapped.as_instanceof_cause()) == "Permission denied: '/mnt/run/round-000'"


def test_a_removed_working_directory_is_named(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    shutil.rmtree(gone)
    with pytest.raises(FileNotFoundError) as info:
        os.getcwd()
    message = os_error_message(info.value)
    assert message.startswith("the working directory no longer exists (No such file or directory, in ")
    assert "[Errno" not in message


def test_a_command_whose_working_directory_vanished_is_one_line(tmp_path, monkeypatch, capsys):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    shutil.rmtree(gone)
    assert cli_main(["status", "runs/demo"]) == 2  # a relative run: resolving it needs the working directory
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pgraft status: error: the working directory no longer exists (")


def test_any_os_error_is_a_user_error(capsys):
    def refused():
        raise PermissionError(errno.EACCES, "Permission denied", "/runs/a/round-000")

    assert guarded("filter", refused) == 2
    assert capsys.readouterr().err == "pgraft filter: error: Permission denied: '/runs/a/round-000'\n"
