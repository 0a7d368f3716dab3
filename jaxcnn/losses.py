"""Losses: softmax cross-entropy, binary cross-entropy with logits and mean squared error, each
with its lax forward, manual forward and hand-derived backward.

Every loss takes ``reduction``: ``"mean"`` (the default), ``"sum"`` or ``"none"`` (one loss
per example for cross-entropy, per element for the elementwise losses). Notation: ``ℓ`` the
unreduced losses, ``L`` the reduced one, ``dL`` the incoming cotangent, ``dℓ`` its share per
loss: ``dL / count`` (mean), ``dL`` (sum) or ``dL`` itself (none, one per loss).

Targets (probability targets of cross-entropy, those of the other two) are differentiable: both
impls give their gradient. Half precision (float16 / bfloat16) is computed in float32 and the
loss returned in the dtype of the logits (prediction); each gradient comes back in the dtype of
its argument.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import _shapes
from ._windows import accum_dtype, in_accum_dtype
from .activations import _log_softmax_manual_forward, _sigmoid_manual_forward


def _reduce(loss, reduction):
    """``L`` from the unreduced losses ``ℓ``."""
    if reduction == "mean":
        return jnp.mean(loss)
    return jnp.sum(loss) if reduction == "sum" else loss


def _loss_cotangent(dl, shape, reduction):
    """``dℓ`` (of ``shape``) from ``dL``: ``dL / count`` (mean), ``dL`` (sum) or ``dL`` (none)."""
    if reduction == "none":
        return dl
    count = int(np.prod(shape)) if reduction == "mean" else 1
    return jnp.broadcast_to(dl / count, shape)


def _concrete(a):
    """The value of ``a`` as a numpy array, or None when it is traced (inside jit / grad)."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


# ============================================================================================
# cross_entropy: ℓ_n = -Σ_c q_nc · log softmax(logits_n)_c,  q = (1 - ε)·t + ε/C


def cross_entropy(logits, labels, *, label_smoothing=0.0, reduction="mean", impl="lax"):
    """Softmax cross-entropy ``ℓ_n = -Σ_c q_nc · log_softmax(logits_n)_c``, reduced over ``n``.

    The target distribution is ``q = (1 - ε)·t + ε/C`` with ``ε = label_smoothing`` and ``t``
    the one-hot rows of integer ``labels`` or the given probability targets. ``ε = 0`` and
    integer labels give the usual ``ℓ_n = -log_softmax(logits_n)[labels_n]``.

    Args:
      logits: ``(N, C)``, floating (``C`` classes).
      labels: either integer class labels ``(N,)`` in ``[0, C)``, or floating probability
        targets ``(N, C)``, the logits' shape (rows meant to sum to 1; not checked), which get
        a gradient. Concrete integer labels are range-checked (``ValueError``). Traced ones
        (under ``jit``) cannot be: a label outside ``[0, C)`` there gives that example a NaN
        loss (so a mean or sum is NaN) and a NaN row in the logits' gradient, under both
        impls; the other rows' gradients are unaffected.
      label_smoothing: ``ε``, a float in ``[0, 1)``.
      reduction: ``"mean"`` (over the ``N`` examples), ``"sum"``, or ``"none"`` (``(N,)``).
      impl: ``"lax"`` or ``"manual"`` (backward ``(softmax - q) / N`` for the mean).

    Returns:
      A scalar (``(N,)`` for ``reduction="none"``) of the logits' dtype.
    """
    fn = "cross_entropy"
    impl = _shapes.check_impl(fn, impl)
    l_shape = _shapes.check_array(fn, "logits", logits)
    y_shape = _shapes.check_array(fn, "labels", labels, floating=False)
    kind = _shapes.cross_entropy_labels(fn, l_shape, labels, y_shape)
    eps = _shapes.check_float(fn, "label_smoothing", label_smoothing, minimum=0.0,
                               maximum=1.0, exclusive_maximum=True)
    reduction = _shapes.check_reduction(fn, reduction)
    lab = _concrete(labels) if kind == "int" else None
    if lab is not None:
        _shapes.check_label_values(fn, "labels", lab, l_shape[1],
                                   context=f" for logits of shape {tuple(l_shape)}")
    return _cross_entropy_jit(logits, jnp.asarray(labels), label_smoothing=eps,
                              reduction=reduction, impl=impl)


