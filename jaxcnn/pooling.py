"""Pooling: max_pool and avg_pool, each with its lax forward, manual forward and backward.

NOTE on the default stride: here ``stride=None`` means **stride = window** (the lecture's 2×2
window with stride 2, non-overlapping). ``jax.example_libraries.stax`` and ``flax.linen``
default to stride 1 (overlapping windows): pass ``stride=1`` explicitly for that behaviour.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _shapes, _windows
from ._shapes import WindowConfig


def max_pool(x, window, *, stride=None, padding="VALID", impl="lax"):
    """Max pooling over ``window`` positions of ``x: (N, *spatial, C)``, per channel.

    Args:
      x: ``(N, *spatial, C)``, 1, 2 or 3 spatial dims.
      window: an int (same size on every spatial dim of ``x``) or one int per spatial dim.
      stride: an int or one per spatial dim. **Default None = the window** (2×2 window →
        stride 2, as in the lecture). stax and flax default to stride 1: a known trap.
      padding: ``"VALID"``, ``"SAME"``, an int or ``(low, high)`` pairs, as for :func:`conv`;
        padded positions hold ``-inf`` so they never win.
      impl: ``"lax"`` (``lax.reduce_window``) or ``"manual"`` (explicit taps and a mask-based
        backward).

    Returns:
      ``(N, *out_spatial, C)``, output-size rule as in :mod:`jaxcnn._shapes`.

    Ties and NaN: the gradient of a window goes to exactly one element. Scanning the window in
    row-major order, the running choice is replaced by the next element unless
    ``choice >= next`` holds; so among equal maxima the **first** one (row-major) wins, which is
    what XLA's ``select_and_scatter`` (``jax.grad`` of ``reduce_window`` max) does on CPU. A
    NaN compares false, so a window holding a NaN sends its gradient to an element at or after
    the last NaN, and its forward output is NaN.
    """
    fn = "max_pool"
    impl = _shapes.check_impl(fn, impl)
    x_shape = _shapes.check_array(fn, "x", x)
    cfg = _shapes.pool_config(x_shape, window, stride=stride, padding=padding, fn=fn)
    return _max_pool_jit(x, cfg=cfg, impl=impl)


def avg_pool(x, window, *, stride=None, padding="VALID", count_include_pad=True, impl="lax"):
    """Average pooling over ``window`` positions of ``x: (N, *spatial, C)``, per channel.

    Args as for :func:`max_pool` (**stride defaults to the window**, not to 1 as in stax and
    flax). Padded positions hold 0. ``count_include_pad=True`` divides every window by its full
    size; ``False`` divides by the number of real (non-padding) elements in the window.

    Returns:
      ``(N, *out_spatial, C)``.
    """
    fn = "avg_pool"
    impl = _shapes.check_impl(fn, impl)
    x_shape = _shapes.check_array(fn, "x", x)
    count_include_pad = _shapes.check_bool(fn, "count_include_pad", count_include_pad)
    cfg = _shapes.pool_config(x_shape, window, stride=stride, padding=padding, fn=fn)
    return _avg_pool_jit(x, cfg=cfg, count_include_pad=count_include_pad, impl=impl)


@partial(jax.jit, static_argnames=("cfg", "impl"))
def _max_pool_jit(x, *, cfg, impl):
    if impl == "lax":
        return _max_pool_lax(x, cfg)
    return _windows.layer_boundary(_max_pool_manual, x, cfg)


@partial(jax.jit, static_argnames=("cfg", "count_include_pad", "impl"))
def _avg_pool_jit(x, *, cfg, count_include_pad, impl):
    if impl == "lax":
        return _avg_pool_lax(x, cfg, count_include_pad)
    return _windows.layer_boundary(_avg_pool_manual, x, cfg, count_include_pad)


def _full(inner):
    """Extend a per-spatial-dim tuple with the batch and channel dims."""
    return (1, *inner, 1)


# --------------------------------------------------------------------------------------------
# The lax forwards: the reference.


def _max_pool_lax(x, cfg: WindowConfig):
    pads = ((0, 0), *cfg.padding, (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, _full(cfg.window),
                             _full(cfg.stride), pads)


def _avg_pool_lax(x, cfg: WindowConfig, count_include_pad: bool):
    pads = ((0, 0), *cfg.padding, (0, 0))
    acc = _windows.accum_dtype(x.dtype)
    s = lax.reduce_window(x.astype(acc), 0.0, lax.add, _full(cfg.window),
                          _full(cfg.stride), pads)
    return (s / _window_counts(x.shape, cfg, count_include_pad)).astype(x.dtype)


def _window_counts(x_shape, cfg: WindowConfig, count_include_pad: bool):
    """The divisor of every window, a static numpy array broadcasting to ``(N, *out, C)``.

    With ``count_include_pad`` it is the window size; otherwise the number of real elements
    in each window (computed with numpy on a mask of ones, at trace time).
    """
    if count_include_pad:
        return np.asarray(float(np.prod(cfg.window)))
    spatial = x_shape[1:-1]
    out = _shapes.output_spatial(spatial, cfg)
    ones = np.pad(np.ones(spatial), cfg.padding)
    counts = np.zeros(out)
    for m in _windows.offsets(cfg):
        sl = tuple(slice(mi, mi + (o - 1) * s + 1, s) for mi, o, s in zip(m, out, cfg.stride))
        counts += ones[sl]
    return counts[None, ..., None]


# --------------------------------------------------------------------------------------------
# The manual forwards: Z_i = max_m Xpad[i * s + m] and Z_i = Σ_m Xpad[i * s + m] / count_i.


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_manual(x, cfg: WindowConfig):
    """Manual max pooling; backward :func:`_max_pool_bwd`."""
    return _max_pool_manual_forward(x, cfg)


def _max_pool_manual_forward(x, cfg: WindowConfig):
    """``Z_i = max_m Xpad[i * s + m]`` over the window's taps, ``-inf`` padding."""
    taps = _max_pool_taps(x, cfg)
    z = taps[0]
    for t in taps[1:]:
        z = jnp.maximum(z, t)
    return z


