"""Chaos on a loopback rig: a seeded loop that SIGKILLs the rig's workers while a job runs, a
one-off kill of the job driver, and the comparison of a disturbed run with an undisturbed one.

    monkey = ChaosMonkey(rig, seed=0, every_s=20)      # generate, reward, evaluate actors, train ranks
    monkey.start(); ...; monkey.stop(); monkey.kills   # [(seconds since start, role, pid), ...]
    kill_driver(rig, "pipelines/pgraft_round.py")      # the job's driver process on the head
    differences = compare_runs(open_storage(a), open_storage(b))   # {} when byte-identical

Only processes of the given rig are touched (they carry its marker in their environment), so
chaos never reaches another Ray on the same machine. benchmarks/chaos_round.py and
tests/pipelines/test_cluster_round.py drive these.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

from cluster.loopback import MARKER, LoopbackCluster

# What the chaos loop kills, by role: the Ray process titles of pgraft's workers. The evaluate
# stage's own actors are SummaryWorker; its sampling and scoring run on Generate/RewardWorker.
ROLES = {"generate": "ray::GenerateWorker", "reward": "ray::RewardWorker", "evaluate": "ray::SummaryWorker",
         "train": "ray::TrainRank"}


def rig_matches(rig: LoopbackCluster, marker: str) -> list:
    """Live processes of `rig` whose command line contains `marker`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and proc.environ().get(MARKER) == rig.rig_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_driver(rig: LoopbackCluster, marker: str = "pipelines/pgraft_round.py") -> list[int]:
    """SIGKILL the rig's job driver: every process whose command line contains `marker` (Ray's
    job supervisor starts the entrypoint through a shell: the shell and the Python driver under
    it both go, as when a node dies). Returns the pids killed."""
    killed = []
    for proc in rig_matches(rig, marker):
        if "job submit" in " ".join(proc.info["cmdline"] or []):
            continue  # the client on this side, not the driver
        try:
            os.kill(proc.info["pid"], signal.SIGKILL)
            killed.append(proc.info["pid"])
        except ProcessLookupError:
            continue
    return killed


