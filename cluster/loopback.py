"""A two-node Ray cluster on this machine, for tests, benchmarks and `make cluster-up`.

A head node that runs no tasks (`--num-cpus 0`, dashboard on 127.0.0.1 so `ray job submit`
works) and one worker node with CPUs and a custom resource standing in for a GPU node type
(`gpu_node` by default). Both are started with the `ray` of the running interpreter's venv
and with that venv's bin first on PATH, so workers, job drivers and a bare `python` in a job
entrypoint all run this venv's python.

Each rig is isolated from any other Ray on the machine (a test session's own `ray.init()`,
another rig): its own temp dir (so `/tmp/ray/ray_current_cluster`, which `address="auto"`
reads, is untouched), free ports for everything that has a fixed default (GCS, dashboard,
Ray client server, dashboard agents), and a marker variable in the environment of every
process it starts (`PGRAFT_LOOPBACK_RIG`, inherited by raylets, workers and job drivers), by
which `stop` finds exactly this rig's processes. Never `ray stop`, which kills every Ray here.

Ray 2.60 authentication: `ray start --head` turns on token auth by itself whenever
`~/.ray/auth_token` exists (a local `ray.init()` creates that file), and clients that name an
address never turn it on themselves, so the outcome would depend on the machine's history.
A rig therefore sets RAY_AUTH_MODE explicitly: "token" (default) with a fresh per-rig
RAY_AUTH_TOKEN (the environment variable wins over the token files), or "disabled". Clients
(`ray job submit`, `ray.init(address=...)`) need the same two variables: `client_env()`.

    from cluster import loopback
    with loopback.running(worker_env={"PGRAFT_CACHE_DIR": "/tmp/c"}) as rig:
        loopback.submit_job(rig, ["python", "script.py"], working_dir="jobdir")

    python -m cluster.loopback up [--num-cpus 2] [--state runs/.loopback-cluster.json]
    python -m cluster.loopback down
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping, Sequence

MARKER = "PGRAFT_LOOPBACK_RIG"
DEFAULT_RESOURCE = "gpu_node"
DEFAULT_STATE = "runs/.loopback-cluster.json"
VENV_BIN = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
RAY = str(Path(VENV_BIN) / "ray")
# Variables of a caller's environment that would point a rig's node or client at another
# cluster or another token; a rig sets its own.
_STALE_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
               "RAY_AUTH_TOKEN_PATH", "RAY_JOB_ID", "RAY_RUNTIME_ENV_HOOK", MARKER)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LoopbackError(RuntimeError):
    """The rig could not be started, reached or stopped."""


@dataclasses.dataclass
class LoopbackCluster:
    rig_id: str
    temp_dir: str        # the head's --temp-dir; the worker's is temp_dir/w
    gcs_address: str     # "ip:port" as Ray reports it (Ray swaps 127.0.0.1 for the host's IP)
    dashboard_url: str   # "http://127.0.0.1:port", for `ray job submit --address`
    head_node_id: str
    worker_node_id: str
    resource: str        # the worker node's custom resource name
    auth_mode: str       # "token" or "disabled"
    auth_token: str | None
    startup_s: float = 0.0

    @property
    def worker_temp_dir(self) -> str:
        return str(Path(self.temp_dir) / "w")

    def client_vars(self) -> dict[str, str]:
        """The variables a client needs: RAY_ADDRESS (GCS, for `ray.init()`),
        RAY_API_SERVER_ADDRESS (dashboard, for `ray job ...`), RAY_AUTH_MODE[, RAY_AUTH_TOKEN]."""
        out = {"RAY_ADDRESS": self.gcs_address, "RAY_API_SERVER_ADDRESS": self.dashboard_url,
               "RAY_AUTH_MODE": self.auth_mode}
        if self.auth_token:
            out["RAY_AUTH_TOKEN"] = self.auth_token
        return out

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) without other clusters' Ray variables, plus
        `client_vars()`, with the venv's bin first on PATH (so `ray` and `python` are the venv's)."""
        env = _clean_env(base)
        env.update(self.client_vars())
        return env

    def export_lines(self) -> str:
        return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in self.client_vars().items())

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> LoopbackCluster:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------------------------- start


