"""Ctrl-C and SIGTERM while a sweep runs: the driver stops Tune the way Tune stops itself, saves
what finished, and says that the sweep is incomplete (`Interrupted`).

Its own module, never run as `__main__`: the driver (`python -m raysweep.run`) and the trial log
(`raysweep.trainable`) must share one `DRIVER_STEP` list, and it imports no Ray (Ray reads its
loopback switch when first imported).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable

# Hooks the trial log runs at each step of Tune's loop. Tune pickles its callbacks with an
# experiment and unpickles them on --resume, so what belongs to the running driver (its stop on a
# signal) is looked up here when called, never kept in a callback.
DRIVER_STEP: list[Callable[[], None]] = []


class Interrupted(Exception):
    """The sweep was stopped by a signal; what finished is saved."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stop:
    """SIGINT / SIGTERM while a sweep runs. The handler only notes the signal; the stage's Tune
    loop is then stopped the way Tune stops on Ctrl-C (its SIGUSR1 handler, sent from inside the
    loop, where Tune is sure to listen: trials stopped, experiment state saved), and the
    sweep stops before its next stage. A second signal stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self.forwarded = False

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n[raysweep] {signal.Signals(signum).name}: stopping the sweep (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def forward_to_tune(self) -> None:
        if self.signum is not None and not self.forwarded:
            self.forwarded = True
            os.kill(os.getpid(), signal.SIGUSR1)

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def reinstall(self) -> None:
        """Put the handlers back after a library replaced them (ray.init installs a SIGTERM
        handler that exits from wherever the signal lands, skipping the report)."""
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, self._handler)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # (signals reach the main thread only)
            yield self
            return
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours stays; Tune still listens on SIGUSR1
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        DRIVER_STEP.append(self.forward_to_tune)
        try:
            yield self
        finally:
            DRIVER_STEP.remove(self.forward_to_tune)
            for s, handler in previous.items():
                signal.signal(s, handler)
