"""Progress within an epoch as people read it: a duration in words, and the progress bar that
`python -m raysweep.train` shows on a terminal while an epoch trains."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    """3 s, 4 min 05 s, 1 h 02 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def time_left(seconds: float, step: int, steps: int) -> float | None:
    """The epoch's remaining time from the pace of the steps after its first (the first carries
    warm-up: allocation, graph capture); None before there is a pace."""
    return seconds / (step - 1) * (steps - step) if step > 1 and seconds > 0 else None


class StepBar:
    """`on_step(epoch, step, steps)` for a terminal: one line rewritten in place at most every
    `every` seconds, erased when the epoch's last step is done (the epoch's own line follows)."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 0.5, width: int = 30):
        self.stream, self.every, self.width = stream, every, width
        self.epoch, self.first, self.shown = 0, 0.0, float("-inf")

    def __call__(self, epoch: int, step: int, steps: int) -> None:
        now = time.monotonic()
        if epoch != self.epoch:
            self.epoch, self.first = epoch, now
        if step == steps:
            self.stream.write("\r\033[K")
            self.stream.flush()
            return
        if now - self.shown < self.every:
            return
        self.shown = now
        filled = self.width * step // steps
        left = time_left(now - self.first, step, steps)
        eta = "" if left is None else f", ~{clock(left)} left"
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\repoch {epoch:3d} [{bar}] {step}/{steps} steps{eta}\033[K")
        self.stream.flush()
