"""Activations: relu, leaky_relu, sigmoid, tanh, gelu, softmax and log_softmax, each with its
lax forward, manual forward and hand-derived backward registered with ``jax.custom_vjp``.

Notation: ``y`` the activation's output, ``dy = dL/dy`` the incoming cotangent, ``dx = dL/dx``
the one the backward returns. Elementwise ops give ``dx = dy · y'(x)``; softmax and
log_softmax mix the elements of one slice along ``axis``.

Half precision (float16 / bfloat16): both impls compute in float32 and return the input's
dtype; the cotangents come back in the input's dtype. Static configuration (``negative_slope``,
``approximate``, ``axis``) is validated once in :mod:`jaxcnn._shapes` for both impls.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _shapes
from ._windows import in_accum_dtype


# ============================================================================================
# relu: y = max(x, 0)


def relu(x, *, impl="lax"):
    """``relu(x) = max(x, 0)`` elementwise. At the kink ``x = 0`` the derivative is taken as
    0 (as ``jax.nn.relu``): ``relu'(0) = 0``."""
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
    return _relu_manual_forward(x), x


def _relu_bwd(x, dy):
    """``dL/dx = dL/dy · [x > 0]`` (so 0 at the kink ``x = 0``)."""
    return (jnp.where(x > 0, dy, jnp.zeros((), dy.dtype)),)


_relu_manual.defvjp(_relu_fwd, _relu_bwd)

# ============================================================================================
# leaky_relu: y = x if x >= 0 else α·x


def leaky_relu(x, negative_slope=0.01, *, impl="lax"):
    """``leaky_relu(x) = x`` for ``x >= 0``, ``α·x`` otherwise (``α = negative_slope``).

    Args:
      x: any shape, floating.
      negative_slope: ``α``, a finite Python number (static configuration, not learned).
      impl: ``"lax"`` (``jax.nn.leaky_relu``) or ``"manual"``.

    At the kink ``x = 0`` the derivative is taken as 1, as ``jax.nn.leaky_relu`` (which
    selects ``x >= 0``) has it. Note that this differs from :func:`relu`, whose derivative at
    0 is 0 (``jax.nn.relu``'s convention): ``leaky_relu(x, 0.0)`` equals ``relu(x)`` everywhere
    but has derivative 1 at ``x = 0``.
    """
    fn = "leaky_relu"
    impl = _shapes.check_impl(fn, impl)
    _shapes.check_array(fn, "x", x)
    alpha = _shapes.check_float(fn, "negative_slope", negative_slope)
    return _leaky_relu_jit(x, negative_slope=alpha, impl=impl)


@partial(jax.jit, static_argnames=("negative_slope", "impl"))
def _leaky_relu_jit(x, *, negative_slope, impl):
    if impl == "lax":
        return jax.nn.leaky_relu(x, negative_slope)
    return _leaky_relu_manual(x, negative_slope)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _leaky_relu_manual(x, negative_slope):
    """Manual leaky_relu; backward :func:`_leaky_relu_bwd`."""
    return _leaky_relu_manual_forward(x, negative_slope)


def _leaky_relu_manual_forward(x, negative_slope):
    return jnp.where(x >= 0, x, (negative_slope * in_accum_dtype(x)).astype(x.dtype))


def _leaky_relu_fwd(x, negative_slope):
    return _leaky_relu_manual_forward(x, negative_slope), x


def _leaky_relu_bwd(negative_slope, x, dy):
    """``dL/dx = dL/dy · (1 if x >= 0 else α)``: 1 at the kink ``x = 0``."""
    dx = jnp.where(x >= 0, in_accum_dtype(dy), negative_slope * in_accum_dtype(dy))
    return (dx.astype(dy.dtype),)


_leaky_relu_manual.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)

# ============================================================================================
# sigmoid: y = σ(x) = 1 / (1 + exp(-x))


def sigmoid(x, *, impl="lax"):
    """``σ(x) = 1 / (1 + exp(-x))`` elementwise, in ``(0, 1)``; stable for any ``|x|``."""
    fn = "sigmoid"
    impl = _shapes.check_impl(fn, impl)
    _shapes.check_array(fn, "x", x)
    return _sigmoid_jit(x, impl=impl)