def _max_pool_taps(x, cfg: WindowConfig):
    xp = _windows.pad(x, cfg.padding, value=-jnp.inf)
    return _windows.taps(xp, cfg, _windows.out_shape(x.shape, cfg))


def _max_pool_fwd(x, cfg):
    return _max_pool_manual(x, cfg), x


def _argmax_taps(taps):
    """Index of the winning tap per output: the first maximum in row-major window order.

    The running choice is replaced by tap ``t`` unless ``choice >= tap_t`` (XLA's select rule
    with ``>=``): equal values keep the earlier element; NaN compares false and is replaced.
    """
    best, idx = taps[0], jnp.zeros(taps[0].shape, jnp.int32)
    for t, tap in enumerate(taps[1:], start=1):
        take = ~(best >= tap)
        best = jnp.where(take, tap, best)
        idx = jnp.where(take, t, idx)
    return idx


def _max_pool_bwd(cfg: WindowConfig, x, dz):
    """``dL/dX_p = Σ_i dL/dZ_i · [p is the max of window i]``.

    The gradient of each window goes to its maximum (the first one in row-major order on ties,
    see :func:`max_pool`); where windows overlap and one element wins several, it receives the
    sum. Computed with a mask per tap ``m`` (``argmax_i == m``), each masked ``dZ`` put back at
    positions ``i * s + m`` by :func:`jaxcnn._windows.overlap_add`.
    """
    idx = _argmax_taps(_max_pool_taps(x, cfg))
    zero = jnp.zeros((), dz.dtype)
    if _windows.disjoint(cfg):      # the classic 2×2 / 2: one broadcast select, no overlap
        nd = cfg.ndim
        mask = _windows.expand(idx, nd) == _windows.tap_grid(cfg)
        return (_windows.spread(jnp.where(mask, _windows.expand(dz, nd), zero),
                                x.shape[1:-1], cfg),)
    contribs = [jnp.where(idx == t, dz, zero) for t in range(len(_windows.offsets(cfg)))]
    return (_windows.overlap_add(contribs, x.shape[1:-1], cfg),)


_max_pool_manual.defvjp(_max_pool_fwd, _max_pool_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _avg_pool_manual(x, cfg: WindowConfig, count_include_pad: bool):
    """Manual average pooling; backward :func:`_avg_pool_bwd`."""
    return _avg_pool_manual_forward(x, cfg, count_include_pad)


def _avg_pool_manual_forward(x, cfg: WindowConfig, count_include_pad: bool):
    """``Z_i = Σ_m Xpad[i * s + m] / count_i`` over the window's taps, zero padding."""
    acc = _windows.accum_dtype(x.dtype)
    xp = _windows.pad(x.astype(acc), cfg.padding)
    taps = _windows.taps(xp, cfg, _windows.out_shape(x.shape, cfg))
    s = taps[0]
    for t in taps[1:]:
        s = s + t
    return (s / _window_counts(x.shape, cfg, count_include_pad)).astype(x.dtype)


def _avg_pool_fwd(x, cfg, count_include_pad):
    # Only x's shape is needed (the output size does not determine the input size when the
    # stride leaves a remainder); x is alive anyway, so keeping it costs nothing.
    return _avg_pool_manual(x, cfg, count_include_pad), x


def _avg_pool_bwd(cfg: WindowConfig, count_include_pad: bool, x, dz):
    """``dL/dX_p = Σ_{i : p ∈ window i} dL/dZ_i / count_i``: spread evenly over each window.

    Every tap ``m`` of window ``i`` gets ``dZ_i / count_i``, put back at ``i * s + m`` by
    :func:`jaxcnn._windows.overlap_add` (padding positions are cropped away).
    """
    share = dz.astype(_windows.accum_dtype(dz.dtype)) / _window_counts(x.shape, cfg,
                                                                        count_include_pad)
    if _windows.disjoint(cfg):      # non-overlapping windows: one broadcast, no overlap-add
        nd = cfg.ndim
        share = share.astype(dz.dtype)
        every = jnp.broadcast_to(_windows.expand(share, nd), _windows.windowed_shape(share.shape, cfg))
        return (_windows.spread(every, x.shape[1:-1], cfg),)
    # Overlapping windows: the shares stay in float32 for half precision (overlap_add sums in
    # float32 anyway), so each element is rounded once.
    contribs = [share] * len(_windows.offsets(cfg))
    return (_windows.overlap_add(contribs, x.shape[1:-1], cfg).astype(dz.dtype),)


_avg_pool_manual.defvjp(_avg_pool_fwd, _avg_pool_bwd)
