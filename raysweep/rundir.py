"""A run directory's guards: it is a folder of its own, outside the system's folders (links and
'..' resolved), and one process at a time changes it (a driver, or `archive unpack`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from raysweep.atomic import check_output_path
from raysweep.errors import UserError

DRIVER_FILES = {".lock", ".write-probe"}


def check_run_dir(run_dir: Path) -> Path:
    """The run directory, resolved; refused if it is a system folder or inside one, or a
    non-empty folder that holds something other than a raysweep run."""
    real = check_output_path(run_dir, "a run directory")
    if real.is_dir() and not (real / "spec.yaml").is_file():
        others = [p.name for p in real.iterdir() if p.name not in DRIVER_FILES]
        if others:
            raise UserError(
                f"{run_dir}: not empty and not a raysweep run directory (it holds {sorted(others)[0]!r}); "
                "set 'results' to a new folder"
            )
    elif real.exists() and not real.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder")
    return real


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Only one process changes a run directory at a time: a second is refused, not interleaved."""
    from filelock import FileLock, Timeout

    lock = FileLock(run_dir / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"{run_dir}: another raysweep process (a driver or an unpack) is using this run directory"
        ) from None
    except OSError as exc:
        raise UserError(f"{run_dir}: results directory is not writable ({exc.strerror})") from None
    try:
        yield
    finally:
        lock.release()
