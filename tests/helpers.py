"""Helpers shared by test modules (importable as `helpers`; tests/ is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

from pgraft.config import load_config


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under `folder`, by relative path."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes(), os.stat(p).st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stage_config(model_path, uri, classifier, *extra):
    """3 prompts × 24 samples in 9 shards of 8 on one generate actor, scored by the digits classifier
    on one reward actor (a test about several actors asks for them: an actor's start, mostly its
    imports, costs more CPU than these runs' work)."""
    return load_config(None, [
        f"run.uri={uri}", f"model.path={model_path}", "model.num_inference_steps=6", "model.device=cpu",
        "generate.prompts=[a handwritten digit 1, a handwritten digit 2, a handwritten digit 3]",
        "generate.samples_per_prompt=24", "generate.samples_per_shard=8", "generate.batch_size=8",
        "generate.capture_steps=[3]", "generate.num_workers=1", f"reward.model_path={classifier}",
        "reward.num_workers=1", "reward.device=cpu", *extra,
    ])


def two_round_config(uri, tiny_digits, classifier_dir, *extra):
    """Two P-GRAFT rounds of 2 prompts × 8 samples on the tiny digits model and one generate actor
    (best-of-4: 4 accepted, 2 epochs of batch 4 = 2 steps), evaluated on 4 fresh seeds per prompt."""
    return load_config(None, [
        f"run.uri={uri}", "run.rounds=2", "task.pretrain=false", f"model.path={tiny_digits}",
        "model.num_inference_steps=6", "model.device=cpu", "generate.prompts=[a handwritten digit 1, a handwritten digit 2]",
        "generate.samples_per_prompt=8", "generate.samples_per_shard=8", "generate.capture_steps=[3]",
        "generate.num_workers=1", f"reward.model_path={classifier_dir}", "filter.n=4", "train.t_step=3",
        "train.epochs=2", "train.batch_size=4", "train.eval_samples_per_prompt=4", *extra,
    ])


class When:
    """A thread that waits until `condition()` holds (polled every 20 ms, up to `timeout` s),
    then calls `act()` once; `result` is what `act` returned (None until then)."""

    def __init__(self, condition, act, timeout: float = 300.0):
        import threading

        self.condition, self.act, self.timeout = condition, act, timeout
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import time

        deadline = time.time() + self.timeout
        while time.time() < deadline and self.result is None:
            if self.condition():
                self.result = self.act()
            time.sleep(0.02)

    def join(self):
        self.thread.join(timeout=5)
        return self.result


class KillWhen(When):
    """Once `condition()` holds, SIGKILL one process whose command line (a Ray worker's process
    title, e.g. `ray::GenerateWorker`) contains `marker`: a real lost worker, with no hook in
    the code under test. Only this test process's own descendants are candidates (the workers of
    the Ray it started), so a suite never kills a study's or another suite's workers. `join()`
    returns the pid it killed."""

    def __init__(self, condition, marker: str, timeout: float = 300.0):
        self.marker = marker
        super().__init__(condition, self._kill, timeout)

    def _kill(self) -> int | None:
        import signal

        matches = own_processes(self.marker)
        if not matches:
            return None  # not started yet: look again
        # The newest match: older processes with the same title may be idle leftovers.
        newest = max(matches, key=lambda p: p.info["create_time"])
        os.kill(newest.info["pid"], signal.SIGKILL)
        return newest.info["pid"]


def own_processes(marker: str) -> list:
    """Live descendants of this process whose command line contains `marker` (psutil processes
    with `info` holding pid, cmdline and create_time)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            proc.info = proc.as_dict(["pid", "cmdline", "create_time"])
        except psutil.Error:
            continue  # gone meanwhile
        if marker in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def watch_rig(state: Path, timeout: float = 600) -> dict:
    """Start a thread that reads the loopback rig's state file as soon as `make cluster-up`
    has written it (the node ids; the file is gone after `make cluster-down`). The returned
    dict gains `"rig"` once read."""
    import threading
    import time

    from cluster import loopback

    seen: dict = {}

    def remember() -> None:
        deadline = time.time() + timeout
        while "rig" not in seen and time.time() < deadline:
            if state.exists():
                try:
                    seen["rig"] = loopback.load_state(state)
                except (OSError, ValueError):
                    pass  # still being written
            time.sleep(0.2)

    threading.Thread(target=remember, daemon=True).start()
    return seen


class OutageWhen(When):
    """Once `condition()` holds, take the store away through the fault proxy for `seconds`
    (every connection cut, new ones too). `join()` returns when it began (monotonic)."""

    def __init__(self, condition, proxy, seconds: float, timeout: float = 300.0):
        def take_away() -> float:
            import time

            proxy.outage(seconds, mode="cut")
            return time.monotonic()

        super().__init__(condition, take_away, timeout)