@partial(jax.jit, static_argnames=("impl",))
def _sigmoid_jit(x, *, impl):
    if impl == "lax":
        return jax.nn.sigmoid(in_accum_dtype(x)).astype(x.dtype)
    return _sigmoid_manual(x)


@jax.custom_vjp
def _sigmoid_manual(x):
    """Manual sigmoid; backward :func:`_sigmoid_bwd`."""
    return _sigmoid_manual_forward(x)


def _sigmoid_manual_forward(x):
    return _sigmoid_acc(x).astype(x.dtype)


def _sigmoid_acc(x):
    """``σ(x) = 1 / (1 + e)`` for ``x >= 0`` and ``e / (1 + e)`` for ``x < 0``, with
    ``e = exp(-|x|) <= 1``: ``exp`` never overflows and neither branch divides by 0. In the
    accumulation dtype (float32 for half precision)."""
    xa = in_accum_dtype(x)
    e = jnp.exp(-jnp.abs(xa))
    return jnp.where(xa >= 0, jnp.ones_like(e), e) / (1 + e)


def _sigmoid_fwd(x):
    y = _sigmoid_acc(x)          # saved unrounded: y(1 - y) from a half-precision y loses
    return y.astype(x.dtype), y  # all digits of 1 - y near y = 1 (the same array in float32)


def _sigmoid_bwd(y, dy):
    """``dL/dx = dL/dy · σ(x)(1 - σ(x)) = dL/dy · y(1 - y)``.

    From ``σ(x) = (1 + e^{-x})^{-1}``: ``σ'(x) = e^{-x} / (1 + e^{-x})² = σ(x) · (1 - σ(x))``,
    computed from the saved output ``y`` (no ``exp`` again, and bounded by 1/4 for any ``x``;
    ``y`` is saved in float32 for half precision).
    """
    dx = in_accum_dtype(dy) * y * (1 - y)
    return (dx.astype(dy.dtype),)


_sigmoid_manual.defvjp(_sigmoid_fwd, _sigmoid_bwd)

# ============================================================================================
# tanh: y = tanh(x)


def tanh(x, *, impl="lax"):
    """``tanh(x) = (e^x - e^{-x}) / (e^x + e^{-x})`` elementwise, in ``(-1, 1)``."""
    fn = "tanh"
    impl = _shapes.check_impl(fn, impl)
    _shapes.check_array(fn, "x", x)
    return _tanh_jit(x, impl=impl)


@partial(jax.jit, static_argnames=("impl",))
def _tanh_jit(x, *, impl):
    return jnp.tanh(in_accum_dtype(x)).astype(x.dtype) if impl == "lax" else _tanh_manual(x)


@jax.custom_vjp
def _tanh_manual(x):
    """Manual tanh; backward :func:`_tanh_bwd`."""
    return _tanh_manual_forward(x)


def _tanh_manual_forward(x):
    return _tanh_acc(x).astype(x.dtype)


def _tanh_acc(x):
    """``tanh(x)`` in the accumulation dtype (float32 for half precision)."""
    return jnp.tanh(in_accum_dtype(x))


def _tanh_fwd(x):
    y = _tanh_acc(x)             # saved unrounded (float32 for half precision), as sigmoid's
    return y.astype(x.dtype), y


def _tanh_bwd(y, dy):
    """``dL/dx = dL/dy · (1 - tanh²(x)) = dL/dy · (1 - y²)``.

    From ``tanh = sinh / cosh``: ``tanh' = (cosh² - sinh²) / cosh² = 1 - tanh²``, computed
    from the saved output ``y`` (``|y| <= 1``, so no overflow for any ``x``).
    """
    dx = in_accum_dtype(dy) * (1 - y * y)
    return (dx.astype(dy.dtype),)


_tanh_manual.defvjp(_tanh_fwd, _tanh_bwd)

# ============================================================================================
# gelu: y = x·Φ(x) (exact), or x/2·(1 + tanh(√(2/π)(x + 0.044715x³))) (approximate)

