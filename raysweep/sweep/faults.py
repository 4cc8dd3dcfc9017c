"""Named fault points, so the reliability tests can kill a driver or a trial exactly where a
real crash would hurt. Inert unless a test sets them.

- Driver: RAYSWEEP_KILL_DRIVER_AT=<point> SIGKILLs the driver when it reaches that point:
  `first-report` (trials running, none finished), `first-finish` (one finished, others
  running), `results-write` (the results table written to its temporary name, not renamed).
- Driver: RAYSWEEP_SIGNAL_DRIVER_AT=<point>[:<signal>] sends the driver SIGINT (or the signal
  named, e.g. `first-report:SIGTERM`) once, at that point or at `search-end` (a search stage's
  Tune run returned) or `seeds-end` (the seeds stage's returned, every trial ended).
- Trial: the trial setting `extra: {kill_at_epoch: E}` SIGKILLs the trial's process at
  epoch E on its first attempt; `extra: {raise_at_epoch: E}` raises there on every attempt.
"""

from __future__ import annotations

import os
import signal

DRIVER_POINTS = ("first-report", "first-finish", "results-write", "search-end", "seeds-end")
_signalled: set[str] = set()


def driver_point(name: str) -> None:
    if os.environ.get("RAYSWEEP_KILL_DRIVER_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    point, _, signame = os.environ.get("RAYSWEEP_SIGNAL_DRIVER_AT", "").partition(":")
    if point == name and name not in _signalled:
        _signalled.add(name)
        os.kill(os.getpid(), getattr(signal, signame or "SIGINT"))


def trial_point(extra: dict, epoch: int, restored: bool) -> None:
    if extra.get("kill_at_epoch") == epoch and not restored:
        os.kill(os.getpid(), signal.SIGKILL)
    if extra.get("raise_at_epoch") == epoch:
        raise RuntimeError(f"injected failure at epoch {epoch}")
