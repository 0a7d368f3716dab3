"""Shared fixtures and tolerances for the test suite.

Tolerances come from the one table in :mod:`jaxcnn.check.tolerances` (reasons in the README).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib
import socket

# The suite is bound by compile time (about 1,200 small programs). XLA's CPU backend compiles
# each kernel with LLVM; at optimization level 0 the suite took 275 s instead of 333 s, and
# 343 s of CPU time instead of 457 s, in one slow phase of a 2-core machine. The programs
# compute the same operations (only the machine code of each is less optimized), so every
# check holds as it is; the benchmarks run with XLA's defaults. JAXCNN_TEST_XLA_DEFAULTS=1
# runs the suite with XLA's defaults too. Set before JAX starts its CPU client (at the first
# computation), and inherited by the processes the tests start.
if os.environ.get("JAXCNN_TEST_XLA_DEFAULTS") != "1":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

from jaxcnn.check import TOLERANCES

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Deterministic, bounded property tests: the same examples on every run and every machine.
settings.register_profile("jaxcnn", derandomize=True, deadline=None, max_examples=12,
                          print_blob=True)
settings.load_profile("jaxcnn")


@pytest.fixture
def x64():
    """Run one test with float64 enabled, and restore the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def tol(dtype) -> dict:
    """``rtol`` / ``atol`` for comparing two computations of the same quantity in ``dtype``."""
    return TOLERANCES[np.dtype(dtype).name]


def assert_close(actual, expected, dtype, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, err_msg=what, **tol(dtype))



# --------------------------------------------------------------------------------------------
# Op-test helpers shared by the per-op test files (test_conv.py, test_pool.py, ...).

IMPLS = ("lax", "manual")

# The deliberate grid: not the full product (that would take hours). Each op file walks
# (spatial dims, stride, padding form) once per op, and rotates dilation, groups, batch size
# and dtype through their values so that each is met with every stride and every padding form.
GRID_NDS = (1, 2, 3)
GRID_STRIDES = (1, 2, 3)
GRID_PADDINGS = ("VALID", "SAME", 1, "uneven")
# Sizes that strides 2 and 3 do not divide, odd and even.
GRID_SPATIAL = {1: (9,), 2: (7, 8), 3: (5, 6, 4)}


def grid_padding(form, nd):
    """A grid padding form as the ops take it: "uneven" becomes explicit unequal pairs."""
    return tuple(((1, 2), (0, 1), (2, 0))[:nd]) if form == "uneven" else form


def unique_values(shape, *, seed=0, step=1.0, centred=False):
    """Distinct values `step` apart in a random order: no ties for max pooling, no near-ties
    (or relu kinks, when `centred` and offset) within a finite-difference step."""
    n = int(np.prod(shape))
    values = np.random.default_rng(seed).permutation(n)
    if centred:
        values = values - n / 2
    return values.reshape(shape) * step


def compare_impls(op, args, dtype):
    """Assert that ``op(*args, impl)`` agrees between "manual" and "lax": the forward, and the
    gradient with respect to every argument of a random scalar function of the output. Both
    keep the dtype of the inputs."""
    ct = np.random.default_rng(1).normal(size=jax.eval_shape(lambda *a: op(*a, "lax"), *args).shape)

    @jax.jit                                                   # one compilation per call
    def both(*a):
        out = {}
        for impl in IMPLS:
            loss = lambda *a: jnp.sum(jnp.sin(op(*a, impl)) * ct)    # noqa: E731
            out[impl] = (op(*a, impl), jax.grad(loss, argnums=tuple(range(len(a))))(*a))
        return out

    out = both(*args)
    assert out["manual"][0].dtype == args[0].dtype
    assert_close(out["manual"][0], out["lax"][0], dtype, "forward")
    for i, (gm, gl) in enumerate(zip(out["manual"][1], out["lax"][1])):
        assert gm.dtype == args[i].dtype, f"gradient {i} dtype"
        assert_close(gm, gl, dtype, f"gradient of argument {i}")

