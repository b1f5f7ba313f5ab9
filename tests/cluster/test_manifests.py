"""The cluster files users run: cluster/rayjob.yaml (KubeRay), cluster/runtime_env.yaml and
cluster/cluster.yaml (`ray up`), docker/Dockerfile and .dockerignore.

Each is read the way the tool that consumes it reads it (KubeRay's field types, Ray's launcher
schema, Ray's own conversion of a RayCluster spec into autoscaler node types, Ray's exclude
matching), so a field the operator rejects, a path the image lacks, or a pin that drifted from
pyproject.toml fails here rather than on a cluster. Nothing is built or started: parsing only."""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
RAYJOB = REPO / "cluster" / "rayjob.yaml"
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
LAUNCHER = REPO / "cluster" / "cluster.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

# Runtime-env keys that install or upload something: the image variant must need none of them.
INSTALLING_KEYS = {"working_dir", "py_modules", "pip", "uv", "conda", "container", "image_uri", "py_executable"}


@functools.cache
def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: top level is not a mapping"
    return data


def rayjob() -> dict:
    return load(RAYJOB)


def cluster_spec() -> dict:
    return rayjob()["spec"]["rayClusterSpec"]


def job_runtime_env() -> dict:
    text = rayjob()["spec"]["runtimeEnvYAML"]
    assert isinstance(text, str), "spec.runtimeEnvYAML must be a string (KubeRay's field is a YAML string)"
    env = yaml.safe_load(text)
    assert isinstance(env, dict), "spec.runtimeEnvYAML does not parse into a mapping"
    return env


def all_containers() -> list[dict]:
    groups = [cluster_spec()["headGroupSpec"], *cluster_spec()["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# --- Dockerfile, read as docker does: continuation lines joined, comments dropped, ARG defaults ---

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, `${ARG}` / `$ARG` replaced by the ARG's default."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            logical.append(current.strip())
            current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    args: dict[str, str] = {}
    out = []
    for text in logical:
        instr, _, rest = text.partition(" ")
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest.strip())
        if instr.upper() == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        out.append((instr.upper(), rest))
    return out


def workdir() -> str:
    dirs = [rest for instr, rest in dockerfile() if instr == "WORKDIR"]
    assert dirs, "the Dockerfile sets no WORKDIR"
    return dirs[-1].rstrip("/")


def copied_sources() -> list[str]:
    """Repo paths the image COPYs (the flags such as --chown left out)."""
    sources = []
    for instr, rest in dockerfile():
        if instr == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            sources += [p.rstrip("/") for p in parts[:-1]]
    return sources


def pip_installs() -> list[list[str]]:
    """The argument list of every `pip install` in a RUN (one entry per command of a && chain)."""
    found = []
    for instr, rest in dockerfile():
        if instr != "RUN":
            continue
        for command in re.split(r"&&|\|\||;", rest):
            words = shlex.split(command)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    found.append(words[i + 2:])
    return found


VALUE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-t", "--target",
                 "-c", "--constraint", "-r", "--requirement", "--platform", "--python-version"}


def third_party_requirements() -> list[str]:
    """Every requirement the Dockerfile hands pip, requirement files included; the project itself left out."""
    reqs = []
    for args in pip_installs():
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in ("-r", "--requirement", "-c", "--constraint"):
                lines = (REPO / args[i + 1]).read_text().splitlines()
                reqs += [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]
            if arg in VALUE_OPTIONS:
                i += 2
                continue
            if not arg.startswith("-") and not re.match(r"^\.(/|\[|$)", arg):
                reqs.append(arg)
            i += 1
    return reqs


def pins() -> dict[str, Requirement]:
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in third_party_requirements()}


def pinned_version(req: Requirement) -> str | None:
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version:
        return specs[0].version
    return None


# --- .dockerignore, matched as docker does: patterns relative to the context root -------------

def dockerignore_patterns() -> list[str]:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _docker_pattern_regex(pattern: str) -> re.Pattern:
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def docker_ignored(rel_path: str) -> bool:
    """True when .dockerignore keeps `rel_path` out of the build context: a pattern matching the
    path or one of its parent folders; the last matching pattern wins ("!" re-includes)."""
    parts = rel_path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        regex = _docker_pattern_regex(pattern.lstrip("!"))
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


def repo_files(*tops: str) -> list[str]:
    files = []
    for top in tops:
        path = REPO / top
        found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files += [p.relative_to(REPO).as_posix() for p in found if "__pycache__" not in p.parts]
    return files


# --- cluster/rayjob.yaml ---------------------------------------------------------------------

def test_rayjob_is_a_kuberay_v1_rayjob_that_cleans_up_after_itself():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert isinstance(job["metadata"]["name"], str) and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, "GPU pods must not outlive the job"
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
    for key in ("activeDeadlineSeconds", "backoffLimit"):
        assert key not in spec or (isinstance(spec[key], int) and spec[key] >= 0), key


