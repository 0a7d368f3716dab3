"""Pooling over windows: max_pool and avg_pool, each with its lax forward, manual forward and
backward.

NOTE on the default stride: here ``stride=None`` means **stride = window** (the lecture's 2×2
window with stride 2, non-overlapping). ``jax.example_libraries.stax`` and ``flax.linen``
default to stride 1 (overlapping windows): pass ``stride=1`` explicitly for that behaviour.

Pooling to a given output size (global and adaptive pooling) is in :mod:`jaxcnn.adaptive_pooling`.
"""

from __future__ import annotations

from functools import partial, reduce

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _shapes, _windows, padding as _padding
from ._shapes import PoolConfig, WindowConfig


def max_pool(x, window, *, stride=None, padding="VALID", dilation=1, ceil_mode=False,
             padding_mode="zeros", ties="first", impl="lax"):
    """Max pooling over ``window`` positions of ``x: (N, *spatial, C)``, per channel.

    ``Z_i = max_m Xpad[i * s + m * d]`` over the window offsets ``m``.

    Args:
      x: ``(N, *spatial, C)``, 1, 2 or 3 spatial dims.
      window: an int (same size on every spatial dim of ``x``) or one int per spatial dim.
      stride: an int or one per spatial dim. **Default None = the window** (2×2 window →
        stride 2, as in the lecture). stax and flax default to stride 1: a known trap.
      padding: ``"VALID"``, ``"SAME"``, an int or ``(low, high)`` pairs, as for :func:`conv`.
      dilation: window dilation, an int or one per spatial dim (``d - 1`` skipped positions
        between the window's elements; the window spans ``(k - 1) * d + 1``).
      ceil_mode: False: the output-size rule of :mod:`jaxcnn._shapes` (floor). True: PyTorch's
        rule, :func:`jaxcnn._shapes.pool_output_size`: the output size rounds up, but a last
        window that would start inside the right padding is dropped (with a padding mode other
        than "zeros", the padded input has no padding left: PyTorch's ``F.pad`` then pool);
        the windows that run past the padded input only pool what they overlap.
      padding_mode: ``"zeros"`` (the default: padded positions hold ``-inf``, so they never
        win; the name is PyTorch's for "no values from the input"), or ``"reflect"``,
        ``"replicate"``, ``"circular"``: ``x`` is first padded with that mode
        (:func:`jaxcnn.padding.pad`, with its limits) and then pooled with no padding, so the
        padded positions hold copies of input elements and compete like them.
      ties: which element of a window receives its gradient when several hold the maximum.
        Both choices are valid subgradients (any convex combination of the tied elements'
        unit vectors is one); they differ only at ties.

        - ``"first"`` (default): the first maximum in row-major window order, what
          ``jax.grad`` of ``lax.reduce_window`` (XLA's ``select_and_scatter``) gives.
        - ``"split"``: equal shares among the tied maxima, the convention of ``jnp.max``'s
          gradient and ``torch.amax``.

        Ties are common after a relu (windows of zeros: with "first" the top-left zero gets
        the whole gradient, with "split" every zero a share) and on quantized images (8-bit
        pixels repeat); with "first" the gradient is sparser and follows the scan order.
      impl: ``"lax"`` (``lax.reduce_window``, JAX's autodiff) or ``"manual"`` (explicit taps
        and a mask-based backward, :func:`_max_pool_bwd`). JAX has no gradient for a max
        ``reduce_window`` with window dilation, nor a "split" one: there (``dilation > 1`` or
        ``ties="split"``) the lax path's reference is the explicit forward with JAX's autodiff
        (:func:`_max_pool_explicit`).

    Returns:
      ``(N, *out_spatial, C)``; output size as above.

    NaN: with "first", scanning the window in row-major order the running choice is replaced
    by the next element unless ``choice >= next`` holds (XLA's select rule); a NaN compares
    false, so a window holding a NaN sends its gradient to the first maximum after its last
    NaN (or to that NaN if it is last). With "split", a window whose maximum is NaN shares its
    gradient among its NaNs (as PyTorch; ``jnp.max``'s gradient is NaN there). The forward
    output of a window holding a NaN is NaN.
    """
    fn = "max_pool"
    impl = _shapes.check_impl(fn, impl)
    x_shape = _shapes.check_array(fn, "x", x)
    ties = _shapes.check_choice(fn, "ties", ties, _shapes.TIES)
    pc = _shapes.pool_config(x_shape, window, stride=stride, padding=padding, fn=fn,
                             dilation=dilation, ceil_mode=ceil_mode, padding_mode=padding_mode)
    return _max_pool_jit(x, pc=pc, ties=ties, impl=impl)


