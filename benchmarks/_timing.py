"""Timing helpers shared by the benchmark scripts: interleaved medians, first calls, the machine.

Every timing blocks on the result (``jax.block_until_ready``), so it holds on any backend.
Nothing here is specific to a CPU: the scripts run as they are on a GPU or TPU.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time

import jax

import jaxcnn

HOST_MEMORY_REUSED = False
"""Whether this process called :func:`jaxcnn.reuse_host_memory` (through
:func:`reuse_host_memory`), for the machine line."""


def reuse_host_memory() -> bool:
    """:func:`jaxcnn.reuse_host_memory` for this benchmark process, as ``train.py`` does: call
    it before the first computation. Returns (and records) whether it applied."""
    global HOST_MEMORY_REUSED
    HOST_MEMORY_REUSED = jaxcnn.reuse_host_memory()
    return HOST_MEMORY_REUSED


def sample(f, args, inner: int) -> float:
    """Seconds per call of ``f(*args)``, averaged over ``inner`` calls, each one blocked on."""
    started = time.perf_counter()
    for _ in range(inner):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - started) / inner


def calls_per_sample(f, args, min_seconds: float) -> int:
    """How many calls of the (warm) ``f`` make one sample last at least ``min_seconds``, so
    that sub-millisecond ops are not timed below the clock's and the dispatcher's noise."""
    once = sample(f, args, 1)
    return max(1, math.ceil(min_seconds / max(once, 1e-6)))


def interleaved(calls: dict, *, repeats: int, min_seconds: float, same_inner=True) -> dict:
    """Time several warm functions in alternating rounds.

    ``calls``: name -> ``(f, args)``, ``f`` jitted and already compiled. Each round takes one
    sample of every function (``inner`` calls of it, see :func:`calls_per_sample`), and the
    order rotates from round to round, so a slow phase of a shared machine hits all of them
    alike. With ``same_inner`` every function makes as many calls per sample as the first one
    needs (both sides of a ratio then average the same number of calls); otherwise each
    function gets its own count.

    Returns ``{name: [seconds per call of each round]}``.
    """
    names = list(calls)
    first = calls_per_sample(*calls[names[0]], min_seconds)
    inner = {name: first if same_inner or i == 0 else calls_per_sample(*calls[name], min_seconds)
             for i, name in enumerate(names)}
    times = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(sample(*calls[name], inner[name]))
    return times


def ratios(times: dict, num: str, den: str) -> list[float]:
    """Per-round ratios ``times[num][r] / times[den][r]`` of :func:`interleaved`'s result."""
    return [a / b for a, b in zip(times[num], times[den])]


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def first_call(make, args):
    """``(seconds, f)``: the first call (trace, compile and run) of a freshly made jitted
    function ``f = make()``.

    ``make()`` builds the function; every jit cache of the process is cleared first
    (``jax.clear_caches``, which also empties the caches of jaxcnn's own jitted ops), so
    nothing compiled for another implementation or an earlier case is reused. The persistent
    compilation cache is switched off by :func:`no_persistent_cache`.
    """
    jax.clear_caches()
    f = make()
    started = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - started, f


def no_persistent_cache() -> None:
    """Switch off JAX's on-disk compilation cache, which would turn first calls into loads."""
    try:
        jax.config.update("jax_enable_compilation_cache", False)
    except (AttributeError, KeyError, ValueError):  # an older jax without the option
        pass


def machine() -> dict:
    """What the numbers were measured on: date, host, cores, versions, backend."""
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    devices = jax.devices()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "host_memory_reused": HOST_MEMORY_REUSED,
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("JAXCNN_", "XLA_FLAGS", "JAX_", "OMP_", "MKL_"))},
    }


def machine_line(m: dict) -> str:
    env = " ".join(f"{k}={v}" for k, v in sorted(m["env"].items()))
    return (f"{m['date']}; {m['cpu']}, {m['cores']} cores; python {m['python']}, jax {m['jax']}"
            f" (jaxlib {m['jaxlib']}), backend {m['backend']} ({m['devices']}); "
            + ("host memory reused between runs (jaxcnn.reuse_host_memory, as train.py)"
               if m.get("host_memory_reused") else "glibc's default allocator")
            + (f"; env {env}" if env else ""))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