def start(num_cpus: int = 1, resource: str = DEFAULT_RESOURCE, resource_count: float = 1,
          env: Mapping[str, str] | None = None, head_env: Mapping[str, str] | None = None,
          worker_env: Mapping[str, str] | None = None, auth: str = "token",
          object_store_memory: int | None = None, temp_root: str | None = None,
          timeout: float = 60.0) -> LoopbackCluster:
    """Start a head node (no CPUs, dashboard) and a worker node (`num_cpus` CPUs and
    `{resource: resource_count}`); each node gets os.environ + `env` + its own `head_env` /
    `worker_env`, which its workers, actors and job drivers inherit. Each wait is bounded by
    `timeout` seconds; on any failure what was started is stopped and LoopbackError raised."""
    if auth not in ("token", "disabled"):
        raise ValueError(f"auth must be 'token' or 'disabled', not {auth!r}")
    t0 = time.monotonic()
    rig_id = secrets.token_hex(6)
    # Short: Ray's unix socket paths live under it (the limit is 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix=f"pgraft-lb-{rig_id[:6]}-", dir=temp_root or "/tmp")
    worker_dir = str(Path(temp_dir) / "w")
    token = secrets.token_hex(32) if auth == "token" else None
    base = _clean_env(os.environ)
    base.update({MARKER: rig_id, "RAY_AUTH_MODE": auth, **({"RAY_AUTH_TOKEN": token} if token else {})})
    base.update(env or {})
    gcs_port, dash_port, client_port, head_agent_port, worker_agent_port = _free_ports(5)
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    if object_store_memory:
        common += ["--object-store-memory", str(int(object_store_memory))]
    rig = LoopbackCluster(rig_id=rig_id, temp_dir=temp_dir, gcs_address="", dashboard_url=f"http://127.0.0.1:{dash_port}",
                          head_node_id="", worker_node_id="", resource=resource, auth_mode=auth, auth_token=token)
    try:
        _ray_start("head", [
            "--head", "--num-cpus", "0", "--port", str(gcs_port), "--temp-dir", temp_dir,
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
            "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(head_agent_port),
            *common], dict(base, **(head_env or {})), timeout, temp_dir)
        rig.gcs_address = _read_gcs_address(temp_dir)
        _ray_start("worker", [
            "--address", rig.gcs_address, "--num-cpus", str(num_cpus),
            "--resources", json.dumps({resource: resource_count}), "--temp-dir", worker_dir,
            "--dashboard-agent-listen-port", str(worker_agent_port), *common],
            dict(base, **(worker_env or {})), timeout, worker_dir)
        rig.head_node_id, rig.worker_node_id = _node_ids(rig, timeout)
        _wait_dashboard(rig, timeout)
    except BaseException:
        stop(rig, grace=2.0, remove_dir=False)  # keep the logs the error points to
        raise
    rig.startup_s = round(time.monotonic() - t0, 2)
    return rig


@contextlib.contextmanager
def running(**kwargs) -> Iterator[LoopbackCluster]:
    """`start(**kwargs)`; the rig is stopped on the way out, whatever happened inside."""
    rig = start(**kwargs)
    try:
        yield rig
    except BaseException:
        with contextlib.suppress(LoopbackError):  # keep the body's error, not a stop error
            stop(rig)
        raise
    stop(rig)


def _clean_env(base: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _STALE_VARS}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != VENV_BIN]
    env["PATH"] = os.pathsep.join([VENV_BIN, *path])
    return env


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("", 0))  # all interfaces: Ray binds the host's IP, not only loopback
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _ray_start(which: str, args: list[str], env: dict, timeout: float, temp_dir: str) -> None:
    try:
        proc = subprocess.run([RAY, "start", *args], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LoopbackError(f"{which} node did not start within {timeout:.0f} s (logs: {temp_dir}/session_latest/logs)") from None
    if proc.returncode != 0:
        rc = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise LoopbackError(f"{which} node failed to start ({rc}): {_last_line(proc.stdout + proc.stderr)} "
                            f"(logs: {temp_dir}/session_latest/logs)")


def _last_line(text: str) -> str:
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1][:500]


def _read_gcs_address(temp_dir: str) -> str:
    # `ray start` writes the GCS address of the cluster it joined or started into its temp dir.
    path = Path(temp_dir) / "ray_current_cluster"
    try:
        return path.read_text().strip()
    except OSError:
        raise LoopbackError(f"head node started but wrote no {path}") from None


