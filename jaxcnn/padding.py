"""Padding modes: pad, its lax forward, its manual forward and its backward (the adjoint).

``pad(x, padding, mode=...)`` pads the spatial dims of ``x: (N, *spatial, C)`` the way
PyTorch's ``padding_mode`` does; :func:`jaxcnn.conv`, :func:`jaxcnn.max_pool` and
:func:`jaxcnn.avg_pool` call it for every mode but ``"zeros"`` and then run with no padding.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from . import _shapes, _windows

# PyTorch's mode names -> numpy's (jnp.pad's).
_NUMPY_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
                "circular": "wrap"}


def pad(x, padding, *, mode="zeros", impl="lax"):
    """Pad the spatial dims of ``x: (N, *spatial, C)`` by ``(low, high)`` per dim, with ``mode``.

    Args:
      x: ``(N, *spatial, C)``, one or more spatial dims.
      padding: an int (the same on both sides of every spatial dim) or one ``(low, high)``
        pair of ints >= 0 per spatial dim.
      mode: PyTorch's padding modes (numpy's name in brackets). For one dim ``x = [a b c d]``
        and padding ``(2, 1)``:

        - ``"zeros"`` (``"constant"``): ``[0 0 | a b c d | 0]``;
        - ``"reflect"`` (``"reflect"``): the mirror image without repeating the edge,
          ``[c b | a b c d | c]``; each side's padding must be smaller than the input size;
        - ``"replicate"`` (``"edge"``): the edge element repeated, ``[a a | a b c d | d]``;
        - ``"circular"`` (``"wrap"``): the other end of the input, ``[c d | a b c d | a]``;
          each side's padding must be at most the input size.

        Several dims are padded one after the other, so corners hold the mode applied twice
        (as in PyTorch and numpy).
      impl: ``"lax"`` (``jnp.pad``, JAX's autodiff) or ``"manual"`` (slices and concatenates;
        the backward is the adjoint of the padding, :func:`_pad_bwd`).

    Returns:
      ``(N, *(n + low + high), C)``, the dtype of ``x``.
    """
    fn = "pad"
    impl = _shapes.check_impl(fn, impl)
    x_shape = _shapes.check_array(fn, "x", x)
    pads = _shapes.pad_config(fn, x_shape, padding, mode)
    return _pad_jit(x, pads=pads, mode=mode, impl=impl)


@partial(jax.jit, static_argnames=("pads", "mode", "impl"))
def _pad_jit(x, *, pads, mode, impl):
    if impl == "lax":
        return _pad_lax(x, pads, mode)
    return _pad_manual(x, pads, mode)


# --------------------------------------------------------------------------------------------
# The lax forward: the reference.


def _pad_lax(x, pads, mode: str):
    """``jnp.pad`` with numpy's name of the mode; JAX differentiates it."""
    return jnp.pad(x, ((0, 0), *pads, (0, 0)), mode=_NUMPY_MODES[mode])


# --------------------------------------------------------------------------------------------
# The manual forward: each padded position holds a copy of one input element (or a zero).


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pad_manual(x, pads, mode: str):
    """Manual padding; backward :func:`_pad_bwd`. Each runs as a layer apart
    (:func:`jaxcnn._windows.layer_boundary`)."""
    return _windows.layer_boundary(_pad_manual_forward, x, pads, mode)


def _pad_manual_forward(x, pads, mode: str):
    """Pad spatial dim 1, then 2, ...: ``Y = P_d ⋯ P_1 X`` (:func:`_pad_dim` is one ``P``)."""
    for axis, (lo, hi) in enumerate(pads, start=1):
        x = _pad_dim(x, axis, lo, hi, mode)
    return x


def _pad_dim(x, axis: int, lo: int, hi: int, mode: str):
    """One dim of size ``n``: ``[left | x | right]`` with ``left`` (``lo`` positions) and
    ``right`` (``hi`` positions) copied from ``x`` as the mode says (zeros: no copy)."""
    n = x.shape[axis]
    if lo == 0 and hi == 0:
        return x
    take = partial(lax.slice_in_dim, x, axis=axis)
    if mode == "zeros":
        left = jnp.zeros(_sized(x.shape, axis, lo), x.dtype)
        right = jnp.zeros(_sized(x.shape, axis, hi), x.dtype)
    elif mode == "reflect":                                    # x[lo], ..., x[1] | x | x[n-2], ...
        left = jnp.flip(take(1, lo + 1), axis)
        right = jnp.flip(take(n - 1 - hi, n - 1), axis)
    elif mode == "replicate":                                  # x[0] ... | x | ... x[n-1]
        left = jnp.broadcast_to(take(0, 1), _sized(x.shape, axis, lo))
        right = jnp.broadcast_to(take(n - 1, n), _sized(x.shape, axis, hi))
    else:                                                      # circular: x[n-lo:] | x | x[:hi]
        left, right = take(n - lo, n), take(0, hi)
    return jnp.concatenate([left, x, right], axis=axis)


