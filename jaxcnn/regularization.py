"""Regularization: dropout, with its lax forward, manual forward and hand-derived backward
registered with ``jax.custom_vjp``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from . import _shapes
from ._windows import accum_dtype


# ============================================================================================
# dropout: y = x · m / (1 − rate), m ~ Bernoulli(1 − rate) elementwise


def dropout(x, rate, key, *, deterministic=False, impl="lax"):
    """Inverted dropout: zero each element of ``x`` with probability ``rate`` and scale the
    kept ones by ``1 / (1 − rate)``, so that ``E[y] = x``.

    **``rate`` is the probability of dropping**, as in PyTorch, Flax and Keras. stax's
    ``Dropout(rate)`` takes the probability of *keeping*: ``stax.Dropout(0.9)`` is this
    function's ``rate=0.1``.

    Args:
      x: any shape, floating.
      rate: a Python number in ``[0, 1]`` (static). ``0``: ``y = x``. ``1``: ``y = 0`` and a
        zero gradient (no division by zero).
      key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``); the mask is a function of
        the key and the shape only, the same for both impls. May be None when
        ``deterministic`` or ``rate == 0``.
      deterministic: True returns ``x`` unchanged (evaluation).
      impl: ``"lax"`` (jnp, JAX's autodiff) or ``"manual"`` (backward :func:`_dropout_bwd`).

    Returns:
      ``y``, the shape and dtype of ``x``; float16 / bfloat16 are scaled in float32 and
      rounded once.
    """
    fn = "dropout"
    impl = _shapes.check_impl(fn, impl)
    _shapes.check_array(fn, "x", x)
    rate = _shapes.check_rate(fn, rate)
    deterministic = _shapes.check_bool(fn, "deterministic", deterministic)
    if deterministic or rate == 0.0:
        return jnp.asarray(x)
    if key is None:
        raise ValueError(f"{fn}: key is required when rate > 0 and deterministic=False; got "
                         f"None (rate={rate!r})")
    _shapes.check_key(fn, "key", key)
    return _dropout_jit(x, key, rate=rate, impl=impl)


def _keep_mask(key, shape, rate):
    """The keep mask of :func:`dropout`: ``True`` with probability ``1 − rate``, per element."""
    return jax.random.bernoulli(key, 1.0 - rate, shape)


@partial(jax.jit, static_argnames=("rate", "impl"))
def _dropout_jit(x, key, *, rate, impl):
    if rate == 1.0:
        return jnp.zeros_like(x)       # everything dropped; the gradient is zero too
    keep = _keep_mask(key, x.shape, rate)
    if impl == "lax":
        return _dropout_lax(x, keep, rate)
    return _dropout_manual(x, keep, rate)


def _dropout_lax(x, keep, rate):
    acc = accum_dtype(x.dtype)
    return jnp.where(keep, x.astype(acc) / (1.0 - rate), 0).astype(x.dtype)


def _dropout_manual_forward(x, keep, rate):
    """``y = x · m · s`` with the keep mask ``m`` and the scale ``s = 1 / (1 − rate)``."""
    acc = accum_dtype(x.dtype)
    scale = 1.0 / (1.0 - rate)
    return (x.astype(acc) * keep.astype(acc) * scale).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dropout_manual(x, keep, rate):
    """Manual dropout; backward :func:`_dropout_bwd`."""
    return _dropout_manual_forward(x, keep, rate)


def _dropout_fwd(x, keep, rate):
    return _dropout_manual_forward(x, keep, rate), keep


def _dropout_bwd(rate, keep, dy):
    """For ``y = x · m · s`` (``m`` the keep mask, ``s = 1 / (1 − rate)``), ``dY = dL/dy``:
    ``dX = dY · m · s``. The mask is not differentiated (None)."""
    acc = accum_dtype(dy.dtype)
    scale = 1.0 / (1.0 - rate)
    dx = dy.astype(acc) * keep.astype(acc) * scale
    return dx.astype(dy.dtype), None


_dropout_manual.defvjp(_dropout_fwd, _dropout_bwd)
