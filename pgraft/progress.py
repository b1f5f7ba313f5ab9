"""Progress that reads well on a terminal and in a job log.

On a terminal, a tqdm bar redrawn in place. Anywhere else (`ray job logs`, a CI log, a file) a
redrawn bar is one line per refresh glued together by carriage returns, so there we print a
plain line at every tenth of the work, and at most one a minute in between.
"""

from __future__ import annotations

import sys
import time

LINE_FRACTION = 0.1  # a plain line at every tenth of the work
LINE_MAX_SECONDS = 60.0  # and at least one a minute on long steps


class LineProgress:
    """tqdm's update/close for logs: 'desc: 3/10 unit (30%), 12 s elapsed, 0.25 unit/s'."""

    def __init__(self, total: int, desc: str, unit: str, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.stream = stream or sys.stderr
        self.start = self.last_time = time.perf_counter()
        self.next_mark = max(1, round(total * LINE_FRACTION))
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.n >= self.next_mark or self.n == self.total or now - self.last_time >= LINE_MAX_SECONDS:
            self._line(now)
            while self.next_mark <= self.n:
                self.next_mark += max(1, round(self.total * LINE_FRACTION))

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {elapsed:.0f} s elapsed, {rate:.2f} {self.unit}/s",
              file=self.stream, flush=True)
        self.last_time = now

    def close(self) -> None:
        self.closed = True


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "unit", enabled: bool = True, stream=None):
    """A tqdm bar on a terminal, LineProgress elsewhere, nothing when disabled."""
    if not enabled:
        return _Silent()
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream)
    return LineProgress(total, desc, unit, stream)