_SQRT_HALF = float(np.sqrt(0.5))
_SQRT_2_OVER_PI = float(np.sqrt(2 / np.pi))
_INV_SQRT_2PI = float(1 / np.sqrt(2 * np.pi))
_GELU_C = 0.044715


def gelu(x, approximate=False, *, impl="lax"):
    """Gaussian error linear unit, elementwise.

    - ``approximate=False`` (the default): the exact ``gelu(x) = x·Φ(x)``, with the standard
      normal CDF ``Φ(x) = (1 + erf(x/√2)) / 2 = erfc(-x/√2) / 2`` (erfc keeps ``Φ`` accurate
      far into the negative tail).
    - ``approximate=True``: ``x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³)))``.

    Both as ``jax.nn.gelu(x, approximate)``, whose default is ``approximate=True``; here (as
    in PyTorch) the default is the exact form.
    """
    fn = "gelu"
    impl = _shapes.check_impl(fn, impl)
    _shapes.check_array(fn, "x", x)
    approximate = _shapes.check_bool(fn, "approximate", approximate)
    return _gelu_jit(x, approximate=approximate, impl=impl)


@partial(jax.jit, static_argnames=("approximate", "impl"))
def _gelu_jit(x, *, approximate, impl):
    if impl == "lax":
        return jax.nn.gelu(in_accum_dtype(x), approximate=approximate).astype(x.dtype)
    return _gelu_manual(x, approximate)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gelu_manual(x, approximate):
    """Manual gelu; backward :func:`_gelu_bwd`."""
    return _gelu_manual_forward(x, approximate)


def _gelu_manual_forward(x, approximate):
    xa = in_accum_dtype(x)
    if approximate:
        y = xa / 2 * (1 + jnp.tanh(_SQRT_2_OVER_PI * (xa + _GELU_C * xa ** 3)))
    else:
        y = xa * (lax.erfc(-xa * _SQRT_HALF) / 2)
    return y.astype(x.dtype)


def _gelu_fwd(x, approximate):
    return _gelu_manual_forward(x, approximate), x


def _gelu_bwd(approximate, x, dy):
    """Exact: ``dL/dx = dL/dy · (Φ(x) + x·φ(x))``, ``φ(x) = exp(-x²/2) / √(2π)``.

    (product rule on ``x·Φ(x)``, with ``Φ' = φ``). For large ``|x|``: ``Φ -> 0 or 1`` and
    ``x·φ(x) -> 0`` (``exp(-x²/2)`` underflows to 0 first), so ``±100`` gives ``0`` / ``1``.

    Approximate: with ``u = √(2/π)·(x + 0.044715·x³)`` and ``t = tanh(u)``, ``y = x/2·(1 + t)``
    and ``dL/dx = dL/dy · ((1 + t)/2 + x/2 · (1 - t²) · √(2/π)·(1 + 3·0.044715·x²))``.
    """
    xa, dya = in_accum_dtype(x), in_accum_dtype(dy)
    if approximate:
        t = jnp.tanh(_SQRT_2_OVER_PI * (xa + _GELU_C * xa ** 3))
        du_dx = _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * xa ** 2)
        dx = dya * ((1 + t) / 2 + xa / 2 * (1 - t * t) * du_dx)
    else:
        cdf = lax.erfc(-xa * _SQRT_HALF) / 2
        pdf = jnp.exp(-xa * xa / 2) * _INV_SQRT_2PI
        dx = dya * (cdf + xa * pdf)
    return (dx.astype(dy.dtype),)


_gelu_manual.defvjp(_gelu_fwd, _gelu_bwd)

# ============================================================================================
# softmax: y_j = exp(x_j) / Σ_k exp(x_k)   (over one axis)


def softmax(x, axis=-1, *, impl="lax"):
    """``softmax(x)_j = exp(x_j) / Σ_k exp(x_k)`` along ``axis`` (an int, default the last:
    the class axis of channels-last logits), computed stably; each slice sums to 1."""
    fn = "softmax"
    impl = _shapes.check_impl(fn, impl)
    axis = _check_axis(fn, x, axis)
    return _softmax_jit(x, axis=axis, impl=impl)


def _check_axis(fn, x, axis) -> int:
    shape = _shapes.check_array(fn, "x", x)
    if len(shape) < 1:
        raise ValueError(f"{fn}: x must have rank >= 1; got a scalar")
    return _shapes.check_axis(fn, "axis", axis, len(shape))