_PROBE = r"""
import json, os, sys, time
import ray
worker_dir, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    head = [n["NodeID"] for n in nodes if not n["RayletSocketName"].startswith(worker_dir)]
    work = [n["NodeID"] for n in nodes if n["RayletSocketName"].startswith(worker_dir)]
    if head and work:
        print("NODES " + json.dumps([head[0], work[0]]), flush=True)
        break
    if time.monotonic() > deadline:
        print("NODES " + json.dumps([n["RayletSocketName"] for n in nodes]), flush=True)
        sys.exit(3)
    time.sleep(0.2)
"""


def _node_ids(rig: LoopbackCluster, timeout: float) -> tuple[str, str]:
    """(head, worker) node ids, from `ray.nodes()` in a short-lived driver (not this process,
    which may be a driver of another cluster); the worker node is the one whose raylet socket
    lies under its temp dir."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, rig.worker_temp_dir + "/", str(timeout)],
                              env=rig.client_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        raise LoopbackError(f"could not list the nodes of {rig.gcs_address} within {timeout + 30:.0f} s") from None
    found = [line[6:] for line in proc.stdout.splitlines() if line.startswith("NODES ")]
    if proc.returncode == 3 and found:
        raise LoopbackError(f"worker node did not join {rig.gcs_address} within {timeout:.0f} s "
                            f"(alive raylets: {json.loads(found[-1])})")
    if proc.returncode != 0 or not found:
        raise LoopbackError(f"could not list the nodes of {rig.gcs_address}: {_last_line(proc.stdout + proc.stderr)}")
    head, worker = json.loads(found[-1])
    return head, worker


def _wait_dashboard(rig: LoopbackCluster, timeout: float) -> None:
    """Until the dashboard answers the jobs API (it starts after the GCS, its job module later)."""
    headers = {"Authorization": f"Bearer {rig.auth_token}"} if rig.auth_token else {}
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"{rig.dashboard_url}/api/jobs/", headers=headers)
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise LoopbackError(f"dashboard {rig.dashboard_url} not ready within {timeout:.0f} s ({last})")


# ----------------------------------------------------------------------------------- jobs


def submit_job(rig: LoopbackCluster, entrypoint: Sequence[str] | str, working_dir: str | None = None,
               env: Mapping[str, str] | None = None, timeout: float = 120.0,
               extra_args: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """`ray job submit --address <dashboard> [--working-dir D] [extra_args] -- <entrypoint>`,
    waiting for the job; returns the CompletedProcess (stdout has the job's log; rc != 0 when
    the job failed). A list entrypoint is quoted word by word (the CLI shlex-joins it); a str
    one is a shell command line (`sh -c`). The job's shell resolves `python` on the head node's
    PATH, which `start` puts the venv's bin first on. `env` is added to the client's environment,
    not the job's (for that: extra_args=["--runtime-env-json", '{"env_vars": {...}}'])."""
    cmd = [RAY, "job", "submit", "--address", rig.dashboard_url, *extra_args]
    if working_dir:
        cmd += ["--working-dir", str(working_dir)]
    cmd += ["--", *(["sh", "-c", entrypoint] if isinstance(entrypoint, str) else entrypoint)]
    return subprocess.run(cmd, env=dict(rig.client_env(), **(env or {})), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------- stop


def rig_processes(rig: LoopbackCluster) -> list:
    """This rig's live processes: those with its marker in their environment or its temp
    dir in their command line, and all their descendants (workers, agents, job drivers)."""
    import psutil

    if len(rig.rig_id) < 8 or not rig.temp_dir.startswith("/") or len(rig.temp_dir) < 8:
        raise LoopbackError(f"not a rig: rig_id={rig.rig_id!r} temp_dir={rig.temp_dir!r}")  # would match too much
    in_dir = re.compile(re.escape(rig.temp_dir) + r"(/|\s|$)")
    me = os.getpid()
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == me:
            continue
        try:
            if in_dir.search(" ".join(proc.info["cmdline"] or ())) or proc.environ().get(MARKER) == rig.rig_id:
                roots.append(proc)
        except (psutil.Error, OSError):
            continue
    found = {p.pid: p for p in roots}
    for proc in roots:
        try:
            found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            pass
    found.pop(me, None)
    return [p for p in found.values() if _alive(p)]


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(rig: LoopbackCluster, grace: float = 5.0, remove_dir: bool = True) -> None:
    """Stop exactly this rig's processes, in the order that lets each exit at once: raylets
    (their workers and agents go with them), then the head's other daemons, then the GCS; each
    group gets SIGTERM and up to `grace` seconds, then SIGKILL. Raises LoopbackError if any is
    left; then removes the rig's temp dir (logs included) unless `remove_dir` is false."""
    groups = (lambda p: p.name() == "raylet", lambda p: p.name() != "gcs_server", lambda p: True)
    for wanted in groups:
        procs = []
        for proc in rig_processes(rig):
            with contextlib.suppress(Exception):
                if wanted(proc):
                    procs.append(proc)
        _terminate(procs, grace)
    left = rig_processes(rig)
    _terminate(left, 0)  # anything started meanwhile (a worker a raylet was spawning)
    left = rig_processes(rig)
    if left:
        raise LoopbackError(f"rig {rig.rig_id} still has processes after stop: {sorted(p.pid for p in left)}")
    if remove_dir:
        shutil.rmtree(rig.temp_dir, ignore_errors=True)


def _terminate(procs: list, grace: float) -> None:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM if grace > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.05)
    alive = [p for p in procs if _alive(p)]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