def _target_distribution(labels, num_classes, label_smoothing, dtype):
    """``q = (1 - ε)·t + ε/C``: ``t`` the one-hot rows of integer labels (a NaN row for a label
    outside ``[0, C)``, the one defined behaviour of both impls) or the probability targets."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        valid = (labels >= 0) & (labels < num_classes)
        t = jnp.where(valid[:, None], jax.nn.one_hot(labels, num_classes, dtype=dtype), jnp.nan)
    else:
        t = labels.astype(dtype)
    return (1 - label_smoothing) * t + label_smoothing / num_classes


@partial(jax.jit, static_argnames=("label_smoothing", "reduction", "impl"))
def _cross_entropy_jit(logits, labels, *, label_smoothing, reduction, impl):
    if impl == "lax":
        logp = jax.nn.log_softmax(in_accum_dtype(logits), axis=-1)
        q = _target_distribution(labels, logits.shape[-1], label_smoothing, logp.dtype)
        return _reduce(-jnp.sum(q * logp, axis=-1), reduction).astype(logits.dtype)
    return _cross_entropy_manual(logits, labels, label_smoothing, reduction)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cross_entropy_manual(logits, labels, label_smoothing=0.0, reduction="mean"):
    """Manual cross-entropy; backward :func:`_cross_entropy_bwd`."""
    return _cross_entropy_manual_forward(logits, labels, label_smoothing, reduction)


def _cross_entropy_manual_forward(logits, labels, label_smoothing=0.0, reduction="mean"):
    logp = _log_softmax_manual_forward(in_accum_dtype(logits))
    q = _target_distribution(labels, logits.shape[-1], label_smoothing, logp.dtype)
    loss = -jnp.sum(q * logp, axis=-1)
    return _reduce(loss, reduction).astype(logits.dtype)


def _cross_entropy_fwd(logits, labels, label_smoothing, reduction):
    return (_cross_entropy_manual_forward(logits, labels, label_smoothing, reduction),
            (logits, labels))


def _cross_entropy_bwd(label_smoothing, reduction, res, dl):
    """The lecture's ``(softmax - onehot) / N``, with smoothing and every reduction.

    Forward: ``logp_n = log_softmax(logits_n)``, ``q_n = (1 - ε)·t_n + ε/C``,
    ``ℓ_n = -Σ_c q_nc · logp_nc``, ``L = (1/N) Σ_n ℓ_n`` (mean), ``Σ_n ℓ_n`` (sum) or ``ℓ``.

    - ``dℓ_n = dL / N`` (mean), ``dL`` (sum), ``dL_n`` (none).
    - ``dlogits_n = dℓ_n · (softmax_n · Σ_c q_nc - q_n)``, from
      ``∂logp_nc / ∂logits_nj = δ_cj - softmax_nj``. Rows of ``q`` sum to 1 for integer labels
      (``(1 - ε) + C·ε/C``) and for probability targets that are distributions, and then
      ``dlogits = (softmax - q) / N`` for the mean; the factor ``Σ_c q_nc`` keeps the exact
      gradient for any targets. A NaN row of ``q`` (a label outside ``[0, C)``) gives NaN.
    - ``dt_n = -(1 - ε) · dℓ_n · logp_n`` (probability targets, through ``q``); integer labels
      get no gradient.

    ``logp`` is recomputed from the saved logits (one ``(N, C)`` log-softmax).
    """
    logits, labels = res
    logp = _log_softmax_manual_forward(in_accum_dtype(logits))
    q = _target_distribution(labels, logp.shape[-1], label_smoothing, logp.dtype)
    dloss = _loss_cotangent(dl.astype(logp.dtype), logp.shape[:1], reduction)[:, None]
    dlogits = dloss * (jnp.exp(logp) * jnp.sum(q, axis=-1, keepdims=True) - q)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return dlogits.astype(logits.dtype), None
    dt = -(1 - label_smoothing) * dloss * logp
    return dlogits.astype(logits.dtype), dt.astype(labels.dtype)


_cross_entropy_manual.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)

# ============================================================================================
# binary_cross_entropy_with_logits: ℓ = -t·log σ(x) - (1 - t)·log(1 - σ(x))


def binary_cross_entropy_with_logits(logits, targets, *, reduction="mean", impl="lax"):
    """Binary cross-entropy of ``σ(logits)`` against ``targets``, elementwise:
    ``ℓ = -t·log σ(x) - (1 - t)·log(1 - σ(x)) = max(x, 0) - x·t + log1p(exp(-|x|))``
    (the second form never overflows; ``x`` the logits, ``t`` the targets).

    Args:
      logits: any shape, floating.
      targets: the logits' shape, floating, probabilities in ``[0, 1]`` (not checked); they get
        a gradient (``-x``).
      reduction: ``"mean"`` (over every element), ``"sum"`` or ``"none"`` (the logits' shape).
      impl: ``"lax"`` (the log-sigmoid form, as optax) or ``"manual"`` (backward
        ``σ(x) - t``).

    Returns:
      A scalar (the logits' shape for ``reduction="none"``) of the logits' dtype.
    """
    fn = "binary_cross_entropy_with_logits"
    impl = _shapes.check_impl(fn, impl)
    shape = _shapes.check_array(fn, "logits", logits)
    _shapes.check_targets(fn, "logits", shape, "targets", targets)
    reduction = _shapes.check_reduction(fn, reduction)
    return _bce_jit(logits, jnp.asarray(targets), reduction=reduction, impl=impl)


@partial(jax.jit, static_argnames=("reduction", "impl"))
def _bce_jit(logits, targets, *, reduction, impl):
    if impl == "lax":
        x, t = in_accum_dtype(logits), targets.astype(accum_dtype(logits.dtype))
        loss = -t * jax.nn.log_sigmoid(x) - (1 - t) * jax.nn.log_sigmoid(-x)
        return _reduce(loss, reduction).astype(logits.dtype)
    return _bce_manual(logits, targets, reduction)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bce_manual(logits, targets, reduction="mean"):
    """Manual binary cross-entropy with logits; backward :func:`_bce_bwd`."""
    return _bce_manual_forward(logits, targets, reduction)


def _bce_manual_forward(logits, targets, reduction="mean"):
    x, t = in_accum_dtype(logits), targets.astype(accum_dtype(logits.dtype))
    loss = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    return _reduce(loss, reduction).astype(logits.dtype)


def _bce_fwd(logits, targets, reduction):
    return _bce_manual_forward(logits, targets, reduction), (logits, targets)


def _bce_bwd(reduction, res, dl):
    """``dx = dℓ · (σ(x) - t)`` and ``dt = -dℓ · x``.

    From ``ℓ = -t·log σ(x) - (1 - t)·log(1 - σ(x))`` with ``(log σ)' = 1 - σ`` and
    ``(log(1 - σ))' = -σ``: ``∂ℓ/∂x = -t·(1 - σ) + (1 - t)·σ = σ(x) - t``, and
    ``∂ℓ/∂t = -log σ(x) + log(1 - σ(x)) = -x``. ``σ`` is the stable sigmoid
    (:func:`jaxcnn.sigmoid`'s manual forward); ``dℓ`` as in the module docstring.
    """
    logits, targets = res
    x, t = in_accum_dtype(logits), targets.astype(accum_dtype(logits.dtype))
    dloss = _loss_cotangent(dl.astype(x.dtype), x.shape, reduction)
    dx = dloss * (_sigmoid_manual_forward(x) - t)
    dt = -dloss * x
    return dx.astype(logits.dtype), dt.astype(targets.dtype)


_bce_manual.defvjp(_bce_fwd, _bce_bwd)

# ============================================================================================
# mse: ℓ = (pred - target)²


def mse(pred, target, *, reduction="mean", impl="lax"):
    """Squared error ``ℓ = (pred - target)²`` elementwise; the mean over every element by
    default (``reduction="sum"`` / ``"none"``).

    Args:
      pred: any shape, floating.
      target: ``pred``'s shape, floating; it gets a gradient (``-dpred``).
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``pred``'s shape).
      impl: ``"lax"`` or ``"manual"`` (backward ``2·(pred - target) / size`` for the mean).

    Returns:
      A scalar (``pred``'s shape for ``reduction="none"``) of ``pred``'s dtype.
    """
    fn = "mse"
    impl = _shapes.check_impl(fn, impl)
    shape = _shapes.check_array(fn, "pred", pred)
    _shapes.check_targets(fn, "pred", shape, "target", target)
    reduction = _shapes.check_reduction(fn, reduction)
    return _mse_jit(pred, jnp.asarray(target), reduction=reduction, impl=impl)


@partial(jax.jit, static_argnames=("reduction", "impl"))
def _mse_jit(pred, target, *, reduction, impl):
    if impl == "lax":
        diff = in_accum_dtype(pred) - target.astype(accum_dtype(pred.dtype))
        return _reduce(jnp.square(diff), reduction).astype(pred.dtype)
    return _mse_manual(pred, target, reduction)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mse_manual(pred, target, reduction="mean"):
    """Manual mean squared error; backward :func:`_mse_bwd`."""
    return _mse_manual_forward(pred, target, reduction)


def _mse_manual_forward(pred, target, reduction="mean"):
    diff = in_accum_dtype(pred) - target.astype(accum_dtype(pred.dtype))
    return _reduce(diff * diff, reduction).astype(pred.dtype)


def _mse_fwd(pred, target, reduction):
    return _mse_manual_forward(pred, target, reduction), (pred, target)


def _mse_bwd(reduction, res, dl):
    """``dpred = dℓ · 2·(pred - target)`` and ``dtarget = -dpred``.

    With ``dℓ = dL / size`` for the mean: ``dpred = 2·(pred - target) / size``.
    """
    pred, target = res
    diff = in_accum_dtype(pred) - target.astype(accum_dtype(pred.dtype))
    dpred = _loss_cotangent(dl.astype(diff.dtype), diff.shape, reduction) * 2 * diff
    dtarget = -dpred
    return dpred.astype(pred.dtype), dtarget.astype(target.dtype)


_mse_manual.defvjp(_mse_fwd, _mse_bwd)
