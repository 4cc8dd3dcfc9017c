"""The report rewritten while a sweep runs (the live page), in a thread of its own."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from raysweep.core.errors import UserError
from raysweep.report.render import write_report
from raysweep.sweep.rundir import RunDir


class LivePage:
    """The report rewritten while a sweep runs, in a thread of its own so that Tune's loop never
    waits for a figure: each request replaces one not yet served, and the report is written at
    most every `every` seconds, and never more than a tenth of the time (a build takes longer
    as trials accumulate, and the page must not take a trial's CPU). `close` writes what is
    still requested and ends the thread."""

    def __init__(self, run: RunDir, every: float = 10.0):
        self.run, self.every = run, every
        self.build_seconds = 0.0
        self.cache: dict = {}
        self.wanted: dict[str, Any] | None = None
        self.closing = False
        self.written_at = 0.0
        self.reported: set[str] = set()
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self._serve, name="raysweep-live-page", daemon=True)
        self.thread.start()

    def request(self, progress: dict[str, Any]) -> None:
        with self.condition:
            self.wanted = progress
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self.closing = True
            self.condition.notify()
        self.thread.join()

    def _serve(self) -> None:
        while True:
            with self.condition:
                while self.wanted is None and not self.closing:
                    self.condition.wait()
                if self.wanted is None:
                    return
                # (a request wakes the thread early: the deadline still holds)
                deadline = self.written_at + max(self.every, 9 * self.build_seconds)
                while not self.closing and (left := deadline - time.monotonic()) > 0:
                    self.condition.wait(left)
                progress, self.wanted = self.wanted, None
            began = time.monotonic()
            try:
                write_report(self.run, progress, self.cache)
            except (UserError, OSError, ValueError) as exc:  # the sweep goes on; say so once per problem
                if str(exc) not in self.reported:
                    self.reported.add(str(exc))
                    print(
                        f"[raysweep] the live page could not be written: {exc}", file=sys.stderr, flush=True
                    )
            self.written_at = time.monotonic()
            self.build_seconds = self.written_at - began