# ------------------------------------------------------------------------------------ CLI


def save_state(rig: LoopbackCluster, path: str | os.PathLike = DEFAULT_STATE) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the token
    with os.fdopen(fd, "w") as f:
        json.dump(rig.to_json(), f, indent=1)
    return path


def load_state(path: str | os.PathLike = DEFAULT_STATE) -> LoopbackCluster:
    return LoopbackCluster.from_json(json.loads(Path(path).read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.loopback", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a rig, write the state file, print export lines")
    up.add_argument("--num-cpus", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    up.add_argument("--resource", default=DEFAULT_RESOURCE)
    up.add_argument("--resource-count", type=float, default=1)
    up.add_argument("--auth", choices=["token", "disabled"], default="token")
    up.add_argument("--head-env", action="append", default=[], metavar="K=V")
    up.add_argument("--worker-env", action="append", default=[], metavar="K=V")
    up.add_argument("--timeout", type=float, default=60.0)
    down = sub.add_parser("down", help="stop the rig of the state file")
    down.add_argument("--keep-logs", action="store_true")
    for p in (up, down):
        p.add_argument("--state", default=os.environ.get("PGRAFT_LOOPBACK_STATE", DEFAULT_STATE))
    args = parser.parse_args(argv)
    state = Path(args.state)
    try:
        if args.cmd == "up":
            if state.exists():
                old = load_state(state)
                if rig_processes(old):
                    print(f"a rig is already up ({old.dashboard_url}, state {state}); run `make cluster-down` first",
                          file=sys.stderr)
                    return 1
            if any("=" not in kv for kv in args.head_env + args.worker_env):
                parser.error("--head-env/--worker-env take K=V")
            rig = start(num_cpus=args.num_cpus, resource=args.resource, resource_count=args.resource_count,
                        auth=args.auth, timeout=args.timeout,
                        head_env=dict(kv.split("=", 1) for kv in args.head_env),
                        worker_env=dict(kv.split("=", 1) for kv in args.worker_env))
            save_state(rig, state)
            print(f"# loopback Ray rig up in {rig.startup_s:.1f} s: head {rig.head_node_id[:12]}, "
                  f"worker {rig.worker_node_id[:12]} ({args.num_cpus} CPU, {args.resource}={args.resource_count:g}); "
                  f"state {state}; logs {rig.temp_dir}")
            print(rig.export_lines())
            if VENV_BIN not in os.environ.get("PATH", "").split(os.pathsep):
                print(f'export PATH={shlex.quote(VENV_BIN)}:"$PATH"  # this venv\'s ray and python')
            print("# ray job submit --working-dir . -- python script.py   # then: make cluster-down")
            return 0
        if not state.exists():
            print(f"no rig state at {state}; nothing to stop", file=sys.stderr)
            return 0
        rig = load_state(state)
        stop(rig, remove_dir=not args.keep_logs)
        state.unlink()
        print(f"# loopback Ray rig {rig.rig_id} stopped")
        print("unset RAY_ADDRESS RAY_API_SERVER_ADDRESS RAY_AUTH_MODE RAY_AUTH_TOKEN")
        return 0
    except LoopbackError as exc:
        print(f"loopback: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