def avg_pool(x, window, *, stride=None, padding="VALID", dilation=1, ceil_mode=False,
             padding_mode="zeros", count_include_pad=True, impl="lax"):
    """Average pooling over ``window`` positions of ``x: (N, *spatial, C)``, per channel.

    ``Z_i = Σ_m Xpad[i * s + m * d] / count_i`` over the window offsets ``m``.

    Args as for :func:`max_pool` (**stride defaults to the window**, not to 1 as in stax and
    flax), and:

      padding_mode: ``"zeros"`` (the default): padded positions hold 0. ``"reflect"``,
        ``"replicate"``, ``"circular"``: ``x`` is first padded with that mode and pooled
        with no padding; the padded positions then hold real values and count as elements
        (PyTorch pools ``F.pad(x, mode=...)`` the same way), so ``count_include_pad`` has no
        effect.
      count_include_pad: with ``"zeros"``, True divides every window by the number of its
        elements inside the padded input (the window size, except for ceil mode's last windows,
        whose positions past the padded input are not counted: PyTorch's rule); False divides
        by the number of input (non-padding) elements in the window.
      impl: ``"lax"`` (``lax.reduce_window``, JAX's autodiff; its gradient handles window
        dilation) or ``"manual"`` (explicit taps, :func:`_avg_pool_bwd`).

    Returns:
      ``(N, *out_spatial, C)``.
    """
    fn = "avg_pool"
    impl = _shapes.check_impl(fn, impl)
    x_shape = _shapes.check_array(fn, "x", x)
    count_include_pad = _shapes.check_bool(fn, "count_include_pad", count_include_pad)
    pc = _shapes.pool_config(x_shape, window, stride=stride, padding=padding, fn=fn,
                             dilation=dilation, ceil_mode=ceil_mode, padding_mode=padding_mode)
    counted = _counted(x_shape, pc, count_include_pad)
    return _avg_pool_jit(x, pc=pc, counted=counted, impl=impl)


@partial(jax.jit, static_argnames=("pc", "ties", "impl"))
def _max_pool_jit(x, *, pc, ties, impl):
    if impl == "lax":
        return _max_pool_lax(x, pc, ties)
    return _max_pool_manual_path(x, pc, ties)


@partial(jax.jit, static_argnames=("pc", "counted", "impl"))
def _avg_pool_jit(x, *, pc, counted, impl):
    if impl == "lax":
        return _avg_pool_lax(x, pc, counted)
    return _avg_pool_manual_path(x, pc, counted)


# A mode padding is a manual layer of its own (``jaxcnn.padding._pad_manual`` runs apart):
# XLA:CPU otherwise fuses its concatenates into every tap of the pooling and its backward.


def _max_pool_manual_path(x, pc: PoolConfig, ties: str):
    return _max_pool_manual(mode_pad(x, pc, "manual"), pc.win, ties)


def _avg_pool_manual_path(x, pc: PoolConfig, counted):
    return _avg_pool_manual(mode_pad(x, pc, "manual"), pc.win, counted)


