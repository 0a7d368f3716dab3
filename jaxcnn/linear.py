"""Dense (fully connected) layers and flattening: public op, lax forward, manual forward and
hand-derived backward for each.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from . import _shapes
from ._windows import accum_dtype


# ============================================================================================
# dense: z = x · W + b


def dense(x, w, b=None, *, impl="lax"):
    """Fully connected layer ``z = x · W + b``.

    Args:
      x: ``(..., D_in)``. w: ``(D_in, D_out)``. b: ``(D_out,)`` or None.
      impl: ``"lax"`` (``lax.dot_general``, JAX's autodiff) or ``"manual"``.

    Returns:
      ``(..., D_out)``. float16 / bfloat16 accumulate in float32 and return their own dtype.
    """
    fn = "dense"
    impl = _shapes.check_impl(fn, impl)
    x_shape = _shapes.check_array(fn, "x", x)
    w_shape = _shapes.check_array(fn, "w", w)
    b_shape = None if b is None else _shapes.check_array(fn, "b", b)
    _shapes.check_dense(fn, x_shape, w_shape, b_shape)
    return _dense_jit(x, w, b, impl=impl)


@partial(jax.jit, static_argnames=("impl",))
def _dense_jit(x, w, b, *, impl):
    dtype = jnp.result_type(x, w, *(() if b is None else (b,)))
    x, w = x.astype(dtype), w.astype(dtype)
    b = None if b is None else b.astype(dtype)
    if impl == "lax":
        return _dense_lax(x, w, b)
    return _dense_manual(x, w, b)


def _dense_lax(x, w, b):
    z = lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                        preferred_element_type=accum_dtype(x.dtype))
    if b is not None:
        z = z + b.astype(z.dtype)
    return z.astype(x.dtype)


@jax.custom_vjp
def _dense_manual(x, w, b):
    """Manual dense layer; backward :func:`_dense_bwd`."""
    return _dense_manual_forward(x, w, b)


def _dense_manual_forward(x, w, b):
    """``z_j = Σ_i x_i W_ij + b_j``."""
    z = jnp.matmul(x, w, preferred_element_type=accum_dtype(x.dtype))
    if b is not None:
        z = z + b.astype(z.dtype)
    return z.astype(x.dtype)


def _dense_fwd(x, w, b):
    return _dense_manual_forward(x, w, b), (x, w, b is not None)


def _dense_bwd(res, dz):
    """For ``z = x · W + b`` and ``dZ = dL/dz`` (leading dims flattened into rows):

    - ``dW = xᵀ · dZ``   (``dL/dW_ij = Σ_n x_ni dZ_nj``)
    - ``db = Σ_n dZ_n``
    - ``dx = dZ · Wᵀ``   (``dL/dx_i = Σ_j dZ_j W_ij``)
    """
    x, w, has_b = res
    acc = accum_dtype(dz.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    dz2 = dz.reshape(-1, dz.shape[-1])
    dw = jnp.matmul(x2.T, dz2, preferred_element_type=acc).astype(w.dtype)
    db = jnp.sum(dz2, axis=0, dtype=acc).astype(dz.dtype) if has_b else None
    dx = jnp.matmul(dz, w.T, preferred_element_type=acc).astype(x.dtype)
    return dx, dw, db


_dense_manual.defvjp(_dense_fwd, _dense_bwd)

# ============================================================================================
# flatten: (N, ...) -> (N, prod(...))


def flatten(x, *, impl="lax"):
    """Flatten every dim but the batch: ``(N, *rest) -> (N, prod(rest))``."""
    fn = "flatten"
    impl = _shapes.check_impl(fn, impl)
    shape = _shapes.check_array(fn, "x", x, floating=False)
    if len(shape) < 1:
        raise ValueError("flatten: x must have rank >= 1, (N, ...); got a scalar")
    return _flatten_jit(x, impl=impl)


@partial(jax.jit, static_argnames=("impl",))
def _flatten_jit(x, *, impl):
    if impl == "lax" or not jnp.issubdtype(x.dtype, jnp.floating):
        return x.reshape(x.shape[0], -1)
    return _flatten_manual(x)


@jax.custom_vjp
def _flatten_manual(x):
    """Manual flatten; backward :func:`_flatten_bwd`."""
    return _flatten_manual_forward(x)


def _flatten_manual_forward(x):
    return x.reshape(x.shape[0], -1)


def _flatten_fwd(x):
    return _flatten_manual_forward(x), x


def _flatten_bwd(x, dy):
    """Flattening only renames elements: ``dL/dx = reshape(dL/dy, x.shape)``."""
    return (dy.reshape(x.shape),)


_flatten_manual.defvjp(_flatten_fwd, _flatten_bwd)

