"""Where raysweep writes, and how: never into a folder of the operating system, and always
write-then-rename, so that a crash never leaves a half-written cache or result behind."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from raysweep.core.errors import UserError

# Folders of the operating system: raysweep writes nothing into them.
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr")


def _system_folder(path: Path) -> str | None:
    for d in SYSTEM_DIRS:
        for folder in {Path(d), Path(d).resolve()}:  # /lib is /usr/lib on a merged-/usr system
            if path == folder or folder in path.parents:
                return d
    return None


def check_output_path(path: Path, what: str) -> Path:
    """`path` with its links and '..' resolved, refused if it is the root or lies in a system
    folder, however it is written (a link to /etc, /tmp/a/../../etc/x)."""
    written = Path(path).expanduser().absolute()
    try:
        real = written.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop, a name too long
        raise UserError(
            f"{path}: cannot be used as {what} ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    for candidate in (written, real):
        if candidate == Path(candidate.anchor) or _system_folder(candidate):
            shown = "" if candidate == written else f" (it resolves to {real})"
            raise UserError(f"{path}: a system folder cannot be {what}{shown}; choose a folder of your own")
    return real


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write` on a temporary sibling of `path`, then rename it into place. The file gets the
    user's umask (as any file they write would), so others on a shared file system can read it."""
    check_output_path(path.parent, "where raysweep writes")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
