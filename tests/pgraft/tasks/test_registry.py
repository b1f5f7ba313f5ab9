"""The task registry: lookup, plug-ins, the defaults a task gives a config, and that outside
pgraft/tasks/ no module lets a task's name decide anything."""

import ast
from pathlib import Path

import pytest

from pgraft.config import load_config
from pgraft.errors import ConfigError
from pgraft.tasks import DEFAULT_TASK, TASKS, get_task, known_tasks

REPO = Path(__file__).resolve().parents[3]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown task 'nope'; known tasks: \['digits', 'molecules', 'page_layout', 't2i'\]"):
        get_task("nope")
    with pytest.raises(ConfigError, match="task.name: unknown task 'nope'"):
        load_config(None, ["task.name=nope"])


def test_plugin_task_gives_the_config_its_defaults(tmp_path):
    for name in ("plugin_tasks:TINY", "plugin_tasks:tiny_factory"):
        cfg = load_config(None, [f"task.name={name}", f"task.dir={tmp_path}/m"])
        assert cfg.model.path == f"{tmp_path}/m/base" and cfg.reward.name == "jpeg_compressibility"
        assert cfg.reward.hash == "perceptual" and cfg.generate.prompts == ["a", "b"]
        assert cfg.run.uri == "runs/tiny" and cfg.invert.name == "tiny-train"
    assert "tiny" not in TASKS  # a plug-in is looked up, never added to the built-in registry


def test_a_task_of_an_unknown_sample_kind_is_one_line():
    with pytest.raises(ConfigError, match="task 'plugin_tasks:ODD_KIND' makes 'point_cloud' samples; known sample kinds"):
        get_task("plugin_tasks:ODD_KIND")


def test_plugin_task_missing_a_part_names_it():
    with pytest.raises(ConfigError, match="task 'plugin_tasks:NO_REWARD' misses reward"):
        get_task("plugin_tasks:NO_REWARD")
    with pytest.raises(ConfigError, match="task .sys:maxsize. misses name, pretrain, "):
        get_task("sys:maxsize")


def test_default_config_is_the_default_task():
    spec = get_task(DEFAULT_TASK)
    cfg = load_config(None)
    assert cfg.task.name == spec.name and cfg.reward.name == spec.reward
    assert cfg.model.path.endswith(f"{spec.name}/{spec.base_model}") and cfg.generate.prompts == list(spec.prompts)


def _names_deciding(task: str, path: Path) -> list[int]:
    """Lines where `task` appears in a string constant (docstrings aside), a name, an attribute or an import."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
        elif isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        elif isinstance(node, ast.ImportFrom):
            text = " ".join([node.module or ""] + [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            text = " ".join(a.name for a in node.names)
        else:
            continue
        if task in text.lower():
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("task", known_tasks())
def test_no_module_outside_the_tasks_decides_by_a_task_name(task):
    found = [f"{path.relative_to(REPO)}:{line}" for package in ("pgraft", "stages", "pipelines", "cluster")
             for path in sorted((REPO / package).rglob("*.py")) if not path.is_relative_to(REPO / "pgraft" / "tasks")
             for line in _names_deciding(task, path)]
    assert not found, f"the task name {task!r} decides behaviour at {found}"


def test_the_name_check_finds_a_use():
    assert _names_deciding("digits", REPO / "pgraft" / "tasks" / "builtin.py")  # so the test above can fail
