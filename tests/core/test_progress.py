import io

import pytest

from raysweep.core import progress
from raysweep.core.progress import StepBar, clock, time_left


def test_clock_and_time_left():
    assert [clock(s) for s in (3.4, 65, 3725)] == ["3 s", "1 min 05 s", "1 h 02 min"]
    assert time_left(10.0, 1, 100) is None  # the first step alone gives no pace
    assert time_left(10.0, 11, 100) == pytest.approx(89.0)  # 10 steps in 10 s, 89 to go


def test_the_terminal_bar_rewrites_one_line_and_erases_it_at_the_epochs_end(monkeypatch):
    now = iter([0.0, 1.0, 5.0, 6.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(now))
    out = io.StringIO()
    bar = StepBar(out, every=0.5, width=10)
    bar(1, 1, 10)
    bar(1, 2, 10)
    bar(1, 6, 10)
    bar(1, 10, 10)
    lines = out.getvalue().split("\r")[1:]
    assert lines[0] == "epoch   1 [#.........] 1/10 steps\033[K"
    assert lines[1] == "epoch   1 [##........] 2/10 steps, ~8 s left\033[K"  # 1 s a step, 8 to go
    assert lines[2] == "epoch   1 [######....] 6/10 steps, ~4 s left\033[K"  # 5 steps in 5 s, 4 to go
    assert lines[3] == "\033[K"  # erased: the epoch's own line takes its place