def test_rayjob_ray_version_is_the_ray_in_the_image():
    ray_pin = pinned_version(pins()["ray"])
    base = next(rest for instr, rest in dockerfile() if instr == "FROM")
    assert cluster_spec()["rayVersion"] == ray_pin, "rayVersion must be the Ray the image installs"
    tag = base.split()[0].rsplit(":", 1)[-1]
    assert tag == ray_pin or tag.startswith(ray_pin + "-"), f"base image {base} carries another Ray than {ray_pin}"


def load_config_in_subprocess(path: Path) -> dict:
    """`pgraft.config.load_config(path)` as a dict, in a fresh interpreter run from the repo: under
    the `pytest` script (not `python -m pytest`) tests/pgraft/ would shadow the package here."""
    code = ("import json, sys; from pgraft.config import load_config; "
            "print(json.dumps(load_config(sys.argv[1]).model_dump(mode='json')))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, check=False,
                         timeout=60)
    assert out.returncode == 0, f"{path.name} does not load: {out.stderr.strip().splitlines()[-1:]}"
    return json.loads(out.stdout)


def test_entrypoint_runs_the_round_pipeline_from_the_image_with_an_s3_config():
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[0] == "python" and len(argv) >= 4, argv
    root = workdir() + "/"

    def in_repo(image_path: str) -> str:
        assert image_path.startswith(root), f"{image_path} is not under the image's code folder {root}"
        rel = image_path[len(root):]
        assert (REPO / rel).is_file(), f"{rel} does not exist in the repo"
        assert rel.split("/")[0] in copied_sources(), f"the Dockerfile does not COPY {rel.split('/')[0]}/"
        return rel

    assert in_repo(argv[1]) == "pipelines/pgraft_round.py"
    assert "--config" in argv, "the entrypoint names no --config"
    config = in_repo(argv[argv.index("--config") + 1])
    cfg = load_config_in_subprocess(REPO / config)
    # Pods share no disk and a job's working copy is temporary: run and models must be in storage.
    assert cfg["run"]["uri"].startswith("s3://"), cfg["run"]["uri"]
    assert cfg["task"]["dir"].startswith("s3://"), cfg["task"]["dir"]


def test_job_runtime_env_installs_nothing_and_sets_string_env_vars():
    env = job_runtime_env()
    assert not INSTALLING_KEYS & env.keys(), f"code and packages come from the image: {INSTALLING_KEYS & env.keys()}"
    env_vars = env["env_vars"]
    assert env_vars and all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), \
        f"Ray accepts string env_vars only: {env_vars}"


def test_runtime_env_file_sets_the_same_env_vars_as_the_rayjob():
    env = load(RUNTIME_ENV)
    assert not INSTALLING_KEYS & env.keys(), "the image holds the packages; --working-dir is given on the command line"
    assert env["env_vars"] == job_runtime_env()["env_vars"]


def test_runtime_env_excludes_local_state_but_no_code():
    from ray._private.thirdparty.pathspec import PathSpec  # what `ray job submit` matches excludes with

    spec = PathSpec.from_lines("gitwildmatch", load(RUNTIME_ENV)["excludes"])
    for local_state in ("runs/digits/manifest.json", "models/digits/ddpm/config.json", ".venv/bin/python",
                        ".git/HEAD", "benchmarks/results/inc_study.json"):
        assert spec.match_file(local_state), f"{local_state} would be uploaded with the job"
    code = repo_files("pgraft", "stages", "pipelines", "cluster", "configs", "pyproject.toml")
    assert "pgraft/models/fetch.py" in code
    uploaded_anyway = [f for f in code if spec.match_file(f)]
    assert not uploaded_anyway, f"excludes drop code the job needs: {uploaded_anyway[:5]}"


def test_head_group_orchestrates_only_with_string_start_params():
    head = cluster_spec()["headGroupSpec"]
    params = head["rayStartParams"]
    bad = {k: v for k, v in params.items() if not isinstance(v, str)}
    assert not bad, f"KubeRay's rayStartParams is a string→string map: {bad}"
    assert params["num-cpus"] == "0", "the head runs the driver only"
    containers = head["template"]["spec"]["containers"]
    assert containers and containers[0]["name"] == "ray-head" and containers[0]["image"]


def test_worker_groups_have_sane_replicas_and_the_gpu_group_asks_for_a_gpu():
    groups = cluster_spec()["workerGroupSpecs"]
    assert groups, "no worker group: nothing could run the stages"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"groupName must be unique: {names}"
    for g in groups:
        for key in ("minReplicas", "maxReplicas"):
            assert isinstance(g[key], int), f"{g['groupName']}.{key}"
        replicas = g.get("replicas", g["minReplicas"])
        assert 0 <= g["minReplicas"] <= replicas <= g["maxReplicas"], g["groupName"]
        bad = {k: v for k, v in g.get("rayStartParams", {}).items() if not isinstance(v, str)}
        assert not bad, f"{g['groupName']}: rayStartParams values must be strings: {bad}"
        containers = g["template"]["spec"]["containers"]
        assert containers and containers[0]["name"] == "ray-worker" and containers[0]["image"]
    gpu = next(g for g in groups if g["groupName"] == "gpu")
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1


