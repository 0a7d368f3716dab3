"""jaxcnn._xla_cpu: the workarounds that change more than how one program is scheduled, and
what the compiled program of the others holds (a workaround that XLA optimizes away is a
compile or run time lost in silence).

(That the conditionals which isolate and order the manual ops keep every result is tested
with the ops they serve, in test_conv.py.)
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import _xla_cpu

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU workarounds")

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


def _kernels(f, *args) -> list[str]:
    """The computations of ``f``'s compiled program, as text (one per fused kernel, branch,
    loop body...)."""
    return re.split(r"\n(?=%)", f.lower(*args).compile().as_text())


def _fills(kernels) -> list[str]:
    """The kernels that only broadcast a value (zeros for a branch that never runs)."""
    ops = [set(re.findall(r"= \S+ ([a-z-]+)\(", k)) for k in kernels]
    return [k for k, o in zip(kernels, ops) if "broadcast" in o
            and o <= {"broadcast", "parameter", "constant"}]


@on_cpu
def test_materialize_compiles_no_zeros_for_the_branch_that_never_runs(monkeypatch):
    """Its other branch repeats its one kernel (compiled once for both) rather than returning
    zeros, a kernel of their own; after()'s returns zeros."""
    monkeypatch.setattr(_xla_cpu, "ENABLED", True)
    x = np.ones((2, 3, 4), np.float32)
    op = lambda a: jnp.pad(a, ((0, 0), (1, 1), (0, 0)))                  # noqa: E731
    assert not _fills(_kernels(jax.jit(lambda a: _xla_cpu.materialize(op, a)), x))
    assert _fills(_kernels(jax.jit(lambda a: _xla_cpu.after(a, op, a)), x))  # can fail


def _pad_and_move(a):
    return jnp.moveaxis(jnp.pad(a, ((0, 0), (1, 2), (0, 0))), 1, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.bool_])
def test_materialize_returns_what_its_op_returns(dtype, monkeypatch):
    """Bit for bit, NaN, infinities and -0 included (on CPU the op reads its input times an
    opaque 1), and its gradient is the op's."""
    monkeypatch.setattr(_xla_cpu, "ENABLED", True)
    x = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        x[0, 0, :3] = [np.nan, -np.inf, -0.0]
    out = np.asarray(jax.jit(lambda a: _xla_cpu.materialize(_pad_and_move, a))(x))
    want = np.asarray(_pad_and_move(x))
    assert out.dtype == want.dtype
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(np.signbit(out), np.signbit(want))
    if np.issubdtype(dtype, np.floating):
        w = np.random.default_rng(0).normal(size=want.shape).astype(np.float32)
        grad = jax.grad(lambda a: jnp.sum(_xla_cpu.materialize(_pad_and_move, a) * w))
        np.testing.assert_array_equal(grad(np.zeros(x.shape, np.float32)),
                                      jax.grad(lambda a: jnp.sum(_pad_and_move(a) * w))(
                                          np.zeros(x.shape, np.float32)))


@on_cpu
def test_a_materialized_padding_is_compiled_with_a_product_not_alone(monkeypatch):
    """XLA:CPU compiles a padding that is a kernel of its own slowly and runs it slowly (see
    the module docstring): the kernel that pads also multiplies."""
    monkeypatch.setattr(_xla_cpu, "ENABLED", True)
    x = np.ones((8, 14, 14, 16), np.float32)
    f = jax.jit(lambda a: _xla_cpu.materialize(
        lambda a: jnp.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0))), a) * 2)
    pads = [k for k in _kernels(f, x) if " pad(" in k]
    assert pads and all(" multiply(" in k for k in pads), pads