def mode_pad(x, pc: PoolConfig, impl: str):
    """``x`` padded by ``pc.pads`` with ``pc.mode`` (unchanged in "zeros" mode, where the
    pooling fills its own padding): ``impl`` "lax", "manual" (the custom VJP) or "plain" (the
    manual forward without it)."""
    if pc.mode == "zeros":
        return x
    op = {"lax": _padding._pad_lax, "manual": _padding._pad_manual,
          "plain": _padding._pad_manual_forward}[impl]
    return op(x, pc.pads, pc.mode)


def _counted(x_shape, pc: PoolConfig, count_include_pad: bool):
    """Per spatial dim, the positions ``[a, b)`` an average counts, in the coordinates of the
    array the pooling pads (``x`` itself in "zeros" mode, the mode-padded ``x`` otherwise):
    the padded input ``[0, lo + n + hi)``, or with "zeros" and ``count_include_pad=False``
    the input ``[lo, lo + n)``. Ceil mode's overhang lies past ``b`` and is never counted."""
    spatial = x_shape[1:-1]
    if pc.mode == "zeros" and not count_include_pad:
        return tuple((lo, lo + n) for n, (lo, _) in zip(spatial, pc.pads))
    return tuple((0, lo + n + hi) for n, (lo, hi) in zip(spatial, pc.pads))


def _with_batch_and_channels(inner):
    """Extend a per-spatial-dim tuple with the batch and channel dims."""
    return (1, *inner, 1)


def _window_counts(x_shape, cfg: WindowConfig, counted):
    """The divisor of every window, a static numpy array broadcasting to ``(N, *out, C)``.

    Window ``i`` reads padded positions ``i * s + m * d``; it counts those inside ``counted``
    (:func:`_counted`). A window is a product of per-dim ranges, so its count is the product of
    per-dim counts (computed with numpy at trace time). A scalar when every window is full.
    """
    out = _shapes.output_spatial(x_shape[1:-1], cfg)
    per_dim = []
    for o, k, s, d, (a, b) in zip(out, cfg.window, cfg.stride, cfg.dilation, counted):
        pos = np.arange(o)[:, None] * s + np.arange(k)[None, :] * d
        per_dim.append(((pos >= a) & (pos < b)).sum(axis=1))
    if all((c == k).all() for c, k in zip(per_dim, cfg.window)):
        return np.asarray(float(np.prod(cfg.window)))
    return reduce(np.multiply.outer, per_dim).astype(float)[None, ..., None]


# --------------------------------------------------------------------------------------------
# The lax forwards: the reference.


def _max_pool_lax(x, pc: PoolConfig, ties: str):
    x = mode_pad(x, pc, "lax")
    cfg = pc.win
    if ties == "split" or any(d > 1 for d in cfg.dilation):
        return _max_pool_explicit(x, cfg, ties)
    pads = ((0, 0), *cfg.padding, (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, _with_batch_and_channels(cfg.window),
                             _with_batch_and_channels(cfg.stride), pads)


def _max_pool_explicit(x, cfg: WindowConfig, ties: str):
    """The reference where ``reduce_window``'s gradient does not serve (window dilation: JAX
    raises ``NotImplementedError``; ``ties="split"``): the explicit forward, JAX's autodiff.

    The windows are gathered into ``W: (N, *out, T, C)`` (``W[i, m] = Xpad[i * s + m * d]``,
    ``m`` in row-major order); "split" takes ``jnp.max`` over ``m`` (whose gradient splits ties
    equally), "first" picks ``W[i, m*]`` with ``m*`` from :func:`first_max_index`
    (:func:`pick_first_max`: the gradient goes to that one element). Memory: ``T`` times the
    output.
    """
    xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype),
                 [(0, 0, 0), *((lo, hi, 0) for lo, hi in cfg.padding), (0, 0, 0)])
    out = _shapes.output_spatial(x.shape[1:-1], cfg)
    index = [np.arange(o)[:, None] * s + np.arange(k)[None, :] * d
             for o, k, s, d in zip(out, cfg.window, cfg.stride, cfg.dilation)]
    w = window_tensor(xp, index)
    if ties == "split":
        return jnp.max(w, axis=-2)
    return pick_first_max(w, axis=-2)


