"""One-line user errors: every bad input ends as `error: <what and where>` and exit status 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (data file, sweep file, settings), not a bug."""


class Diverged(UserError):
    """The training loss turned NaN or infinite: the trial's settings (a learning rate too
    large, say) cannot train this model. The trial stops and is recorded as failed."""

    def __init__(self, epoch: int, loss: float):
        super().__init__(f"diverged at epoch {epoch}: the training loss is {loss}")
        self.epoch = epoch


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command-line entry point so that a UserError prints one line and exits 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped
