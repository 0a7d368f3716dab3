"""Activations: relu and log_softmax, each with its lax forward, manual forward and
hand-derived backward registered with ``jax.custom_vjp``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from . import _shapes
from ._windows import accum_dtype


# ============================================================================================
# relu: y = max(x, 0)


def relu(x, *, impl="lax"):
    """``relu(x) = max(x, 0)`` elementwise; its derivative at 0 is taken as 0 (as in JAX)."""
    fn = "relu"
    impl = _shapes.check_impl(fn, impl)
    _shapes.check_array(fn, "x", x)
    return _relu_jit(x, impl=impl)


@partial(jax.jit, static_argnames=("impl",))
def _relu_jit(x, *, impl):
    return jax.nn.relu(x) if impl == "lax" else _relu_manual(x)


@jax.custom_vjp
def _relu_manual(x):
    """Manual relu; backward :func:`_relu_bwd`."""
    return _relu_manual_forward(x)


def _relu_manual_forward(x):
    return jnp.maximum(x, jnp.zeros((), x.dtype))


def _relu_fwd(x):
    return _relu_manual(x), x


def _relu_bwd(x, dy):
    """``dL/dx = dL/dy · [x > 0]``."""
    return (jnp.where(x > 0, dy, jnp.zeros((), dy.dtype)),)


_relu_manual.defvjp(_relu_fwd, _relu_bwd)

# ============================================================================================
# log_softmax: y_j = x_j - log Σ_k exp(x_k)   (over the last axis)


def log_softmax(x, *, impl="lax"):
    """``log_softmax(x)_j = x_j - log Σ_k exp(x_k)`` over the last axis, computed stably."""
    fn = "log_softmax"
    impl = _shapes.check_impl(fn, impl)
    shape = _shapes.check_array(fn, "x", x)
    if len(shape) < 1:
        raise ValueError("log_softmax: x must have rank >= 1; got a scalar")
    return _log_softmax_jit(x, impl=impl)


@partial(jax.jit, static_argnames=("impl",))
def _log_softmax_jit(x, *, impl):
    return jax.nn.log_softmax(x, axis=-1) if impl == "lax" else _log_softmax_manual(x)


def _log_softmax_manual_forward(x):
    """``y = (x - max x) - log Σ exp(x - max x)``: shifting by the max changes nothing but
    keeps ``exp`` from overflowing."""
    acc = accum_dtype(x.dtype)
    xs = x.astype(acc)
    shifted = xs - lax.stop_gradient(jnp.max(xs, axis=-1, keepdims=True))
    return (shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))).astype(x.dtype)


@jax.custom_vjp
def _log_softmax_manual(x):
    """Manual log_softmax; backward :func:`_log_softmax_bwd`."""
    return _log_softmax_manual_forward(x)


def _log_softmax_fwd(x):
    y = _log_softmax_manual(x)
    return y, y


def _log_softmax_bwd(y, dy):
    """``dL/dx_j = dL/dy_j - softmax_j · Σ_k dL/dy_k`` with ``softmax = exp(y)``."""
    acc = accum_dtype(dy.dtype)
    dx = dy.astype(acc) - jnp.exp(y.astype(acc)) * jnp.sum(dy.astype(acc), axis=-1, keepdims=True)
    return (dx.astype(dy.dtype),)


_log_softmax_manual.defvjp(_log_softmax_fwd, _log_softmax_bwd)

