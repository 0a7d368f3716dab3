"""jaxcnn._xla_cpu: the workarounds that change more than how one program is scheduled.

(The conditionals that isolate and order the manual ops are tested with the ops they serve,
in test_conv.py.)
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

# In a fresh process (the setting is for the whole process, and holds only where it is made
# before JAX starts): allocate, touch and free 64 MiB twice; print the page faults of the
# second round. glibc serves 64 MiB (above its largest mmap threshold) from a new mapping
# each time, so the second round faults on every 4 KiB page again, unless told to keep it.
_TWICE = textwrap.dedent("""
    import ctypes, resource, sys
    import jaxcnn
    applied = jaxcnn.reuse_host_memory() if sys.argv[1] == "reuse" else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    for round in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(applied, faults)
""")


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version
        return sys.platform.startswith("linux")
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not _glibc(), reason="the setting exists for glibc only")
def test_reused_host_memory_is_not_faulted_in_again():
    def second_round(mode):
        out = subprocess.run([sys.executable, "-c", _TWICE, mode], capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    pages = (64 << 20) // 4096
    assert second_round("fresh") == (False, pytest.approx(pages, rel=0.1))  # the test can fail
    applied, faults = second_round("reuse")
    assert applied and faults < pages // 100, faults


def test_reuse_host_memory_does_nothing_with_the_workarounds_off(monkeypatch):
    from jaxcnn import _xla_cpu

    monkeypatch.setattr(_xla_cpu, "ENABLED", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: pytest.fail("libc was called"))
    assert _xla_cpu.reuse_host_memory() is False
