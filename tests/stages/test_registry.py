"""The stage registry: every stage declares itself, the round pipeline's stages read only what an
earlier one wrote, and the command line is built from the registry."""

import pytest

from pgraft.errors import ConfigError
from pipelines.cli import main as cli_main
from pipelines.pgraft_round import STAGES as ROUND_STAGES
from stages import get_stage, known_stages


def test_every_stage_declares_itself():
    for name in known_stages():
        spec = get_stage(name)
        assert spec.name == name and callable(spec.run) and spec.writes and spec.description


def test_unknown_stage_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown stage 'nope'; known stages: generate, reward, filter"):
        get_stage("nope")


def test_round_stages_read_what_an_earlier_stage_wrote():
    available = {"task"}  # the task's models, published before the first stage
    for name in ROUND_STAGES:
        spec = get_stage(name)
        assert set(spec.reads) <= available, f"{name} reads {set(spec.reads) - available}, which no earlier stage writes"
        available |= set(spec.writes)


def test_stage_flags_reach_the_command_line(capsys):
    with pytest.raises(SystemExit):
        cli_main(["filter", "--help"])
    out = capsys.readouterr().out
    for flag in get_stage("filter").flags:
        assert flag.flag in out
