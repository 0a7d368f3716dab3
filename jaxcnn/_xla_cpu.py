"""Workarounds for XLA's CPU backend, in one place, each with what it measured and one switch.

The manual ops read as their formulas; where XLA:CPU needs help to run them fast, they call a
function of this module by name. Nothing here changes a result: every workaround only changes
how the same sum is scheduled. On other backends (GPU, TPU) every function here is a no-op,
and ``JAXCNN_XLA_CPU_WORKAROUNDS=0`` (read at import) switches them off on CPU too, to measure
what they buy (``python benchmarks/ops.py`` with and without it).

What they work around, measured on a 2-core x86-64 VM with jax/jaxlib 0.10.2:

- :func:`isolate`. XLA:CPU fuses the elementwise producers of a layer's input into the
  layer and recomputes them for every use: the gather that builds a convolution's patch
  recomputed the previous convolution, its bias, relu and max pool for each of its 25 taps
  (28 ms of a 40 ms LeNet-5 step). ``lax.optimization_barrier`` does not stop this here: the
  CPU pipeline removes barriers before it fuses (checked on the compiled HLO of jaxlib 0.10.2).
  A ``lax.cond`` does: a fusion never spans a conditional, so each manual layer runs as the
  branch of a conditional whose predicate (``v == v or v != v`` of one element: always true,
  but not constant to the compiler) picks the layer. Its cost is evaluating one element and
  the conditional's bookkeeping. A manual layer's primal, its forward rule and its backward
  rule each run so (``jaxcnn._windows.defvjp_apart``). The conditional was once put around the whole
  custom-VJP function, and autodiff made it a conditional around the backward too, but then
  the residuals that are the layer's own inputs left the forward conditional as outputs, and
  a conditional's outputs are new buffers: every manual layer copied its input on every
  step. Whole networks, forward+backward at batch 128, copied vs passed on from outside, in
  one interleaved run: LeNet-5 0.99, the CIFAR stack 0.88, small_cnn 0.94, the ResNet 0.95.
  Should a later XLA fold the predicate, the barrier silently disappears and every result
  stays the same.
- :func:`materialize`. XLA:CPU also fuses a padding into the gather that reads the padded
  array, and the fused gather then tests every element it copies against the padding's
  bounds: a 7x7 stride-2 convolution of one 224x224x3 image (a patch of 7.4 MB) took 2.5 ms
  with the padding fused and 1.4 ms with the padded input written out first (gather and
  product alone: 0.8 + 1.2 ms; lax 1.4 ms). Over the convolutions of ``benchmarks/ops.py``,
  in one interleaved run with and without: 7x7 3->64 s2 2.55x -> 1.67x lax's time, 3x3
  16->16 s2 (uneven padding) 2.38x -> 2.11x, the others unchanged within the noise. It is
  the same conditional as :func:`isolate`, around the padding.
- Compile time: fewer kernels, and no padding compiled alone. XLA:CPU emits every fused
  kernel, and a conditional's branches and a loop's body, as code of their own: about
  10-35 ms of compile time each (MLIR, then LLVM; measured from its ``VLOG`` timers), the
  same for a kernel that never runs. A padding that ends up a kernel of its own (what
  :func:`materialize` writes out, or what a loop reads) is emitted worst of all: padding
  f32[128,14,14,64] by one row and column on each side compiled in 0.20-0.26 s and ran in
  1.6-2.7 ms; the same padding of ``x · 1``, the 1 hidden behind an optimization barrier,
  compiled in 0.06-0.08 s and ran in 0.43-0.65 ms. So :func:`materialize` runs its op on
  ``x · 1`` (:func:`unit_scale`; the strided slice of a convolution whose stride and
  dilation share a factor reads it too: 0.40 ms alone, 0.14 ms fused), and the branch of its conditional that never runs repeats that one kernel
  (compiled once for both branches) instead of returning zeros (a kernel per shape). Compile
  time of forward+backward, the least of 5, manual (lax), before -> after, in one session:
  3x3 32->64 at 14x14, batch 128, 0.39 -> 0.28 s (0.08); 3x3 64->64 stride 2 dilation 2
  0.34 -> 0.28 s (0.08-0.11); 1-D 33 depthwise 0.24 -> 0.22 s (0.06-0.08); LeNet-5's 5x5
  1->6 0.20 -> 0.19 s (0.07-0.10). Run times unchanged within the noise.
- :func:`after`. XLA:CPU runs operations that do not depend on each other at the same
  time. A convolution's kernel gradient and input gradient both depend only on ``dZ`` (and
  ``X``, ``K``), so each ran beside the other, the two sharing the 2 cores and each other's
  cache: 3x3 16->32 stride 2 at 28x28, batch 128, took 4.7 ms for ``dK`` and 4.7 ms for
  ``dX`` on their own, 18.7 ms in one program, and 7.7 ms with ``dX`` started after ``dK``
  (the same conditional as :func:`isolate`, its predicate read from ``dK``). Measured
  forward+backward, manual / lax, in one interleaved run, as they were vs in order: that
  layer 1.63 -> 0.88, 3x3 16->16 at batch 128 2.17 -> 1.17, 5x5 7->32 1.29 -> 1.15; the
  others unchanged within the noise. Ordering the backward after the forward as well (which
  the benchmarks' fixed cotangent leaves independent) made it slower (5x5 8->32 1.53 ->
  2.06), so only the two gradients are ordered.
- :func:`tile_bytes`: the size of one tile of the patch matrix in the tiled convolution
  (:mod:`jaxcnn._patches`). Building a whole layer's patch matrix at once runs out of cache
  (a 37 MB patch took 37 ms to build, 5x lax's whole convolution); tiles in a loop keep it in
  cache, and the loop costs about 1 us per iteration. A patch of up to
  :data:`ONE_TILE_BYTES` (16 MiB) is built whole, with no loop; a larger one runs in tiles of
  :data:`TILE_BYTES` (4 MiB). Measured forward, manual / lax, over the convolutions of
  ``benchmarks/ops.py`` in one interleaved run, loops of 16 MiB tiles (the earlier rule) vs
  4 MiB tiles with layers up to 16 MiB whole vs 4 MiB tiles with layers up to 8 MiB whole:
  3x3 32->64 s2 at batch 128 2.25 / 1.17 / 1.01, the CIFAR stack's 3x3 32->64 1.73 / 1.18 /
  1.15, small_cnn's 3x3 32->32 1.36 / 1.09 / 1.07, 1-D 33 16->16 1.34 / 1.07 / 1.08, 3x3
  64->64 in 2 groups 0.92 / 0.68 / 0.69, 1-D 3 32->32 d4 (a 12.6 MB patch) 2.26 / 2.01 /
  2.48, 1x1 64->256 (6.4 MB) 0.76 / 0.71 / 0.98, the others within the noise. Whole networks,
  forward+backward, with 16 / 4 / 2 MiB tiles: LeNet-5 0.58 / 0.58 / 0.58, the CIFAR stack
  0.53 / 0.54 / 0.51, small_cnn 0.84 / 0.78 / 0.79, the ResNet 0.83 / 0.88 / 0.81 (within the
  noise). On GPU and TPU one tile covers the whole layer (one big product is what those
  backends are fast at).
- :func:`reuse_host_memory`. XLA:CPU allocates the temporary buffer of a program afresh on
  each run, with ``malloc``. glibc serves an allocation larger than 32 MiB (its largest
  ``mmap`` threshold) from a new ``mmap`` and unmaps it on ``free``, so every run of a program
  with more than 32 MiB of temporaries maps fresh pages, and the kernel zero-fills each page
  the run first touches. The CIFAR stack's gradient at batch 128 (a 79.5 MB temporary buffer,
  seen with ``strace``) took 19,400 page faults and 42 ms of system CPU time per step, and
  its step 85-99 ms; with glibc told to keep freed memory (one arena, no ``mmap``, a 2 GiB
  trim threshold) it took none, and 67-75 ms, in three alternating pairs of runs. In one
  process each, forward+backward at batch 128, without / with (manual; lax): the CIFAR stack
  79 / 61 ms; 153 / 107 ms, small_cnn 137 / 108; 195 / 150, the ResNet 129 / 87; 150 / 96,
  LeNet-5 (under 32 MiB) unchanged. Its price: the process keeps the most memory it has used,
  and its threads share one ``malloc`` arena, which slows compiling (the compile-bound
  ``tests/test_conv.py`` took 46 -> 52 s and 57 -> 61 s in two alternating pairs of runs:
  about 10%). It changes the allocator of the whole process and must
  run before JAX starts its CPU client (whose threads keep the arenas they began with), so it
  is a call the program makes (``train.py`` and the benchmarks do), not an import side effect.
"""