# --------------------------------------------------------------------------------------------
# Data-file helpers shared by the data and command-line tests (no test touches the internet).

TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
              np.float32: 0x0D, np.float64: 0x0E}


def sampled(cases, period=5, keep=(0, 2)):
    """A grid's cases with a sample in the default run: case ``i`` runs by default when
    ``i % period`` is in ``keep``, the others under ``-m slow``. The grids cycle their options
    with periods 2 and 3; a period of 5 is coprime to both, so the sample still holds every
    value of every option."""
    return [c if i % period in keep else
            pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)
            for i, c in enumerate(cases)]


def bad_input_test(cases):
    """A test over ``(call, exception type, message pattern)`` cases: ``call(impl)`` must raise
    that exception with that message under both impls (their validation is shared)."""
    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("call,exc,pattern", cases,
                             ids=[f"case{i}" for i in range(len(cases))])
    def test(call, exc, pattern, impl):
        with pytest.raises(exc, match=pattern):
            call(impl)
    return test


# Early starts. A few session fixtures wait for child processes that take a long time (the
# data-parallel runs of test_parallel.py: about 20 s). Most tests compile on one core, so the
# children run beside the tests before them: a test module registers the function that starts
# them (:func:`start_early`), and the session's first test starts them where a selected test
# uses the fixture; the fixture then takes them (:func:`started_early`).
_EARLY_STARTERS: dict = {}
_EARLY_STARTED: dict = {}


def start_early(fixture_name: str):
    """Decorator: ``fn(tmp_path_factory) -> (anything, [Popen, ...])`` starts, without
    waiting, the processes that the session fixture ``fixture_name`` waits for."""
    def register(fn):
        _EARLY_STARTERS[fixture_name] = fn
        return fn
    return register


def started_early(fixture_name: str, tmp_path_factory):
    """What the starter of ``fixture_name`` returned: started at the session's first test,
    or now (a fixture asked for in a way the selection did not show)."""
    if fixture_name not in _EARLY_STARTED:
        _EARLY_STARTED[fixture_name] = _EARLY_STARTERS[fixture_name](tmp_path_factory)
    return _EARLY_STARTED[fixture_name][0]


@pytest.fixture(scope="session", autouse=True)
def _early_starts(request, tmp_path_factory):
    used = {name for item in request.session.items for name in item.fixturenames}
    for name, start in _EARLY_STARTERS.items():
        if name in used:
            _EARLY_STARTED[name] = start(tmp_path_factory)
    yield
    for _, procs in _EARLY_STARTED.values():  # none left running (say, after a -x stop)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}/"


def load_cli():
    """``train.py`` (at the repository root, not a package module) as a module object."""
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of `array`."""
    array = np.asarray(array)
    code = TYPE_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array, *, gz=True):
    """Write `array` as an IDX file (gzipped if `gz`); return the path."""
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


# The four files of an MNIST-format dataset, by the keys of `jaxcnn.data.Dataset`'s arrays.
IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def write_idx_files(directory, arrays, *, gz=True):
    """Write the four IDX files of `arrays` ({key of IDX_NAMES: array}) into `directory`
    (created if needed); return {key: path}."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    return {
        key: write_idx(directory / (IDX_NAMES[key] + suffix), arrays[key], gz=gz)
        for key in IDX_NAMES
    }


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Keep a test off the internet and out of the real cache; return the dead mirror's URL.

    The default mirrors and ``$JAXCNN_MIRRORS`` point at a closed port on 127.0.0.1 (so a
    subprocess that inherits the environment is offline too), and ``$XDG_CACHE_HOME`` at
    ``tmp_path / "xdg-cache"``.
    """
    dead = closed_port_url()
    monkeypatch.setattr("jaxcnn.data._download._MIRRORS",
                        {"mnist": (dead,), "fashion_mnist": (dead,)})
    monkeypatch.setenv("JAXCNN_MIRRORS", dead)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    return dead
