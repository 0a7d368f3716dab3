"""Writing files so that nothing a user saved is ever lost or half-written.

One helper for every file the project writes (downloads, checkpoints, metrics, reports): the
content goes to a temporary file in the target's directory, is flushed and fsynced, and is
renamed over the target (atomic on POSIX); the directory is fsynced so the rename itself is
durable. If writing fails at any point the temporary file is removed and the target, if it
existed, is untouched. A process killed while writing leaves its temporary file behind
(``.NAME.XXXXXXXX.tmp`` beside ``NAME``): :func:`leftover_temporaries` finds them.

Appending a line (:func:`append_line`) is durable too, and a failed append leaves the file as
it was. :func:`signals_deferred` holds Ctrl-C and SIGTERM back while several writes and the
record of them must happen together.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import tempfile
import threading
from typing import Any, Callable

_TMP_SUFFIX = ".tmp"


def atomic_write(path, write: Callable[[Any], None], *, mode: int = 0o644) -> None:
    """Create or replace ``path`` with what ``write(f)`` writes to a binary file object.

    ``write`` may raise to abandon the write (e.g. a checksum mismatch): the target is then
    left as it was.
    """
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
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


def write_json(path, value, *, indent: int | None = 2) -> None:
    """Create or replace ``path`` with ``value`` as standard JSON (no NaN or Infinity, which
    strict readers refuse) and a final newline, atomically."""
    text = json.dumps(value, indent=indent, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def append_line(path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` (created if missing) and make it durable.

    If the write fails part-way (a full disk), the file is cut back to its old length, so it
    never ends in half a line. Unbuffered ``os.write`` calls, so that nothing is left in a
    buffer to be written later.
    """
    data = memoryview(line.encode() + b"\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def leftover_temporaries(directory, name: str) -> list[pathlib.Path]:
    """The temporary files that an :func:`atomic_write` of ``directory / name`` killed before
    its rename left behind."""
    return sorted(pathlib.Path(directory).glob(f".{name}.*{_TMP_SUFFIX}"))


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM back until the block ends, then deliver them, so that an
    interrupt never falls between writing an epoch's checkpoint, its metrics line and the
    record of what is on disk. Only in the main thread (the only one that may set handlers),
    and only for signals handled by a Python function (Ctrl-C's KeyboardInterrupt, train.py's
    SIGTERM handler). Any other handler is left alone: a signal with its default action ends
    the process anyway, and JAX's own C++ SIGTERM handler of a multi-process run (which
    ``signal.getsignal`` cannot see: it reports the default) must stay installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if callable(h)}
    received = []
    for s in previous:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in received:
            signal.raise_signal(signum)


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