def _avg_pool_lax(x, pc: PoolConfig, counted):
    x = mode_pad(x, pc, "lax")
    cfg = pc.win
    pads = ((0, 0), *cfg.padding, (0, 0))
    acc = _windows.accum_dtype(x.dtype)
    s = lax.reduce_window(x.astype(acc), 0.0, lax.add, _with_batch_and_channels(cfg.window),
                          _with_batch_and_channels(cfg.stride), pads,
                          window_dilation=_with_batch_and_channels(cfg.dilation))
    return (s / _window_counts(x.shape, cfg, counted)).astype(x.dtype)


def window_tensor(xp, index):
    """``W[n, i_1, ..., i_D, t, c] = xp[n, index_1[i_1, m_1], ..., index_D[i_D, m_D], c]``:
    every window's elements side by side, ``t`` the row-major index of ``(m_1, ..., m_D)``.

    ``index``: one static integer array ``(o_d, k_d)`` per spatial dim (window ``i``'s
    positions along that dim). Gathered one dim at a time, so ``W: (N, *o, prod(k), C)``.
    """
    nd = len(index)
    w = xp
    for a, idx in enumerate(index):               # (N, o1, k1, .., o_a, k_a, n_a+1, .., C)
        w = jnp.take(w, np.asarray(idx), axis=1 + 2 * a)
    w = jnp.transpose(w, (0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1))
    return w.reshape(*w.shape[:1 + nd], -1, w.shape[-1])


def first_max_index(v, axis: int, valid=None):
    """Index along ``axis`` of the element XLA's select rule picks: scanning in order, the
    running choice is replaced by the next element unless ``choice >= next``.

    Without NaN that is the first maximum. A NaN compares false, so it is always taken and the
    element after it too: the choice is the first maximum after the last NaN, or that NaN if it
    is last. Vectorized: ``L`` = the index of the last NaN (-1 if none), then the first element
    after ``L`` equal to the maximum of those after ``L``; ``L`` if there is none. ``valid``
    (broadcasting to ``v``) marks the elements that exist (adaptive windows of unequal size).
    """
    iota = lax.broadcasted_iota(jnp.int32, v.shape, axis % v.ndim)
    valid = jnp.ones(v.shape, bool) if valid is None else jnp.broadcast_to(valid, v.shape)
    last_nan = jnp.max(jnp.where(jnp.isnan(v) & valid, iota, -1), axis=axis, keepdims=True)
    after = (iota > last_nan) & valid
    best = jnp.max(jnp.where(after, v, -jnp.inf), axis=axis, keepdims=True)
    hit = after & (v == best)
    return jnp.where(jnp.any(hit, axis=axis), jnp.argmax(hit, axis=axis),
                     jnp.squeeze(last_nan, axis))


def pick_first_max(w, axis: int, valid=None):
    """The element of ``w`` that :func:`first_max_index` names along ``axis`` (``jax.grad``
    sends the cotangent to it), plus a constant NaN where ``w`` holds a NaN: the forward of
    ``reduce_window``'s max, whose output is NaN there while its gradient goes to the choice."""
    best = jnp.expand_dims(first_max_index(w, axis, valid), axis)
    has_nan = jnp.any(jnp.isnan(w), axis=axis)
    z = jnp.squeeze(jnp.take_along_axis(w, best, axis=axis), axis)
    return z + lax.stop_gradient(jnp.where(has_nan, jnp.nan, 0).astype(w.dtype))


def tied_maxima(v, z):
    """``[v == z]``, NaN counting as equal to NaN: the elements that hold the maximum ``z``."""
    return (v == z) | (jnp.isnan(v) & jnp.isnan(z))