def _sized(shape, axis: int, size: int):
    return (*shape[:axis], size, *shape[axis + 1:])


# --------------------------------------------------------------------------------------------
# The backward: the adjoint of the padding.


def _pad_fwd(x, pads, mode):
    return _pad_manual_forward(x, pads, mode), None


def _pad_bwd(pads, mode: str, _, dy):
    """Backward of ``Y = pad(X)`` for ``L(Y)``, with ``dY = dL/dY``: the adjoint of the padding.

    Along one dim of size ``n`` padded by ``(lo, hi)``, padded position ``q`` holds ``X[src(q)]``:
    ``src(lo + j) = j`` inside, and on the left (``q < lo``) and right (``q = lo + n + t``)

    - reflect: ``src(q) = lo - q``, ``src(lo + n + t) = n - 2 - t``;
    - replicate: ``src(q) = 0``, ``src(lo + n + t) = n - 1``;
    - circular: ``src(q) = n - lo + q``, ``src(lo + n + t) = t``;
    - zeros: padded positions hold a constant and copy nothing.

    ``Y = P X`` with ``P`` a 0/1 matrix, one 1 per row (at ``src(q)``), so by the chain rule
    ``dL/dX_p = Σ_{q : src(q) = p} dY_q``, i.e. ``dX = Pᵀ dY``: every element receives its own
    gradient ``dY[lo + p]`` plus the gradients of the padded positions that copied it. Hence

    - reflect: ``dX[1 .. lo] += flip(dY[0 .. lo-1])`` and ``dX[n-1-hi .. n-2] += flip(dY[lo+n ..])``
      (an element next to the edge receives its own gradient plus its mirror's; the edge
      element itself is never copied);
    - replicate: ``dX[0] += Σ dY[0 .. lo-1]`` and ``dX[n-1] += Σ dY[lo+n ..]``;
    - circular: ``dX[n-lo ..] += dY[0 .. lo-1]`` and ``dX[.. hi-1] += dY[lo+n ..]``;
    - zeros: ``dX = dY[lo .. lo+n-1]`` (the padding's gradient is dropped).

    In several dims ``P = P_d ⋯ P_1`` (one factor per dim), so ``Pᵀ = P_1ᵀ ⋯ P_dᵀ``: fold the
    last dim first, then the one before. A corner copied in two dims folds twice and lands on
    the element it was copied from.
    """
    for axis, (lo, hi) in reversed(list(enumerate(pads, start=1))):
        dy = _fold_dim(dy, axis, lo, hi, mode)
    return (dy,)


def _fold_dim(dy, axis: int, lo: int, hi: int, mode: str):
    """``Pᵀ`` of one dim: ``dX = dY[lo .. lo+n-1]`` plus the folded left and right parts."""
    n = dy.shape[axis] - lo - hi
    take = partial(lax.slice_in_dim, dy, axis=axis)
    dx = take(lo, lo + n)
    left, right = take(0, lo), take(lo + n, lo + n + hi)
    if mode == "reflect":
        pieces = [(jnp.flip(left, axis), 1), (jnp.flip(right, axis), n - 1 - hi)]
    elif mode == "replicate":
        pieces = [(jnp.sum(left, axis, keepdims=True), 0),
                  (jnp.sum(right, axis, keepdims=True), n - 1)]
    elif mode == "circular":
        pieces = [(left, n - lo), (right, 0)]
    else:
        pieces = []
    for (piece, start), width in zip(pieces, (lo, hi)):
        if width:                                  # a side without padding folds nothing
            dx = dx + _place(piece, axis, start, n)
    return dx


def _place(piece, axis: int, start: int, n: int):
    """``piece`` (``size`` positions along ``axis``) at ``start .. start+size-1`` of ``n`` zeros."""
    size = piece.shape[axis]
    config = [(0, 0, 0)] * piece.ndim
    config[axis] = (start, n - start - size, 0)
    return lax.pad(piece, jnp.zeros((), piece.dtype), config)


_windows.defvjp_apart(_pad_manual, _pad_fwd, _pad_bwd)
