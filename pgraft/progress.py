"""Progress that reads well on a terminal and in a job log.

On a terminal, a tqdm bar redrawn in place. Anywhere else (`ray job logs`, a CI log, a file) a
redrawn bar is one line per refresh glued together by carriage returns, so there we print a
plain line each time another tenth of the work is done, and one after any update that comes more
than a minute after the last line.
"""

from __future__ import annotations

import sys
import time

LINE_MAX_SECONDS = 60.0  # a line on the first update after this long without one, tenth or not


class LineProgress:
    """tqdm's update/close for logs: 'desc: 3/10 unit (30%), 12 s elapsed, 0.25 unit/s'."""

    def __init__(self, total: int, desc: str, unit: str, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.stream = stream or sys.stderr
        self.start = self.last_time = time.perf_counter()
        self.tenths_shown = 0  # lines printed at tenths so far: the next is due at ceil(total × (tenths_shown+1)/10)

    def _tenths_done(self) -> int:
        return int(self.n * 10 // self.total) if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        tenths = self._tenths_done()
        if tenths > self.tenths_shown or now - self.last_time >= LINE_MAX_SECONDS:
            self._line(now)
            self.tenths_shown = tenths

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {elapsed:.0f} s elapsed, {rate:.2f} {self.unit}/s",
              file=self.stream, flush=True)
        self.last_time = now

    def close(self) -> None:
        """Nothing to tidy: every line is already complete (tqdm's interface)."""


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
