"""Normalization: batch_norm and layer_norm, each with its lax forward, manual forward and
hand-derived backward registered with ``jax.custom_vjp``.

Both standardize ``x`` over a set of axes ``R`` (``M`` elements per group), then apply an
affine map:

    μ = (1/M) Σ_R x,    v = (1/M) Σ_R (x − μ)²,    σ = sqrt(v + ε),
    x̂ = (x − μ) / σ,    y = γ · x̂ + β.

``batch_norm`` standardizes each channel over the batch and spatial axes (``R`` = every axis
but the last; ``γ``, ``β``, ``μ``, ``v`` have one entry per channel); ``layer_norm`` standardizes
each example over its own ``axes`` (``γ`` and ``β`` have the shape of those axes).

The backward of the standardization, once for both (``dY = dL/dy``, ``dX̂ = dL/dx̂``). The
graph is ``x → μ → v → σ → x̂ → y``, and ``x`` reaches ``x̂`` three ways: directly, through
``μ`` and through ``σ``. With ``∂μ/∂x_i = 1/M`` and ``∂σ/∂x_i = (1/2σ) · ∂v/∂x_i =
(1/2σ) · (2/M)(x_i − μ) = x̂_i / M`` (the ``μ``-term of ``∂v/∂x_i`` is ``−(2/M) Σ_j (x_j − μ)
/ M = 0``):

    ∂x̂_j/∂x_i = (δ_ij − 1/M)/σ − (x_j − μ)/σ² · x̂_i/M = (1/σ) (δ_ij − 1/M − x̂_j x̂_i / M),

    dX_i = Σ_j dX̂_j ∂x̂_j/∂x_i = (1/σ) (dX̂_i − mean_R(dX̂) − x̂_i · mean_R(dX̂ · x̂)).

``dX̂ = γ · dY``; where ``γ`` is constant over ``R`` (batch norm) it comes out of the means:
``dX = (γ/σ) · (dY − mean_R(dY) − x̂ · mean_R(dY · x̂))``, the compact formula.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from . import _shapes
from ._windows import accum_dtype


# ============================================================================================
# batch_norm: y = γ · (x − μ) / sqrt(v + ε) + β, per channel over the batch and spatial axes


def batch_norm(x, scale, offset, *, mean=None, var=None, train, eps=1e-5, impl="lax"):
    """Batch normalization of ``x: (N, *spatial, C)`` (channels last), per channel.

    Each channel is standardized over the batch and spatial axes (``M = N · prod(spatial)``
    elements), then scaled and shifted: ``y = scale · (x − μ) / sqrt(v + eps) + offset``.

    Args:
      x: ``(N, *spatial, C)``, rank >= 2 (``(N, C)`` for features).
      scale, offset: ``γ`` and ``β``, ``(C,)``.
      mean, var: ``(C,)``, eval mode only: the statistics to normalize with (for instance the
        running averages of :func:`jaxcnn.nn.BatchNorm`). Not differentiated by the layer,
        but both impls give the same gradients with respect to them.
      train: True: normalize with the batch statistics ``μ = mean(x)`` and the **biased**
        ``v = mean((x − μ)²)`` (divided by ``M``, as every framework does in training mode),
        and return them. False: normalize with the given ``mean`` and ``var``.
      eps: ``ε > 0``, added to the variance.
      impl: ``"lax"`` (jnp, JAX's autodiff) or ``"manual"`` (backward :func:`_batch_norm_bwd`
        and :func:`_batch_norm_eval_bwd`).

    Returns:
      Train mode: ``(y, (batch_mean, batch_var))``; eval mode: ``y``. ``y`` has the shape and
      dtype of ``x`` (the common dtype of ``x``, ``scale`` and ``offset``). The statistics are
      ``(C,)`` in the accumulation dtype: float16 / bfloat16 compute the statistics and the
      normalization in float32 (the statistics stay float32; ``y`` is rounded once).
      Differentiating through the returned statistics works and agrees between the impls
      (``∂μ/∂x = 1/M``, ``∂v/∂x = 2(x − μ)/M``).

    One element per channel in train mode (``M = 1``, e.g. ``(1, C)`` or a batch of one 1×1
    image): ``μ = x``, ``v = 0``, so ``x̂ = 0`` and ``y = offset``, with a zero gradient for
    ``x``: well defined thanks to ``eps``, useless for learning. Zero elements per channel
    (``M = 0``) are refused: their statistics are undefined.
    """
    fn = "batch_norm"
    impl = _shapes.check_impl(fn, impl)
    train = _shapes.check_bool(fn, "train", train)
    shapes = [None if a is None else _shapes.check_array(fn, name, a)
              for name, a in (("x", x), ("scale", scale), ("offset", offset), ("mean", mean),
                              ("var", var))]
    eps = _shapes.batch_norm_config(*shapes, train=train, eps=eps, fn=fn)
    if train:
        return _batch_norm_train_jit(x, scale, offset, eps=eps, impl=impl)
    return _batch_norm_eval_jit(x, scale, offset, mean, var, eps=eps, impl=impl)


def _common(x, scale, offset, *stats):
    """``x``, ``scale``, ``offset`` in their common dtype; statistics in its accumulation
    dtype (they do not take part in the promotion, so float32 running averages leave a
    bfloat16 network in bfloat16)."""
    dtype = jnp.result_type(x, scale, offset)
    acc = accum_dtype(dtype)
    return (x.astype(dtype), scale.astype(dtype), offset.astype(dtype),
            *(s.astype(acc) for s in stats))


@partial(jax.jit, static_argnames=("eps", "impl"))
def _batch_norm_train_jit(x, scale, offset, *, eps, impl):
    x, scale, offset = _common(x, scale, offset)
    if impl == "lax":
        y, mean, var = _batch_norm_train_lax(x, scale, offset, eps)
    else:
        y, mean, var = _batch_norm_manual(x, scale, offset, eps)
    return y, (mean, var)


@partial(jax.jit, static_argnames=("eps", "impl"))
def _batch_norm_eval_jit(x, scale, offset, mean, var, *, eps, impl):
    x, scale, offset, mean, var = _common(x, scale, offset, mean, var)
    if impl == "lax":
        return _batch_norm_eval_lax(x, scale, offset, mean, var, eps)
    return _batch_norm_eval_manual(x, scale, offset, mean, var, eps)


def _batch_axes(x) -> tuple[int, ...]:
    """``R`` of batch norm: the batch and spatial axes, every axis but the channels."""
    return tuple(range(x.ndim - 1))


# --------------------------------------------------------------------------------------------
# The lax forwards: the reference (JAX differentiates them).


def _batch_norm_train_lax(x, scale, offset, eps):
    acc = accum_dtype(x.dtype)
    xs = x.astype(acc)
    mean = jnp.mean(xs, axis=_batch_axes(x))
    var = jnp.var(xs, axis=_batch_axes(x))
    y = (xs - mean) * lax.rsqrt(var + eps) * scale.astype(acc) + offset.astype(acc)
    return y.astype(x.dtype), mean, var


def _batch_norm_eval_lax(x, scale, offset, mean, var, eps):
    acc = accum_dtype(x.dtype)
    y = (x.astype(acc) - mean) * lax.rsqrt(var + eps) * scale.astype(acc) + offset.astype(acc)
    return y.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# The manual forwards, written out.


def _batch_norm_train_manual_forward(x, scale, offset, eps):
    """``μ = mean_R x``, ``v = mean_R (x − μ)²``, ``x̂ = (x − μ) / sqrt(v + ε)``,
    ``y = γ · x̂ + β``; returns ``(y, μ, v)`` with ``μ``, ``v`` of shape ``(C,)``."""
    acc = accum_dtype(x.dtype)
    xs = x.astype(acc)
    m = _count(x, _batch_axes(x))
    mean = jnp.sum(xs, axis=_batch_axes(x)) / m
    centred = xs - mean
    var = jnp.sum(centred * centred, axis=_batch_axes(x)) / m
    xhat = centred * lax.rsqrt(var + eps)
    y = scale.astype(acc) * xhat + offset.astype(acc)
    return y.astype(x.dtype), mean, var


def _batch_norm_eval_manual_forward(x, scale, offset, mean, var, eps):
    """``x̂ = (x − μ) / sqrt(v + ε)`` with the given ``μ``, ``v``; ``y = γ · x̂ + β``."""
    acc = accum_dtype(x.dtype)
    xhat = (x.astype(acc) - mean) * lax.rsqrt(var + eps)
    return (scale.astype(acc) * xhat + offset.astype(acc)).astype(x.dtype)


def _count(x, axes) -> int:
    """``M``: the number of elements standardized together."""
    m = 1
    for a in axes:
        m *= x.shape[a]
    return m


# --------------------------------------------------------------------------------------------
# The backward of train mode: the compact formula, plus the returned statistics' cotangents.


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_manual(x, scale, offset, eps):
    """Manual batch norm, train mode; backward :func:`_batch_norm_bwd`."""
    return _batch_norm_train_manual_forward(x, scale, offset, eps)


def _batch_norm_fwd(x, scale, offset, eps):
    y, mean, var = _batch_norm_train_manual_forward(x, scale, offset, eps)
    return (y, mean, var), (x, scale, mean, var)


def _batch_norm_bwd(eps, res, cotangents):
    """Backward of train mode, ``(y, μ, v) = BN(x; γ, β)``, for ``dY = dL/dy`` and the
    cotangents ``dμ``, ``dv`` of the returned statistics (zero unless the caller's loss uses
    them). Per channel, sums over ``R`` (the batch and spatial axes, ``M`` elements):

    - ``dβ = Σ_R dY``                  (``∂y/∂β = 1``)
    - ``dγ = Σ_R dY · x̂``              (``∂y/∂γ = x̂``)
    - ``dX = (γ/σ) · (dY − dβ/M − x̂ · dγ/M) + dμ/M + x̂ · 2σ·dv/M``

    The first term of ``dX`` is the compact formula of the module docstring with
    ``mean_R(dY) = dβ/M`` and ``mean_R(dY · x̂) = dγ/M``: the two sums of the parameter
    gradients are the two means ``dX`` needs. The last two are the direct paths to the
    returned statistics: ``∂μ/∂x_i = 1/M`` and ``∂v/∂x_i = 2(x_i − μ)/M = 2σ x̂_i / M``.
    ``x̂`` and ``σ`` are recomputed from the saved ``x``, ``μ``, ``v``.
    """
    x, scale, mean, var = res
    dy, dmean, dvar = cotangents
    acc = accum_dtype(x.dtype)
    axes = _batch_axes(x)
    m = _count(x, axes)
    inv_std = lax.rsqrt(var + eps)
    xhat = (x.astype(acc) - mean) * inv_std
    dy = dy.astype(acc)
    dbeta = jnp.sum(dy, axis=axes)
    dgamma = jnp.sum(dy * xhat, axis=axes)
    dx = ((scale.astype(acc) * inv_std) * (dy - dbeta / m - xhat * (dgamma / m))
          + dmean / m + xhat * (2 * dvar / (inv_std * m)))
    return dx.astype(x.dtype), dgamma.astype(scale.dtype), dbeta.astype(scale.dtype)


_batch_norm_manual.defvjp(_batch_norm_fwd, _batch_norm_bwd)


# --------------------------------------------------------------------------------------------
# The backward of eval mode: an affine map of x.


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _batch_norm_eval_manual(x, scale, offset, mean, var, eps):
    """Manual batch norm, eval mode; backward :func:`_batch_norm_eval_bwd`."""
    return _batch_norm_eval_manual_forward(x, scale, offset, mean, var, eps)


def _batch_norm_eval_fwd(x, scale, offset, mean, var, eps):
    return (_batch_norm_eval_manual_forward(x, scale, offset, mean, var, eps),
            (x, scale, mean, var))


def _batch_norm_eval_bwd(eps, res, dy):
    """Backward of eval mode, ``y = γ · (x − μ)/σ + β`` with given ``μ``, ``v``
    (``σ = sqrt(v + ε)``): for fixed statistics ``y`` is an affine map of ``x``, so

    - ``dβ = Σ_R dY``
    - ``dγ = Σ_R dY · x̂``
    - ``dX = dY · γ/σ``                            (no path through the statistics)
    - ``dμ = −(γ/σ) · dβ``                          (``∂y/∂μ = −γ/σ``)
    - ``dv = −γ · dγ / (2σ²)``                      (``∂y/∂v = −γ (x − μ)/(2σ³) = −γ x̂/(2σ²)``)
    """
    x, scale, mean, var = res
    acc = accum_dtype(x.dtype)
    axes = _batch_axes(x)
    inv_std = lax.rsqrt(var + eps)
    xhat = (x.astype(acc) - mean) * inv_std
    gamma = scale.astype(acc)
    dy = dy.astype(acc)
    dbeta = jnp.sum(dy, axis=axes)
    dgamma = jnp.sum(dy * xhat, axis=axes)
    dx = dy * (gamma * inv_std)
    dmean = -(gamma * inv_std) * dbeta
    dvar = -gamma * dgamma * (inv_std * inv_std) / 2
    return (dx.astype(x.dtype), dgamma.astype(scale.dtype), dbeta.astype(scale.dtype),
            dmean.astype(mean.dtype), dvar.astype(var.dtype))


_batch_norm_eval_manual.defvjp(_batch_norm_eval_fwd, _batch_norm_eval_bwd)

# ============================================================================================
# layer_norm: y = γ · (x − μ) / sqrt(v + ε) + β, per example over the given axes


def layer_norm(x, scale, offset, *, axes=-1, eps=1e-5, impl="lax"):
    """Layer normalization: standardize ``x`` over ``axes``, separately for every position of
    the other axes (every example), then ``y = scale · x̂ + offset``.

    Args:
      x: any rank >= 1, e.g. ``(N, D)`` or ``(N, *spatial, C)``.
      scale, offset: ``γ``, ``β``, the shape of ``x`` on ``axes`` (in increasing axis order):
        ``(C,)`` for the default ``axes=-1``, ``(H, W, C)`` for ``axes=(1, 2, 3)`` of an image.
      axes: an int or a tuple of ints (negative counts from the end): the axes normalized
        together, ``M`` elements per group.
      eps: ``ε > 0``, added to the (biased) variance ``mean((x − μ)²)``.
      impl: ``"lax"`` or ``"manual"`` (backward :func:`_layer_norm_bwd`).

    Returns:
      ``y``, the shape and dtype of ``x`` (the common dtype of the three arrays); float16 /
      bfloat16 compute in float32 and round once. ``M = 1`` gives ``y = offset``.
    """
    fn = "layer_norm"
    impl = _shapes.check_impl(fn, impl)
    shapes = [_shapes.check_array(fn, name, a)
              for name, a in (("x", x), ("scale", scale), ("offset", offset))]
    axes, eps = _shapes.layer_norm_config(*shapes, axes=axes, eps=eps, fn=fn)
    return _layer_norm_jit(x, scale, offset, axes=axes, eps=eps, impl=impl)


@partial(jax.jit, static_argnames=("axes", "eps", "impl"))
def _layer_norm_jit(x, scale, offset, *, axes, eps, impl):
    x, scale, offset = _common(x, scale, offset)
    scale, offset = _on_axes(scale, x, axes), _on_axes(offset, x, axes)
    if impl == "lax":
        return _layer_norm_lax(x, scale, offset, axes, eps)
    return _layer_norm_manual(x, scale, offset, axes, eps)


def _on_axes(p, x, axes):
    """``γ`` or ``β`` (the shape of ``x`` on ``axes``) with size-1 axes elsewhere, so that it
    broadcasts against ``x``."""
    return p.reshape([x.shape[a] if a in axes else 1 for a in range(x.ndim)])


def _layer_norm_lax(x, scale, offset, axes, eps):
    acc = accum_dtype(x.dtype)
    xs = x.astype(acc)
    mean = jnp.mean(xs, axis=axes, keepdims=True)
    var = jnp.var(xs, axis=axes, keepdims=True)
    y = (xs - mean) * lax.rsqrt(var + eps) * scale.astype(acc) + offset.astype(acc)
    return y.astype(x.dtype)


def _layer_norm_manual_forward(x, scale, offset, axes, eps):
    """``x̂ = (x − μ)/σ`` over ``axes`` (:func:`_standardize`), ``y = γ · x̂ + β``."""
    acc = accum_dtype(x.dtype)
    xhat, _ = _standardize(x, axes, eps)
    return (scale.astype(acc) * xhat + offset.astype(acc)).astype(x.dtype)


def _standardize(x, axes, eps):
    """``x̂ = (x − μ)/σ`` over ``axes`` and ``1/σ`` (kept dims), in the accumulation dtype."""
    acc = accum_dtype(x.dtype)
    xs = x.astype(acc)
    m = _count(x, axes)
    centred = xs - jnp.sum(xs, axis=axes, keepdims=True) / m
    inv_std = lax.rsqrt(jnp.sum(centred * centred, axis=axes, keepdims=True) / m + eps)
    return centred * inv_std, inv_std


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm_manual(x, scale, offset, axes, eps):
    """Manual layer norm; backward :func:`_layer_norm_bwd`."""
    return _layer_norm_manual_forward(x, scale, offset, axes, eps)


def _layer_norm_fwd(x, scale, offset, axes, eps):
    return _layer_norm_manual_forward(x, scale, offset, axes, eps), (x, scale)


def _layer_norm_bwd(axes, eps, res, dy):
    """Backward of ``y = γ · x̂ + β``, ``x̂`` standardized over ``R`` = ``axes`` (``M``
    elements), for ``dY = dL/dy``. ``γ`` and ``β`` are shared by the other axes ``B`` (the
    examples), so their gradients sum over ``B``; ``γ`` varies along ``R``, so it stays inside
    the means (the module docstring's derivation):

    - ``dβ = Σ_B dY``
    - ``dγ = Σ_B dY · x̂``
    - ``dX̂ = γ · dY``
    - ``dX = (1/σ) · (dX̂ − mean_R(dX̂) − x̂ · mean_R(dX̂ · x̂))``

    ``x̂`` and ``σ`` are recomputed from the saved ``x``.
    """
    x, scale = res
    acc = accum_dtype(x.dtype)
    others = tuple(a for a in range(x.ndim) if a not in axes)
    xhat, inv_std = _standardize(x, axes, eps)
    dy = dy.astype(acc)
    dbeta = jnp.sum(dy, axis=others, keepdims=True)
    dgamma = jnp.sum(dy * xhat, axis=others, keepdims=True)
    dxhat = scale.astype(acc) * dy
    dx = inv_std * (dxhat - jnp.mean(dxhat, axis=axes, keepdims=True)
                    - xhat * jnp.mean(dxhat * xhat, axis=axes, keepdims=True))
    return dx.astype(x.dtype), dgamma.astype(scale.dtype), dbeta.astype(scale.dtype)


_layer_norm_manual.defvjp(_layer_norm_fwd, _layer_norm_bwd)