from __future__ import annotations

import ctypes
import os

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
from jax import lax

ENABLED = os.environ.get("JAXCNN_XLA_CPU_WORKAROUNDS", "1") != "0"
"""The one switch: False turns every workaround of this module off."""

TILE_BYTES = 1 << 22
"""Bytes of one patch-matrix tile on CPU, where the layer's patch runs in a loop of tiles (see
the module docstring for the measurement)."""

ONE_TILE_BYTES = 1 << 24
"""A layer whose whole patch matrix is at most this many bytes runs as one tile, with no loop
(see the module docstring)."""

FOLD_TILE_BYTES = 1 << 22
"""Bytes of one tile of the folded form (window rows plus ``Y``), which writes ``Y`` and reads
it back: it wants the tile in cache. Measured forward, manual / lax, with 1 / 4 / 8 / 16 / 32
MiB: 3x3 32->32 at 28x28 batch 128 1.52 / 1.27 / 1.28 / 2.47 / 3.33, 3x3 16->16 at 28x28 batch
64 2.03 / 1.65 / 1.91 / 1.61 / 1.68, 3x3 64->64 at 14x14 0.85 / 0.81 / 0.81 / 0.89 / 0.97."""


def active() -> bool:
    """True when the workarounds apply: switched on, and JAX's default backend is the CPU."""
    return ENABLED and jax.default_backend() == "cpu"


