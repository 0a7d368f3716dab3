"""A run's output directory: held by one run at a time, and never another run's files replaced
by accident.

:func:`claim`, called by process 0 before anything in the directory changes:

1. creates the directory if needed (a resumed run needs its checkpoint there first);
2. takes an OS lock on ``DIR/.lock`` (``fcntl.flock``, which the kernel releases when the
   process ends, even by ``kill -9``; the file names the holder's pid); a second run refuses,
   naming that pid;
3. removes the temporary files that a write killed before its rename left behind
   (``.checkpoint.npz.XXXXXXXX.tmp`` and the like: only ours, and only with the lock held);
4. refuses, for a new run, a directory that holds another run's files, unless the run
   replaces them (``overwrite``); then removes them in an order that keeps ``metrics.jsonl``
   within the checkpoint at every moment.

The lock is held until the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import time

from . import _io, _report
from .checkpoint import FILENAME as CHECKPOINT
from .checkpoint import check_exists

try:
    import fcntl
except ImportError:  # not POSIX: no lock (a note says so)
    fcntl = None

LOCK = ".lock"
RUN_FILES = (CHECKPOINT, _report.METRICS, _report.SUMMARY, *_report.PLOTS)
# Removal order for --overwrite: the results first, metrics.jsonl before the checkpoint, so a
# kill in between never leaves metrics listing epochs that no checkpoint has.
_REMOVAL_ORDER = (_report.SUMMARY, *_report.PLOTS, _report.METRICS, CHECKPOINT)


@contextlib.contextmanager
def claim(fn: str, out, *, resume: bool, overwrite: bool):
    """Hold ``out`` for one run (see the module docstring) while the ``with`` block runs.

    Raises:
      FileNotFoundError: ``resume`` and no checkpoint in ``out`` (nothing is created).
      OSError: ``out`` cannot be created (the message names it).
      RuntimeError: another run holds ``out`` (the message names its pid).
      FileExistsError: a new run, without ``overwrite``, into a directory holding another
        run's files (nothing is changed).
    """
    out = pathlib.Path(out)
    if resume:
        check_exists(out / CHECKPOINT, "; there is nothing to resume: start the run without "
                                       "--resume")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"{fn}: cannot create the output directory {out}: {err}") from err
    lock = _lock(fn, out)
    try:
        _remove_leftovers(out)
        if not resume:
            _refuse_or_clear(fn, out, overwrite)
        yield
    finally:
        lock.close()  # closing the file releases the lock


def remove_results(out) -> None:
    """Remove ``summary.json`` and the plots: a run that trains on must not leave a summary
    that describes an older checkpoint."""
    for name in (_report.SUMMARY, *_report.PLOTS):
        (pathlib.Path(out) / name).unlink(missing_ok=True)


def _lock(fn: str, out: pathlib.Path):
    """The open lock file of ``out``, locked; its content names this process."""
    f = open(os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
    if fcntl is None:
        print(f"note: no file locks on this system; make sure no other run writes to {out}",
              flush=True)
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "a process that has not written its pid yet"
        f.close()
        raise RuntimeError(
            f"{fn}: {out} is in use by another run ({holder}); two runs cannot share an output "
            f"directory: wait for that run to end, or choose another --out") from None
    except OSError as err:  # a file system without locks (some network file systems)
        print(f"note: could not lock {out} ({err}); make sure no other run writes there",
              flush=True)
        return f
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def _remove_leftovers(out: pathlib.Path) -> None:
    """Remove the temporary files of our writes that a killed process left in ``out``."""
    for name in RUN_FILES:
        for tmp in _io.leftover_temporaries(out, name):
            tmp.unlink(missing_ok=True)


def _refuse_or_clear(fn: str, out: pathlib.Path, overwrite: bool) -> None:
    """Refuse ``out`` if it holds another run's files, or remove them when ``overwrite``."""
    found = [name for name in RUN_FILES if _holds(out / name)]
    if not found:
        return
    if not overwrite:
        raise FileExistsError(
            f"{fn}: {out} holds another run's files ({', '.join(found)}); continue that run "
            f"with --resume, replace it with --overwrite, or choose another --out")
    for name in _REMOVAL_ORDER:
        (out / name).unlink(missing_ok=True)
    _io.fsync_dir(out)


def _holds(path: pathlib.Path) -> bool:
    """A run's file: a regular file (an empty metrics.jsonl records nothing)."""
    return path.is_file() and (path.name != _report.METRICS or path.stat().st_size > 0)