@partial(jax.jit, static_argnames=("axis", "impl"))
def _softmax_jit(x, *, axis, impl):
    if impl == "lax":
        return jax.nn.softmax(in_accum_dtype(x), axis=axis).astype(x.dtype)
    return _softmax_manual(x, axis)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax_manual(x, axis):
    """Manual softmax; backward :func:`_softmax_bwd`."""
    return _softmax_manual_forward(x, axis)


def _softmax_manual_forward(x, axis):
    return _softmax_acc(x, axis).astype(x.dtype)


def _softmax_acc(x, axis):
    """``y = exp(x - max x) / Σ exp(x - max x)``: the shift changes nothing but keeps ``exp``
    from overflowing (the largest term is ``exp(0) = 1``, so the sum is >= 1). In the
    accumulation dtype (float32 for half precision)."""
    xa = in_accum_dtype(x)
    e = jnp.exp(xa - lax.stop_gradient(jnp.max(xa, axis=axis, keepdims=True)))
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _softmax_fwd(x, axis):
    y = _softmax_acc(x, axis)    # saved unrounded (float32 for half precision)
    return y.astype(x.dtype), y


def _softmax_bwd(axis, y, dy):
    """``dL/dx_i = y_i · (dL/dy_i - Σ_j dL/dy_j · y_j)``.

    From ``∂y_j/∂x_i = y_j · (δ_ij - y_i)``: ``dL/dx_i = Σ_j dL/dy_j · y_j · (δ_ij - y_i)``,
    computed from the saved output ``y`` (sums along ``axis``).
    """
    dya = in_accum_dtype(dy)
    dx = y * (dya - jnp.sum(dya * y, axis=axis, keepdims=True))
    return (dx.astype(dy.dtype),)


_softmax_manual.defvjp(_softmax_fwd, _softmax_bwd)

# ============================================================================================
# log_softmax: y_j = x_j - log Σ_k exp(x_k)   (over one axis)


def log_softmax(x, axis=-1, *, impl="lax"):
    """``log_softmax(x)_j = x_j - log Σ_k exp(x_k)`` along ``axis`` (an int, default the
    last), computed stably."""
    fn = "log_softmax"
    impl = _shapes.check_impl(fn, impl)
    axis = _check_axis(fn, x, axis)
    return _log_softmax_jit(x, axis=axis, impl=impl)


@partial(jax.jit, static_argnames=("axis", "impl"))
def _log_softmax_jit(x, *, axis, impl):
    if impl == "lax":
        return jax.nn.log_softmax(in_accum_dtype(x), axis=axis).astype(x.dtype)
    return _log_softmax_manual(x, axis)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log_softmax_manual(x, axis):
    """Manual log_softmax; backward :func:`_log_softmax_bwd`."""
    return _log_softmax_manual_forward(x, axis)


def _log_softmax_manual_forward(x, axis=-1):
    return _log_softmax_acc(x, axis).astype(x.dtype)


def _log_softmax_acc(x, axis):
    """``y = (x - max x) - log Σ exp(x - max x)``: shifting by the max changes nothing but
    keeps ``exp`` from overflowing. In the accumulation dtype (float32 for half precision)."""
    xs = in_accum_dtype(x)
    shifted = xs - lax.stop_gradient(jnp.max(xs, axis=axis, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))


def _log_softmax_fwd(x, axis):
    y = _log_softmax_acc(x, axis)  # saved unrounded (float32 for half precision)
    return y.astype(x.dtype), y


def _log_softmax_bwd(axis, y, dy):
    """``dL/dx_j = dL/dy_j - softmax_j · Σ_k dL/dy_k`` with ``softmax = exp(y)``.

    From ``∂y_k/∂x_j = δ_kj - softmax_j``.
    """
    dya = in_accum_dtype(dy)
    dx = dya - jnp.exp(y) * jnp.sum(dya, axis=axis, keepdims=True)
    return (dx.astype(dy.dtype),)


_log_softmax_manual.defvjp(_log_softmax_fwd, _log_softmax_bwd)