def isolate(op, *args, twin=False):
    """``op(*args)``, computed apart from its neighbours: on CPU, XLA neither fuses the
    producers of ``args`` into ``op`` nor ``op`` into its consumers (see the module
    docstring); a plain call elsewhere.

    ``op`` runs as the branch of a conditional whose predicate is always true but not
    constant to the compiler; the other branch never runs (:func:`_always` says what it
    returns; ``twin``: ``op`` again). Running the op inside the branch, rather than passing
    its input through an identity branch, costs no copy (an identity branch copied its
    operand: a second pass over a max pool's input).
    """
    if not active():
        return op(*args)
    probe = next((jnp.ravel(a)[:1] for a in jax.tree_util.tree_leaves(args)
                  if getattr(a, "size", 0)), None)
    if probe is None:
        return op(*args)
    return _always(probe[0], op, *args, twin=twin)


def after(token, op, *args):
    """``op(*args)``, started only once ``token`` (an array) is computed: on CPU, the branch of
    a conditional whose predicate reads one element of ``token`` (see the module docstring);
    a plain call elsewhere."""
    if not active() or not getattr(token, "size", 0):
        return op(*args)
    probe = jnp.ravel(token)[0]
    return _always(probe, op, *args)


def _always(probe, op, *args, twin=False):
    """``op(*args)`` as the branch of ``lax.cond`` on ``probe == probe or probe != probe``:
    always true (NaN too), but not constant to the compiler.

    The other branch never runs, but XLA compiles it: it returns zeros (a kernel per output
    shape), or with ``twin`` it runs ``op`` itself, whose kernels XLA compiles once for both
    branches (for an ``op`` that is one kernel). Returning one of ``args`` instead, where the
    shapes match, compiles no kernel but made XLA copy that argument before the conditional
    on every run (its output may then be the argument's buffer).
    """
    always = (probe == probe) | (probe != probe)
    # op is traced once, to a jaxpr that gives the branch and the other branch's shapes.
    closed, out_shape = jax.make_jaxpr(op, return_shape=True)(*args)
    out_tree, run = jax.tree_util.tree_structure(out_shape), jax_core.jaxpr_as_fun(closed)
    branch = lambda *a: jax.tree_util.tree_unflatten(                 # noqa: E731
        out_tree, run(*jax.tree_util.tree_leaves(a)))
    zeros = lambda *a: jax.tree_util.tree_map(                       # noqa: E731
        lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
    return lax.cond(always, branch, branch if twin else zeros, *args)


def materialize(op, *args):
    """``op(*args)`` written to memory before it is read: its consumers do not fuse it (see
    the module docstring); a plain call elsewhere. ``op`` is meant to be one pass over its
    input (a padding, a transpose): on CPU it reads ``args`` times an opaque 1, so that XLA
    fuses it with that product instead of compiling it alone."""
    return isolate(lambda *a: op(*map(unit_scale, a)), *args, twin=True)


def unit_scale(x):
    """On CPU ``x · 1``, the ``1`` opaque to the compiler (for numbers; ``x`` itself
    otherwise): a padding, slice or transpose of it is compiled and run fused with the
    product, not as a kernel of its own (see the module docstring). ``x`` elsewhere."""
    if not active() or not jnp.issubdtype(x.dtype, jnp.number):
        return x
    return x * lax.optimization_barrier(jnp.ones((), x.dtype))


def tile_bytes(*, folded: bool = False) -> int | None:
    """Bytes of one patch tile on CPU (of the folded form's tile with ``folded``), or None (no
    tiling: one tile covers the layer)."""
    if not active():
        return None
    return FOLD_TILE_BYTES if folded else TILE_BYTES


def one_tile_bytes() -> int | None:
    """Bytes of the largest patch built whole, in one tile with no loop, on CPU (None: no
    limit, one tile always)."""
    if not active():
        return None
    return ONE_TILE_BYTES


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt options (malloc.h)
KEEP_FREED_BYTES = 2**31 - 1
"""glibc returns freed memory at the top of its heap to the kernel only beyond this many bytes
(the largest value ``mallopt`` takes): a run's temporary buffer is kept for the next run."""


def reuse_host_memory() -> bool:
    """Let every run of a program reuse the host memory the run before it freed, where the
    process runs on glibc: ``malloc`` then keeps one arena, never ``mmap``s, and keeps up to
    :data:`KEEP_FREED_BYTES` of freed memory (see the module docstring: XLA:CPU's temporary
    buffers otherwise cost a page fault per 4 KiB page per run). Returns True if it applied.

    Call it once, at the start of the program, before the first JAX computation: threads that
    already run keep their own arenas, and then nothing changes. The price is that the process
    holds on to the largest amount of memory it has used (as PyTorch's GPU caching allocator
    does), and threads share one ``malloc`` arena (compiling is about 10% slower). Does
    nothing, and returns False, with the workarounds switched off (:data:`ENABLED`) or without
    glibc (macOS, musl).
    """
    if not ENABLED:
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # glibc only: its mallopt options are the ones used here
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    return all(mallopt(option, value) == 1 for option, value in settings)
