"""The manual path's window machinery, shared by conv and pooling.

Three explicit operations, written with slices and pads only (no ``conv_general_dilated``, no
``reduce_window``):

- :func:`pad`: zero (or ``value``) padding of the spatial dims, with optional *interior*
  padding (``s - 1`` zeros between elements: the lecture's "dilate dL/dZ by the stride"); a
  negative padding crops.
- :func:`taps`: for every window offset ``m`` (row-major order), the strided slice
  ``Xpad[:, m * d : m * d + (out - 1) * s + 1 : s, :]``; tap ``m`` at output ``i`` is
  ``Xpad[i * s + m * d]``. Stacked they are the patch ("im2col") matrix of the layer.
- :func:`overlap_add`: the transpose of :func:`taps`: each tap's values are put back at
  positions ``i * s + m * d`` and summed where windows overlap, then the forward padding is
  cropped away.

Pooling walks the taps with :func:`fold_taps` and puts gradients back with
:func:`scatter_taps`: the same slices and overlap-add, written out for small windows and run in
a ``lax.fori_loop`` for large ones (:data:`UNROLL_TAPS`).

Arrays are channels-last, batch first: ``(N, *spatial, C)``.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _xla_cpu
from ._shapes import Pads, WindowConfig, output_spatial


def accum_dtype(dtype):
    """float16 / bfloat16 accumulate in float32; everything else in its own dtype."""
    return np.float32 if np.dtype(dtype).itemsize < 4 else dtype


def in_accum_dtype(x):
    """``x`` in the dtype its arithmetic runs in (float32 for float16 / bfloat16)."""
    return x.astype(accum_dtype(x.dtype))


def layer_boundary(op, x, *rest):
    """``op(x, *rest)``, a manual layer run apart from its neighbours
    (:func:`jaxcnn._xla_cpu.isolate`; its backward through :func:`defvjp_apart`). XLA's CPU backend
    otherwise fuses the elementwise expressions of the layers before into this layer's taps
    and patches, recomputing them for every tap. Arguments that are not arrays (a config)
    pass through as they are."""
    is_array = [hasattr(a, "shape") for a in rest]
    arrays = [a for a, arr in zip(rest, is_array) if arr]

    def run(x, *arrays):
        it = iter(arrays)
        return op(x, *(next(it) if arr else a for a, arr in zip(rest, is_array)))

    return _xla_cpu.isolate(run, x, *arrays)


def defvjp_apart(f, fwd, bwd):
    """``f.defvjp(fwd, bwd)`` for a manual layer's ``jax.custom_vjp`` ``f``, each rule run apart
    from its neighbours like the layer's primal (:func:`layer_boundary`).

    The forward rule's residuals that are its own inputs (``X``, ``K``) are passed on from
    outside the boundary, not through it: a conditional's outputs are new buffers, so an input
    passed out through one is copied, a pass over the layer's input on every step (in the
    CIFAR stack, 16 MB for its first max pool). Residuals that are not arrays (a flag) pass
    on as they are. ``bwd`` takes ``f``'s ``nondiff_argnums`` first, as JAX passes them.
    """
    n_nondiff = len(f.nondiff_argnums)

    def fwd_rule(*args):
        flat, tree = jax.tree_util.tree_flatten(args)
        found = {}

        def inside(*flat_in):
            out, res = fwd(*jax.tree_util.tree_unflatten(tree, flat_in))
            leaves, res_tree = jax.tree_util.tree_flatten(res)
            index = {id(a): i for i, a in enumerate(flat_in)}   # the inputs, by identity
            kinds = [("input", index[id(leaf)]) if id(leaf) in index else
                     ("computed", None) if hasattr(leaf, "shape") else ("static", leaf)
                     for leaf in leaves]
            found.update(tree=res_tree, kinds=kinds)
            return out, [leaf for leaf, (kind, _) in zip(leaves, kinds) if kind == "computed"]

        out, computed = layer_boundary(inside, *flat)
        computed = iter(computed)
        leaves = [flat[v] if kind == "input" else next(computed) if kind == "computed" else v
                  for kind, v in found["kinds"]]
        return out, jax.tree_util.tree_unflatten(found["tree"], leaves)

    def bwd_rule(*args):
        nondiff, res, g = args[:n_nondiff], args[n_nondiff], args[n_nondiff + 1]
        flat, tree = jax.tree_util.tree_flatten(res)
        return layer_boundary(
            lambda g, *flat_res: bwd(*nondiff, jax.tree_util.tree_unflatten(tree, flat_res), g),
            g, *flat)

    f.defvjp(fwd_rule, bwd_rule)


def pad(x, pads: Pads, *, interior: Sequence[int] | None = None, value=0):
    """Pad the spatial dims of ``x: (N, *spatial, C)``; negative entries crop."""
    nd = len(pads)
    interior = (0,) * nd if interior is None else tuple(interior)
    if all(lo == 0 and hi == 0 for lo, hi in pads) and not any(interior):
        return x
    config = [(0, 0, 0)] + [(lo, hi, i) for (lo, hi), i in zip(pads, interior)] + [(0, 0, 0)]
    return lax.pad(x, lax.convert_element_type(value, x.dtype), config)


def offsets(cfg: WindowConfig):
    """Window offsets ``m`` (one tuple per tap) in row-major order: the tie-break order."""
    return list(itertools.product(*(range(k) for k in cfg.window)))


def taps(xp, cfg: WindowConfig, out: Sequence[int]):
    """The strided slices ``xp[:, m*d : m*d + (out-1)*s + 1 : s, :]``, one per offset ``m``.

    ``xp`` is the already padded input. Slicing exactly ``out`` positions per tap means the
    stride remainder (rows no window reaches) is never read.
    """
    n, c = xp.shape[0], xp.shape[-1]
    result = []
    for m in offsets(cfg):
        start = tuple(mi * di for mi, di in zip(m, cfg.dilation))
        limit = tuple(st + (o - 1) * s + 1 for st, o, s in zip(start, out, cfg.stride))
        result.append(lax.slice(xp, (0, *start, 0), (n, *limit, c), (1, *cfg.stride, 1)))
    return result


def overlap_add(contribs, spatial: Sequence[int], cfg: WindowConfig):
    """Transpose of :func:`taps` followed by cropping the forward padding.

    ``contribs[t]: (N, *out, C)`` is the gradient that flows back through tap ``t``. Tap
    ``m`` at output ``i`` read padded position ``p = i * s + m * d``; in unpadded coordinates
    that is ``p - lo``. Each contribution is dilated by ``s - 1`` zeros, shifted to start at
    ``m * d - lo`` and padded (or cropped) to the input size ``n``; the results are summed, so
    positions shared by overlapping windows receive the sum of their contributions. Half
    precision (float16 / bfloat16) is summed in float32 and rounded once, to the contributions'
    dtype.
    """
    dtype = contribs[0].dtype
    acc = accum_dtype(dtype)
    total = None
    for m, c in zip(offsets(cfg), contribs):
        c = c.astype(acc)
        pads = []
        for mi, di, (lo, _), n, o, s in zip(m, cfg.dilation, cfg.padding, spatial,
                                             c.shape[1:-1], cfg.stride):
            low = mi * di - lo
            pads.append((low, n - low - ((o - 1) * s + 1)))
        placed = pad(c, tuple(pads), interior=tuple(s - 1 for s in cfg.stride))
        total = placed if total is None else total + placed
    # Materialize the sum, so that XLA does not fuse the T-term chain into each of its
    # consumers and recompute it there.
    return lax.optimization_barrier(total.astype(dtype))


def out_shape(x_shape, cfg: WindowConfig):
    return output_spatial(x_shape[1:-1], cfg)


def disjoint(cfg: WindowConfig) -> bool:
    """True when windows neither overlap nor leave gaps: stride == window, no dilation."""
    return cfg.stride == cfg.window and all(d == 1 for d in cfg.dilation)


def tap_grid(cfg: WindowConfig):
    """Tap index ``t`` (row-major) of every window element, shaped ``(1, 1, k1, 1, k2, ..., 1)``
    to broadcast against :func:`disjoint_windows_to_input` inputs."""
    shape = [1]
    for k in cfg.window:
        shape += [1, k]
    return np.arange(int(np.prod(cfg.window))).reshape(cfg.window).reshape(shape + [1])


def disjoint_windows_to_input(values, spatial: Sequence[int], cfg: WindowConfig):
    """For disjoint windows: ``values: (N, o1, k1, o2, k2, ..., C)`` (window element ``m`` of
    output ``i`` at ``[i, m]``) → ``(N, *spatial, C)``.

    Window ``i`` covers padded positions ``i * k .. i * k + k - 1``; flattening ``(o, k)`` gives
    padded coordinates ``0 .. o * k - 1`` directly, with no overlap to add up. The forward
    padding is then cropped and the stride-remainder positions no window covered get zeros.
    """
    n, c = values.shape[0], values.shape[-1]
    outs = values.shape[1:-1:2]
    flat = values.reshape(n, *(o * k for o, k in zip(outs, cfg.window)), c)
    pads = tuple((-lo, size - (o * k - lo)) for size, (lo, _), o, k in
                 zip(spatial, cfg.padding, outs, cfg.window))
    return pad(flat, pads)


def windowed_shape(out_shape, cfg: WindowConfig):
    """``(N, o1, o2, ..., C)`` → ``(N, o1, k1, o2, k2, ..., C)``, the input of
    :func:`disjoint_windows_to_input`."""
    inner = tuple(v for o, k in zip(out_shape[1:-1], cfg.window) for v in (o, k))
    return (out_shape[0], *inner, out_shape[-1])


def with_window_axes(a, nd: int):
    """``(N, o1, o2, ..., C)`` → ``(N, o1, 1, o2, 1, ..., C)``: room for the window axes."""
    shape = [a.shape[0]]
    for o in a.shape[1:1 + nd]:
        shape += [o, 1]
    return a.reshape(*shape, a.shape[-1])


# --------------------------------------------------------------------------------------------
# Per-tap loops that do not grow with the window (pooling's large windows).

UNROLL_TAPS = 16
"""Windows of up to this many taps (a 4×4 window, a 2×2×2 one) are written out tap by tap, a
chain XLA fuses into one loop over the output; larger ones (5×5, 7×7, 3×3×3) run their taps in
a ``lax.fori_loop``, so the program (and its compile time) does not grow with the window."""


def fold_taps(xp, cfg: WindowConfig, out: Sequence[int], body, init):
    """``carry = body(carry, t, tap_t)`` for the taps of :func:`taps`, ``t`` in row-major order.

    Written out up to :data:`UNROLL_TAPS` taps (``t`` a Python int); above, a
    ``lax.fori_loop`` over ``t`` (a traced int) with :func:`dynamic_tap`.
    """
    n_taps = int(np.prod(cfg.window))
    if n_taps <= UNROLL_TAPS:
        carry = init
        for t, tap in enumerate(taps(xp, cfg, out)):
            carry = body(carry, t, tap)
        return carry
    return lax.fori_loop(0, n_taps, lambda t, c: body(c, t, dynamic_tap(xp, cfg, out, t)), init)


SEPARABLE = True
"""Whether :func:`reduce_taps` runs dim by dim (the switch for measuring it)."""


def reduce_taps(xp, cfg: WindowConfig, out: Sequence[int], op, identity):
    """``Z_i = op_m Xpad[i * s + m * d]`` over the window (``op`` associative and commutative:
    ``max`` or ``+``; ``identity`` its neutral element) of the padded ``xp``.

    A box window is separable: ``op`` over ``m = (m_1, .., m_nd)`` is ``op`` over ``m_nd`` of
    ... ``op`` over ``m_1``, so the window is reduced one dim at a time, each dim a 1-D window
    with its own stride and dilation (:func:`fold_taps` on it): ``Σ_q k_q`` taps read instead of
    ``Π_q k_q``, with an intermediate written per dim. That pays where the window has more
    taps than :data:`UNROLL_TAPS` (where the product form loops over the taps, each a dynamic
    slice) and costs a pass where it has few: there the taps are written out and fused into one
    loop over the output. Measured forward, manual/lax, product form -> by dims (one
    interleaved run): avg_pool 3x3x3 s2 on 16^3x8 at batch 32 1.82 -> 0.31, max_pool 7x7 s2
    SAME on 32x32x16 at batch 32 0.53 -> 0.13, avg_pool 5x5 on 30x30x16 at batch 8 1.01 ->
    0.14; on windows of at most 16 taps (3x3, 2x2x2) by dims moved 0.15-0.51 by -20% to +20%,
    within the noise, so the product form stays there."""
    n_taps = math.prod(cfg.window)
    if not SEPARABLE or n_taps <= UNROLL_TAPS or cfg.ndim == 1:
        init = jnp.full((xp.shape[0], *out, xp.shape[-1]), identity, xp.dtype)
        return fold_taps(xp, cfg, out, lambda z, t, tap: op(z, tap), init)
    z, nd = xp, cfg.ndim
    for q in reversed(range(nd)):
        if cfg.window[q] == 1 and cfg.stride[q] == 1 and z.shape[1 + q] == out[q]:
            continue
        one = lambda v, a, q=q: tuple(v if i == q else a for i in range(nd))   # noqa: E731
        dim = WindowConfig(one(cfg.window[q], 1), one(cfg.stride[q], 1), ((0, 0),) * nd,
                           one(cfg.dilation[q], 1))
        size = tuple(out[i] if i == q else z.shape[1 + i] for i in range(nd))
        init = jnp.full((z.shape[0], *size, z.shape[-1]), identity, z.dtype)
        z = fold_taps(z, dim, size, lambda c, t, tap: op(c, tap), init)
    return z


def _tap_start(cfg: WindowConfig, t):
    """Padded position ``m * d`` where tap ``t`` (row-major offset ``m``) starts, per dim."""
    start = []
    for k, d in zip(reversed(cfg.window), reversed(cfg.dilation)):
        start.append((t % k) * d)
        t = t // k
    return tuple(reversed(start))


def dynamic_tap(xp, cfg: WindowConfig, out: Sequence[int], t):
    """Tap ``t`` of :func:`taps` for a traced ``t``: a dynamic slice, then the static stride."""
    n, c = xp.shape[0], xp.shape[-1]
    span = tuple((o - 1) * s + 1 for o, s in zip(out, cfg.stride))
    block = lax.dynamic_slice(xp, (0, *_tap_start(cfg, t), 0), (n, *span, c))
    return lax.slice(block, (0,) * block.ndim, block.shape, (1, *cfg.stride, 1))


def scatter_taps(contrib, xp, cfg: WindowConfig, spatial: Sequence[int], out: Sequence[int]):
    """``Σ_t place_t(contrib(t, tap_t))``, cropped: :func:`overlap_add` of one contribution
    ``(N, *out, C)`` per tap, each put back at ``i * s + m * d``.

    ``contrib(t, tap)`` gets tap ``t`` of ``xp`` (None when ``xp`` is None). Written out up to
    :data:`UNROLL_TAPS` taps (:func:`overlap_add`); above, a ``lax.fori_loop`` that adds each
    stride-dilated contribution into the padded gradient in place (dynamic slice, add,
    dynamic update), summed in float32 for half precision, then crops the padding.
    """
    n_taps = int(np.prod(cfg.window))
    if n_taps <= UNROLL_TAPS:
        tap_list = [None] * n_taps if xp is None else taps(xp, cfg, out)
        return overlap_add([contrib(t, tap) for t, tap in enumerate(tap_list)], spatial, cfg)
    first = contrib(0, None if xp is None else dynamic_tap(xp, cfg, out, 0))
    dtype, acc = first.dtype, accum_dtype(first.dtype)
    n, c = first.shape[0], first.shape[-1]
    padded = tuple(size + lo + hi for size, (lo, hi) in zip(spatial, cfg.padding))
    dilate = tuple(s - 1 for s in cfg.stride)

    def step(t, total):
        tap = None if xp is None else dynamic_tap(xp, cfg, out, t)
        placed = pad(contrib(t, tap).astype(acc), ((0, 0),) * cfg.ndim, interior=dilate)
        start = (0, *_tap_start(cfg, t), 0)
        window = lax.dynamic_slice(total, start, placed.shape)
        return lax.dynamic_update_slice(total, window + placed, start)

    total = lax.fori_loop(0, n_taps, step, lax.full((n, *padded, c), 0, acc))
    crop = tuple((-lo, -hi) for lo, hi in cfg.padding)
    return lax.optimization_barrier(pad(total, crop).astype(dtype))
