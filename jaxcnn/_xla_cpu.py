"""Workarounds for XLA's CPU backend, in one place, each with what it measured and one switch.

The manual ops read as their formulas; where XLA:CPU needs help to run them fast, they call a
function of this module by name. Nothing here changes a result: every workaround only changes
how the same sum is scheduled. On other backends (GPU, TPU) every function here is a no-op,
and ``JAXCNN_XLA_CPU_WORKAROUNDS=0`` (read at import) switches them off on CPU too, to measure
what they buy (``python benchmarks/ops.py`` with and without it).

What they work around, measured on a 2-core x86-64 VM with jax/jaxlib 0.10.2:

- :func:`barrier` (``lax.optimization_barrier``). XLA:CPU fuses elementwise producers into
  dots and then falls back to a naive dot loop, and fuses long elementwise chains (the T taps
  of a window) into every consumer, recomputing them. Materializing the operands of each
  product, and the input and output of each manual layer, avoided both (5-10x on the layers of
  benchmarks/ops.py when it was introduced). On GPU the same barriers would block the epilogue
  fusions that make products fast, so they are CPU-only.
- :func:`tile_bytes`: the size of one tile of the patch matrix in the tiled convolution
  (:mod:`jaxcnn._patches`). XLA:CPU's concatenate and slice loops run at 1-2 GB/s on arrays
  that miss the cache (a 37 MB patch matrix took 37 ms to build, 5x lax's whole convolution),
  but at 5-7 GB/s on tiles that stay in cache; the loop that walks the tiles costs about 1 us
  per iteration. Tiles of 128 KiB to 2 MiB measured the same within noise on the
  convolutions of ``benchmarks/ops.py``; 1 MiB is the middle. On GPU and TPU one tile covers
  the whole layer (one big product is what those backends are fast at).
"""

from __future__ import annotations

import os

import jax
from jax import lax

ENABLED = os.environ.get("JAXCNN_XLA_CPU_WORKAROUNDS", "1") != "0"
"""The one switch: False turns every workaround of this module off."""

TILE_BYTES = 1 << 22
"""Bytes of one patch-matrix tile on CPU (see the module docstring for the measurement)."""


def active() -> bool:
    """True when the workarounds apply: switched on, and JAX's default backend is the CPU."""
    return ENABLED and jax.default_backend() == "cpu"


def barrier(x):
    """Materialize ``x`` (any pytree) on CPU so that XLA neither fuses it into its consumers
    nor fuses its producers into a product; identity elsewhere."""
    return lax.optimization_barrier(x) if active() else x


def tile_bytes() -> int | None:
    """Bytes of one patch tile on CPU, or None (no tiling: one tile covers the layer)."""
    return TILE_BYTES if active() else None