@dataclass
class ChaosMonkey:
    """Every `every_s` seconds (±50 %, drawn from `seed`), SIGKILL one live process of a role
    drawn from `roles` among those that have a live process then; at most `max_kills`."""

    rig: LoopbackCluster
    seed: int = 0
    every_s: float = 20.0
    roles: tuple[str, ...] = tuple(ROLES)
    max_kills: int | None = None
    kills: list[tuple[float, str, int]] = field(default_factory=list)

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos", daemon=True)
        self._start = 0.0

    def start(self) -> ChaosMonkey:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, str, int]]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.kills

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s * self._rng.uniform(0.5, 1.5)):
            if self.max_kills is not None and len(self.kills) >= self.max_kills:
                return
            live = {role: rig_matches(self.rig, ROLES[role]) for role in self.roles}
            live = {role: procs for role, procs in live.items() if procs}
            if not live:
                continue
            role = self._rng.choice(sorted(live))
            victim = self._rng.choice(sorted(live[role], key=lambda p: p.info["pid"]))
            try:
                os.kill(victim.info["pid"], signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append((round(time.monotonic() - self._start, 1), role, victim.info["pid"]))


# Outputs that must come out byte-identical, by what they are (keys relative to the run).
def _kind(key: str) -> str | None:
    if key.startswith(("leases/", "torn/")) or key.endswith(("summary.json", "pipeline.json", "plan.json")):
        return None  # bookkeeping: times, nodes, who held what
    if "/checkpoints/" in key:
        return None  # how far a restarted training got before it was killed differs by design
    if "/generate/" in key:
        return "shards"  # tars and commit records (evaluation samples too)
    if "/rewards/" in key:
        return "reward tables"
    if "/model/" in key:
        return "weights"
    return None


def compare_runs(a, b) -> dict[str, list[str]]:
    """What differs between two runs' stores, by kind: shards, reward tables, accepted rows and
    the exported weights; {} when every one is byte-identical (accepted rows compared as
    tables: their part names carry a token of the make)."""
    from pgraft.tables import read_accepted

    diffs: dict[str, list[str]] = {}
    keys_a, keys_b = set(a.list("")), set(b.list(""))
    for key in sorted(keys_a | keys_b):
        kind = _kind(key)
        if kind is None:
            continue
        if key not in keys_a or key not in keys_b or a.get_bytes(key) != b.get_bytes(key):
            diffs.setdefault(kind, []).append(key)
    selections = sorted({k.split("/filter/")[0] + "/" + k.split("/filter/")[1].split("/")[0]
                         for k in keys_a if "/filter/" in k and k.endswith("summary.json")})
    for selection in selections:
        round_part, name = selection.split("/", 1)
        round_idx = int(round_part.split("-")[1])
        if not read_accepted(a, round_idx, name).equals(read_accepted(b, round_idx, name)):
            diffs.setdefault("accepted rows", []).append(selection)
    return diffs


def move_run(root, src: str, dst: str) -> int:
    """Move every object under `src/` to `dst/` within one store: the undisturbed run moves
    aside so that the disturbed one runs at the same run.uri (samples and model cards record
    locations, so runs at two URIs differ in those bytes by design). Returns the count moved."""
    keys = root.list(src)
    for key in keys:
        root.move(key, dst + key[len(src):])
    return len(keys)


def count_samples(store) -> tuple[int, int]:
    """(samples in committed shards of every round, distinct ones): equal when each exists once."""
    from pgraft.commits import list_committed

    keys = []
    rnd = 0
    while store.list(f"round-{rnd:03d}/generate"):
        keys += [f"{rnd}/{k}" for rec in list_committed(store, rnd).values() for k in rec.keys]
        rnd += 1
    return len(keys), len(set(keys))


@dataclass
class ChaosRun:
    """What `run_with_chaos` saw: the job's final log, how many submissions it took, the kills."""

    returncode: int
    log: str
    submissions: int
    driver_kills: list[float]  # seconds since the first submission
    worker_kills: list[tuple[float, str, int]]
    seconds: float


def run_with_chaos(rig: LoopbackCluster, entrypoint: list[str], working_dir: str, monkey: ChaosMonkey | None = None,
                   kill_driver_when=None, driver_marker: str = "pipelines/pgraft_round.py", timeout: float = 1800,
                   max_submissions: int = 3) -> ChaosRun:
    """`ray job submit` the entrypoint on the rig while `monkey` kills workers; once
    `kill_driver_when()` holds (checked every 0.1 s), the job driver is SIGKILLed, once, and
    the same command is submitted again when the job has failed, as a user would."""
    from cluster.loopback import submit_job

    start = time.monotonic()
    driver_kills: list[float] = []
    stop_watch = threading.Event()

    def watch() -> None:
        while kill_driver_when is not None and not stop_watch.wait(0.1):
            if kill_driver_when() and kill_driver(rig, driver_marker):
                driver_kills.append(round(time.monotonic() - start, 1))
                return

    watcher = threading.Thread(target=watch, name="driver-killer", daemon=True)
    watcher.start()
    if monkey is not None:
        monkey.start()
    submissions, done = 0, None
    try:
        while submissions < max_submissions:
            submissions += 1
            done = submit_job(rig, entrypoint, working_dir=working_dir, timeout=timeout)
            if done.returncode == 0 or not driver_kills or submissions > len(driver_kills):
                break  # finished, or failed for another reason than our kill
    finally:
        stop_watch.set()
        kills = monkey.stop() if monkey is not None else []
    return ChaosRun(done.returncode, done.stdout + done.stderr, submissions, driver_kills, kills,
                    round(time.monotonic() - start, 1))
