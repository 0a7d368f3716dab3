"""Writing files so that nothing a user saved is ever lost or half-written.

One helper for every file the project writes (downloads, checkpoints, metrics, reports): the
content goes to a temporary file in the target's directory, is flushed and fsynced, and is
renamed over the target (atomic on POSIX); the directory is fsynced so the rename itself is
durable. If writing fails at any point the temporary file is removed and the target, if it
existed, is untouched.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Any, Callable


def atomic_write(path, write: Callable[[Any], None], *, mode: int = 0o644) -> None:
    """Create or replace ``path`` with what ``write(f)`` writes to a binary file object.

    ``write`` may raise to abandon the write (e.g. a checksum mismatch): the target is then
    left as it was.
    """
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)           # mkstemp makes the file private (0o600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