# --------------------------------------------------------------------------------------------
# The manual forwards: Z_i = max_m Xpad[i * s + m * d] and Z_i = Σ_m Xpad[i * s + m * d] / count_i.


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_manual(x, cfg: WindowConfig, ties: str):
    """Manual max pooling; backward :func:`_max_pool_bwd`."""
    return _windows.layer_boundary(_max_pool_manual_forward, x, cfg)  # apart, as its rules


def _max_pool_manual_forward(x, cfg: WindowConfig):
    """``Z_i = max_m Xpad[i * s + m * d]`` over the window's taps, ``-inf`` padding."""
    xp = _windows.pad(x, cfg.padding, value=-jnp.inf)
    out = _windows.out_shape(x.shape, cfg)
    return _windows.reduce_taps(xp, cfg, out, jnp.maximum, -jnp.inf)


def _max_pool_fwd(x, cfg, ties):
    z = _max_pool_manual_forward(x, cfg)
    return z, (x, z if ties == "split" else None)


def _first_max_taps(xp, cfg: WindowConfig, out):
    """Index of the winning tap per output: the first maximum in row-major window order.

    The running choice is replaced by tap ``t`` unless ``choice >= tap_t`` (XLA's select rule
    with ``>=``): equal values keep the earlier element; NaN compares false and is replaced.
    Starting from ``-inf`` at index 0 gives the same choice as starting from tap 0.
    """
    def step(carry, t, tap):
        best, idx = carry
        take = ~(best >= tap)
        return jnp.where(take, tap, best), jnp.where(take, t, idx)

    shape = (xp.shape[0], *out, xp.shape[-1])
    init = (jnp.full(shape, -jnp.inf, xp.dtype), jnp.zeros(shape, jnp.int32))
    return _windows.fold_taps(xp, cfg, out, step, init)[1]


def _max_pool_bwd(cfg: WindowConfig, ties: str, res, dz):
    """``dX_p = Σ_i dZ_i · w_ip`` with ``w_ip`` the share of element ``p`` in window ``i``'s max.

    ``Z_i = max_m Xpad[i * s + m * d]`` is locally the element that holds the maximum, so its
    derivative is 1 for that element and 0 for the others; at ties any convex combination of
    the tied elements is a subgradient:

    - ``ties="first"``: ``w_ip = [p is the first maximum of window i]`` (row-major; see
      :func:`max_pool` for NaN), the index ``m*_i`` from :func:`_first_max_taps`;
    - ``ties="split"``: ``w_ip = [Xpad_p == Z_i] / count_i``, ``count_i = Σ_m [Xpad[i * s +
      m * d] == Z_i]`` (NaN equal to NaN).

    Where windows overlap and one element wins several, it receives the sum. Computed per tap
    ``m``: the masked ``dZ`` (``[m == m*_i] · dZ_i``, or ``[tap_m == Z_i] · dZ_i / count_i``)
    put back at positions ``i * s + m * d`` (:func:`jaxcnn._windows.scatter_taps`, which also
    crops the padding); for disjoint windows (stride = window) one broadcast select instead.
    """
    x, z = res
    xp = _windows.pad(x, cfg.padding, value=-jnp.inf)
    out, spatial = dz.shape[1:-1], x.shape[1:-1]
    zero = jnp.zeros((), dz.dtype)
    nd = cfg.ndim
    if ties == "first":
        idx = _first_max_taps(xp, cfg, out)
        if _windows.disjoint(cfg):      # the classic 2×2 / 2: one broadcast select, no overlap
            mask = _windows.with_window_axes(idx, nd) == _windows.tap_grid(cfg)
            picked = jnp.where(mask, _windows.with_window_axes(dz, nd), zero)
            return (_windows.disjoint_windows_to_input(picked, spatial, cfg),)
        return (_windows.scatter_taps(lambda t, _: jnp.where(idx == t, dz, zero), None, cfg,
                                      spatial, out),)
    acc = _windows.accum_dtype(dz.dtype)
    if _windows.disjoint(cfg):          # the windows side by side: (N, o1, k1, o2, k2, .., C)
        view = _disjoint_view(xp, cfg, out)
        mask = tied_maxima(view, _windows.with_window_axes(z, nd))
        count = jnp.sum(mask, axis=tuple(range(2, 2 * nd + 1, 2)), keepdims=True, dtype=acc)
        share = (_windows.with_window_axes(dz, nd).astype(acc) / count).astype(dz.dtype)
        return (_windows.disjoint_windows_to_input(jnp.where(mask, share, zero), spatial, cfg),)
    count = _windows.fold_taps(xp, cfg, out, lambda c, t, tap: c + tied_maxima(tap, z),
                               jnp.zeros(dz.shape, acc))
    share = dz.astype(acc) / count
    return (_windows.scatter_taps(lambda t, tap: jnp.where(tied_maxima(tap, z), share, 0),
                                  xp, cfg, spatial, out).astype(dz.dtype),)