def test_every_pod_runs_the_same_image_with_the_s3_secret():
    containers = all_containers()
    assert len({c["image"] for c in containers}) == 1, "head and workers need the same Ray and Python"
    secrets = [{s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s} for c in containers]
    assert secrets[0] and all(s == secrets[0] for s in secrets), \
        f"the driver and every worker read and write S3; secrets per container: {secrets}"


def test_ray_autoscaler_reads_the_groups_as_intended():
    kuberay = pytest.importorskip("ray.autoscaler._private.kuberay.autoscaling_config")
    # What the autoscaler beside the head derives from this RayCluster spec (and validates).
    config = kuberay._derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "pgraft-round", "namespace": "default"}, "spec": cluster_spec()})
    types = config["available_node_types"]
    assert types["headgroup"]["resources"].get("CPU", 0) == 0
    gpu = types["gpu"]
    assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["CPU"] >= 1
    launcher_gpu = load(LAUNCHER)["available_node_types"]["gpu_worker"]
    custom = {k: v for k, v in gpu["resources"].items() if k not in ("CPU", "GPU", "memory")}
    assert custom == launcher_gpu["resources"], "both routes must offer the same custom resource to pin work to"
    assert (gpu["min_workers"], gpu["max_workers"]) == (launcher_gpu["min_workers"], launcher_gpu["max_workers"])


# --- cluster/cluster.yaml --------------------------------------------------------------------

def test_launcher_config_passes_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import importlib.util

    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load(LAUNCHER), schema)


def test_launcher_node_types_are_complete_and_the_head_runs_no_work():
    config = load(LAUNCHER)
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type"):
        assert key in config, key
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node in types.items():
        for key in ("node_config", "resources", "min_workers", "max_workers"):
            assert key in node, f"{name}: {key}"
        assert 0 <= node["min_workers"] <= node["max_workers"], name
    assert sum(n["min_workers"] for n in types.values()) <= config["max_workers"]
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0
    assert any("--num-cpus 0" in c or "--num-cpus=0" in c for c in config["head_start_ray_commands"])
    image = config["docker"]["image"]
    assert image and image == all_containers()[0]["image"], "one image for both routes"


# --- docker/Dockerfile and .dockerignore -----------------------------------------------------

def test_dockerfile_base_image_has_a_pinned_tag():
    froms = [rest for instr, rest in dockerfile() if instr == "FROM"]
    assert froms
    for base in froms:
        image = base.split()[0]
        assert ":" in image.rsplit("/", 1)[-1], f"{image}: no tag"
        tag = image.rsplit(":", 1)[1]
        assert "latest" not in tag and re.match(r"\d+\.\d+\.\d+", tag), f"{image}: tag is not a version"


def test_every_third_party_pip_install_is_pinned():
    reqs = third_party_requirements()
    assert reqs, "the Dockerfile installs nothing"
    loose = [r for r in reqs if pinned_version(Requirement(r)) is None]
    assert not loose, f"pin with ==: {loose}"


def test_dockerfile_pins_every_project_dependency_within_pyproject_bounds():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    have = pins()
    for dep in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dep.name)
        assert name in have, f"{dep.name} (pyproject.toml) is not pinned in the Dockerfile"
        version = pinned_version(have[name])
        assert dep.specifier.contains(version, prereleases=True), f"{dep.name}=={version} is outside {dep}"
        assert dep.extras <= have[name].extras, f"{dep.name}: extras {dep.extras - have[name].extras} missing"


def test_dockerfile_copies_every_package_and_the_configs():
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    wanted = {p.rstrip("*") for p in find["include"]} | {"configs", "pyproject.toml"}
    missing = wanted - set(copied_sources())
    assert not missing, f"the image would lack {missing}"


def test_dockerfile_runs_as_a_non_root_user_owning_the_code():
    users = [rest.split(":")[0] for instr, rest in dockerfile() if instr == "USER"]
    assert users, "no USER: the image would run as whatever the base image says"
    assert users[-1] not in ("root", "0"), f"the image runs as {users[-1]}"
    # `pip install .` builds inside the source tree: the user running it must own the copies.
    unowned = [rest for instr, rest in dockerfile() if instr == "COPY" and "--chown=" not in rest]
    assert not unowned, f"COPY without --chown leaves root-owned files: {unowned}"


def test_dockerignore_keeps_local_state_out_and_everything_copied_in():
    assert DOCKERIGNORE.is_file()
    for local in (".venv/bin/python", "runs/digits/x", "models/digits/ddpm/x", ".git/HEAD",
                  "stages/__pycache__/x.pyc", "tests/conftest.py"):
        assert docker_ignored(local), f"{local} would be sent to the docker build"
    copied = repo_files(*copied_sources())
    assert "pgraft/models/fetch.py" in copied
    dropped = [f for f in copied if docker_ignored(f)]
    assert not dropped, f".dockerignore drops files the image COPYs: {dropped[:5]}"
