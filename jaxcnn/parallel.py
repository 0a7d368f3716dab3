"""Data parallelism with ``jax.sharding``: the same program on one device or many, one host or many.

No home-made parallelism: a 1-D :class:`jax.sharding.Mesh` named ``"data"`` over the devices,
every batch split along it (``NamedSharding(mesh, P("data"))``), params and optimizer state
replicated (``NamedSharding(mesh, P())``), and the one jitted training step of
:mod:`jaxcnn.training`. XLA inserts the all-reduce of the gradients; on many hosts JAX's own
distributed runtime (``jax.distributed.initialize``) connects the processes::

    parallel.initialize(coordinator="10.0.0.1:1234", num_processes=2, process_id=0)  # many hosts
    mesh = parallel.data_mesh()                   # every device of every process (or the first n)
    params = parallel.replicate(params, mesh)     # the same value on every device
    rows = parallel.process_rows(mesh, 256)       # this process's rows of a global batch of 256
    xb = parallel.shard(mesh, x[idx[rows]], 256)  # a global (256, ...) array, split over "data"

Nothing here names a platform: the same code runs on CPU, GPU and TPU. On CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` gives one process four devices (the
tests use it).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import _shapes

AXIS = "data"  # the one mesh axis: the batch dimension is split along it
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed.initialize itself
# Launchers whose environment jax.distributed.initialize reads by itself: the variables JAX's
# cluster detection requires (jax/_src/clusters), and the one that holds the process count.
LAUNCHERS = {
    "SLURM (srun)": (("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                      "SLURM_LOCALID"), "SLURM_NTASKS"),
    "Open MPI (mpirun)": (("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE"),
                          "OMPI_COMM_WORLD_SIZE"),
}


# --------------------------------------------------------------------------------------------
# Many processes.


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               timeout: int = 300) -> bool:
    """Start JAX's distributed runtime when the settings of a multi-process run are given.

    Nothing happens (and False is returned) unless one of ``coordinator``, ``num_processes``,
    ``process_id`` is given, ``$JAX_COORDINATOR_ADDRESS`` is set, this process is one of
    several that ``srun`` or ``mpirun`` started (:func:`launcher`), or ``auto`` is true (for
    the clusters JAX detects without such variables: Cloud TPU pods, Kubernetes); then
    ``jax.distributed.initialize`` is called with the given values and fills in the others
    itself, from ``$JAX_COORDINATOR_ADDRESS`` or the cluster's environment. Must run before
    anything else uses JAX (the first device query fixes the set of devices).

    JAX then connects to the coordinator (process 0 starts it) and waits for every process, up
    to ``timeout`` seconds; if they do not all arrive, JAX aborts the process (its message
    names the coordinator). A multi-process run also turns on JAX's preemption service: a
    SIGTERM to any process makes all of them stop together at the same step (see
    :func:`preempted`).

    Returns:
      True when the distributed runtime was started.

    Raises:
      TypeError, ValueError: a malformed setting (naming it), or settings that JAX cannot
        complete (e.g. a coordinator without a process count outside a known cluster).
      RuntimeError: JAX was already in use in this process (JAX's message).
    """
    fn = "initialize"
    given = coordinator is not None or num_processes is not None or process_id is not None
    if not (given or auto or os.environ.get(COORDINATOR_ENV) or launcher()):
        return False
    if coordinator is not None:
        if not isinstance(coordinator, str):
            raise TypeError(f"{fn}: coordinator must be a 'host:port' string; got "
                            f"{type(coordinator).__name__} {coordinator!r}")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{fn}: coordinator must be 'host:port' with a port in 1..65535; "
                             f"got {coordinator!r}")
    if num_processes is not None:
        _shapes.check_int(fn, "num_processes", num_processes, minimum=1)
    if process_id is not None:
        _shapes.check_int(fn, "process_id", process_id)
    if process_id is not None and process_id < 0:
        raise ValueError(f"{fn}: process_id must be >= 0; got {process_id}")
    if process_id is not None and num_processes is not None and process_id >= num_processes:
        raise ValueError(f"{fn}: process_id must lie in 0..num_processes-1 "
                         f"(0..{num_processes - 1}); got {process_id}")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=timeout)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{fn}: the distributed settings are incomplete: {err} (given: coordinator="
            f"{coordinator!r}, num_processes={num_processes!r}, process_id={process_id!r}, "
            f"${COORDINATOR_ENV}={os.environ.get(COORDINATOR_ENV)!r})") from err
    except Exception as err:  # noqa: BLE001 - JAX raises XlaRuntimeError / RuntimeError
        where = coordinator or os.environ.get(COORDINATOR_ENV) or f"(from {launcher()})"
        raise RuntimeError(f"{fn}: starting JAX's distributed runtime with coordinator {where} "
                           f"failed: {err}") from err
    return True


def launcher() -> str | None:
    """The launcher (of :data:`LAUNCHERS`) that started this process as one of several, or
    None: a single ``srun`` / ``mpirun`` task, or none at all, is an ordinary single run."""
    for name, (required, count) in LAUNCHERS.items():
        if all(var in os.environ for var in required):
            try:
                if int(os.environ[count]) > 1:
                    return name
            except ValueError:
                continue
    return None


def is_main_process() -> bool:
    """True in process 0, the one that writes files and prints (always, with one process)."""
    return jax.process_index() == 0


def gather(values) -> np.ndarray:
    """Every process's ``values`` (a few ints < 2**31, the same count in each), stacked:
    ``(processes, len(values))``. A collective: every process must call it at the same point.
    With one process it returns ``[values]`` without communicating."""
    row = np.asarray(values, np.int32).reshape(-1)
    if jax.process_count() == 1:
        return row[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), -1)


def agree(ok: bool, what: str) -> None:
    """Tell every process whether ``what`` worked everywhere.

    Called by every process (a collective) after something that can fail in some processes
    only, such as process 0's file writes. Where it worked but failed elsewhere, raise
    RuntimeError naming the failed processes (they raise their own errors), so that no process
    goes on alone into a collective that would wait for ever for a process that stopped.
    """
    flags = gather([int(bool(ok))])[:, 0]
    if ok and not flags.all():
        bad = ", ".join(str(p) for p in np.flatnonzero(flags == 0))
        raise RuntimeError(f"{what} failed in process {bad} (its own error says why); every "
                           f"process stops")


def preempted(step: int) -> bool:
    """True at the step where every process of a multi-process run stops together after a
    preemption notice (a SIGTERM to any of them, e.g. from the scheduler).

    Call it in every process at every training step, with the same step numbers; JAX's
    preemption service picks a step all processes still reach. Always False with one process
    (there a SIGTERM ends the process as usual) or with JAX's preemption service switched off.
    """
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the service is off (jax_enable_preemption_service=False)
        return False


# --------------------------------------------------------------------------------------------
# The mesh and the two shardings.


def data_mesh(devices: int | None = None) -> Mesh:
    """A 1-D mesh, axis ``"data"``, over every device or the first ``devices`` of them.

    With several processes the same number of devices is taken from every process: by default
    as many as the process with the fewest has, and ``devices`` must be a multiple of the
    process count. Devices are ordered by process, so each process's devices hold one
    contiguous block of rows of every batch (see :func:`process_rows`).

    Raises:
      TypeError: ``devices`` is not an int or None.
      ValueError: ``devices`` < 1, more than there are, not a multiple of the process count,
        or more than some process has its share of.
    """
    fn = "data_mesh"
    everything = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    processes = jax.process_count()
    own = [[d for d in everything if d.process_index == p] for p in range(processes)]
    fewest = min(len(o) for o in own)
    n = fewest * processes if devices is None else devices
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{fn}: devices must be an int or None; got {type(n).__name__} {n!r}")
    if not 1 <= n <= len(everything):
        raise ValueError(f"{fn}: devices must lie in 1..{len(everything)} (the devices JAX "
                         f"sees: {_describe(everything)}); got {n}")
    if n % processes:
        raise ValueError(f"{fn}: devices ({n}) must be a multiple of the number of processes "
                         f"({processes}), so that every process holds the same share")
    per_process = n // processes
    if per_process > fewest:
        raise ValueError(
            f"{fn}: devices ({n}) asks for {per_process} devices in each of the {processes} "
            f"processes, but process {[len(o) for o in own].index(fewest)} has {fewest}; use "
            f"at most {fewest * processes}")
    chosen = [d for o in own for d in o[:per_process]]
    # Auto axis (the constructor's default): XLA propagates the shardings through the step.
    return Mesh(np.array(chosen), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split along ``"data"``: device ``k`` holds rows ``k·B/n .. (k+1)·B/n - 1``."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
    """``"1 cpu device"``, ``"4 cpu devices"``, ``"8 tpu devices in 2 processes"``."""
    return _describe(list(mesh.devices.flat))


def _describe(devices) -> str:
    platforms = "/".join(sorted({d.platform for d in devices}))
    processes = len({d.process_index for d in devices})
    text = f"{len(devices)} {platforms} device{'' if len(devices) == 1 else 's'}"
    return text + (f" in {processes} processes" if processes > 1 else "")


def check_divisible(fn: str, name: str, size: int, mesh: Mesh) -> None:
    """Raise ValueError unless a global batch of ``size`` rows splits evenly over ``mesh``."""
    n = mesh.devices.size
    if size % n:
        lower, upper = size - size % n, size + n - size % n
        raise ValueError(
            f"{fn}: {name} ({size}) must be divisible by the number of devices ({n}: "
            f"{describe(mesh)}), since every device takes an equal share of each batch; use "
            f"{name} {f'{lower} or ' if lower else ''}{upper}, or another number of devices")


# --------------------------------------------------------------------------------------------
# Moving data onto the mesh.


def process_rows(mesh: Mesh, size: int) -> slice:
    """The rows of a global batch of ``size`` that this process's devices hold.

    Read off the sharding itself (``addressable_devices_indices_map``), so it cannot disagree
    with where :func:`shard` puts them: with one process, ``slice(0, size)``; with ``P``
    processes of equal shares, ``slice(p·size/P, (p+1)·size/P)`` for process ``p``.
    """
    check_divisible("process_rows", "size", size, mesh)
    blocks = sorted((index[0].start or 0, size if index[0].stop is None else index[0].stop)
                    for index in batch_sharding(mesh).addressable_devices_indices_map(
                        (size,)).values())
    start, stop = blocks[0][0], blocks[0][1]
    for lo, hi in blocks[1:]:
        if lo != stop:  # data_mesh orders devices by process, so this cannot happen for it
            raise ValueError(f"process_rows: this process's rows of the batch are not one "
                             f"contiguous block: {blocks}")
        stop = hi
    return slice(start, stop)


def shard(mesh: Mesh, local: np.ndarray, size: int) -> jax.Array:
    """The global ``(size, ...)`` array, split along ``"data"``, whose rows
    :func:`process_rows` are ``local`` (each process passes only its own rows)."""
    local = np.asarray(local)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local,
                                                  (size, *local.shape[1:]))


def replicate(tree, mesh: Mesh):
    """Every leaf of ``tree`` (arrays on any device, or numpy) copied to every device of
    ``mesh``; every process must pass the same values."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, leaf), host(tree))


def host(tree):
    """Every leaf of ``tree`` as numpy, in one transfer, each read from this process's own copy.

    Works for arrays replicated over the devices of many processes, where reading the global
    array would need the other processes' memory.

    Raises:
      ValueError: a leaf is split over processes (no one process holds all of it).
    """
    def local(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                raise ValueError(f"host: an array of shape {leaf.shape} is split over "
                                 f"processes; only replicated arrays can be read by one process")
            return leaf.addressable_data(0)
        return leaf
    return jax.device_get(jax.tree_util.tree_map(local, tree))