def _disjoint_view(xp, cfg: WindowConfig, out):
    """Disjoint windows (stride = window) side by side: ``(N, o1, k1, o2, k2, ..., C)``, window
    ``i``'s element ``m`` at ``[i, m]`` (the inverse of
    :func:`jaxcnn._windows.disjoint_windows_to_input`)."""
    n, c = xp.shape[0], xp.shape[-1]
    crop = lax.slice(xp, (0,) * xp.ndim, (n, *(o * k for o, k in zip(out, cfg.window)), c))
    return crop.reshape(_windows.windowed_shape((n, *out, c), cfg))


_windows.defvjp_apart(_max_pool_manual, _max_pool_fwd, _max_pool_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _avg_pool_manual(x, cfg: WindowConfig, counted):
    """Manual average pooling; backward :func:`_avg_pool_bwd`."""
    return _windows.layer_boundary(_avg_pool_manual_forward, x, cfg, counted)  # apart


def _avg_pool_manual_forward(x, cfg: WindowConfig, counted):
    """``Z_i = Σ_m Xpad[i * s + m * d] / count_i`` over the window's taps, zero padding."""
    acc = _windows.accum_dtype(x.dtype)
    xp = _windows.pad(x.astype(acc), cfg.padding)
    out = _windows.out_shape(x.shape, cfg)
    s = _windows.reduce_taps(xp, cfg, out, jnp.add, 0)
    return (s / _window_counts(x.shape, cfg, counted)).astype(x.dtype)


def _avg_pool_fwd(x, cfg, counted):
    # Only x's shape is needed (the output size does not determine the input size when the
    # stride leaves a remainder); x is alive anyway, so keeping it costs nothing.
    return _avg_pool_manual_forward(x, cfg, counted), x


def _avg_pool_bwd(cfg: WindowConfig, counted, x, dz):
    """``dX_p = Σ_{i : p ∈ window i} dZ_i / count_i``: spread evenly over each window.

    Every tap ``m`` of window ``i`` gets ``dZ_i / count_i``, put back at ``i * s + m * d`` by
    :func:`jaxcnn._windows.scatter_taps` (padding and ceil-mode overhang are cropped away).
    """
    share = dz.astype(_windows.accum_dtype(dz.dtype)) / _window_counts(x.shape, cfg, counted)
    if _windows.disjoint(cfg):      # non-overlapping windows: one broadcast, no overlap-add
        nd = cfg.ndim
        share = share.astype(dz.dtype)
        every = jnp.broadcast_to(_windows.with_window_axes(share, nd),
                                 _windows.windowed_shape(share.shape, cfg))
        return (_windows.disjoint_windows_to_input(every, x.shape[1:-1], cfg),)
    # Overlapping windows: the shares stay in float32 for half precision (the overlap-add sums
    # in float32 anyway), so each element is rounded once.
    return (_windows.scatter_taps(lambda t, _: share, None, cfg, x.shape[1:-1],
                                  dz.shape[1:-1]).astype(dz.dtype),)


_windows.defvjp_apart(_avg_pool_manual, _avg_pool_fwd, _avg_pool_bwd)
