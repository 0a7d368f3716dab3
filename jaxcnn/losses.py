"""Losses: softmax cross-entropy, with its lax forward, manual forward and hand-derived backward.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import _shapes
from ._windows import accum_dtype
from .activations import _log_softmax_manual_forward


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
    if lab is not None:
        _shapes.check_label_values(fn, "labels", lab, l_shape[1],
                                   context=f" for logits of shape {tuple(l_shape)}",
                                   message=_shapes.LABEL_VALUES_HALF_OPEN)
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
