"""Progress in job logs: plain lines at every tenth of the work, no carriage returns."""

from __future__ import annotations

import io

from pgraft.progress import LineProgress, progress_bar


def test_a_log_gets_a_line_per_tenth_and_never_a_carriage_return():
    log = io.StringIO()
    bar = progress_bar(100, "generate round 0", "unit", stream=log)
    assert isinstance(bar, LineProgress)
    for _ in range(100):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 10
    assert lines[0].startswith("generate round 0: 10/100 unit (10%)") and lines[-1].startswith("generate round 0: 100/100 unit (100%)")


def test_uneven_totals_still_give_ten_lines():
    log = io.StringIO()
    bar = progress_bar(25, "x", stream=log)
    for _ in range(25):
        bar.update(1)
    assert [line.split(",")[0].split(" ")[1] for line in log.getvalue().splitlines()] == [
        "3/25", "5/25", "8/25", "10/25", "13/25", "15/25", "18/25", "20/25", "23/25", "25/25"]


def test_few_items_print_each_and_the_end_once():
    log = io.StringIO()
    bar = progress_bar(3, "reward", stream=log)
    for _ in range(3):
        bar.update(1)
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == ["reward: 1/3 unit (33%)", "reward: 2/3 unit (67%)",
                                                                           "reward: 3/3 unit (100%)"]


def test_disabled_progress_prints_nothing():
    log = io.StringIO()
    bar = progress_bar(5, "x", enabled=False, stream=log)
    bar.update(5)
    bar.close()
    assert log.getvalue() == ""
