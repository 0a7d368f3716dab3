"""The fully connected head: dense, relu, flatten, log_softmax, cross_entropy.

Each op has a lax forward (JAX's autodiff), a manual forward and a hand-derived backward
registered with ``jax.custom_vjp``, so that a whole network can run on the lecture's gradients.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
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
    return _dense_manual(x, w, b), (x, w, b is not None)


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
    return _flatten_manual(x), x


def _flatten_bwd(x, dy):
    """Flattening only renames elements: ``dL/dx = reshape(dL/dy, x.shape)``."""
    return (dy.reshape(x.shape),)


_flatten_manual.defvjp(_flatten_fwd, _flatten_bwd)


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


# ============================================================================================
# cross_entropy: L = -(1/N) Σ_n log softmax(logits_n)[label_n]


def cross_entropy(logits, labels, *, impl="lax"):
    """Mean softmax cross-entropy ``L = -(1/N) Σ_n log_softmax(logits_n)[labels_n]``.

    Args:
      logits: ``(N, num_classes)``, floating.
      labels: ``(N,)`` integers in ``[0, num_classes)``. Concrete labels are range-checked;
        traced ones (under ``jit``) cannot be, and an out-of-range label there gives a
        meaningless loss, so check labels where the data is loaded.
      impl: ``"lax"`` or ``"manual"`` (backward ``(softmax - onehot) / N``).

    Returns:
      A scalar of the logits' dtype.
    """
    fn = "cross_entropy"
    impl = _shapes.check_impl(fn, impl)
    l_shape = _shapes.check_array(fn, "logits", logits)
    y_shape = _shapes.check_array(fn, "labels", labels, floating=False)
    y_dtype = labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype
    _shapes.check_labels(fn, l_shape, y_shape, y_dtype)
    lab = _concrete(labels)
    if lab is not None and lab.size and (lab.min() < 0 or lab.max() >= l_shape[1]):
        raise ValueError(
            f"cross_entropy: labels must lie in [0, {l_shape[1]}) for logits of shape "
            f"{tuple(l_shape)}; got values from {lab.min()} to {lab.max()}"
        )
    return _cross_entropy_jit(logits, labels, impl=impl)


def _concrete(a):
    """The value of ``a`` as a numpy array, or None when it is traced (inside jit / grad)."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


@partial(jax.jit, static_argnames=("impl",))
def _cross_entropy_jit(logits, labels, *, impl):
    if impl == "lax":
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)
        return -jnp.mean(picked)
    return _cross_entropy_manual(logits, labels)


@jax.custom_vjp
def _cross_entropy_manual(logits, labels):
    """Manual cross-entropy; backward :func:`_cross_entropy_bwd`."""
    return _cross_entropy_manual_forward(logits, labels)


def _cross_entropy_manual_forward(logits, labels):
    logp = _log_softmax_manual_forward(logits)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logp.dtype)
    return -jnp.sum(onehot * logp) / logits.shape[0]


def _cross_entropy_fwd(logits, labels):
    return _cross_entropy_manual(logits, labels), (logits, labels)


def _cross_entropy_bwd(res, dl):
    """``dL/dlogits = dL · (softmax(logits) - onehot(labels)) / N``; labels get no gradient."""
    logits, labels = res
    acc = accum_dtype(logits.dtype)
    p = jnp.exp(_log_softmax_manual_forward(logits).astype(acc))
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=acc)
    dlogits = dl.astype(acc) * (p - onehot) / logits.shape[0]
    return dlogits.astype(logits.dtype), None


_cross_entropy_manual.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
