"""The deliberate grid: one case per configuration, for every op with a hand-derived VJP.

Each :class:`Case` holds one configuration's arguments and three forwards: the public op on
``impl="manual"`` (the custom VJP under test, (a)), on ``impl="lax"`` (``jax.grad`` through it
is (b)) and the manual forward with the custom VJP bypassed ((c), (d), (e)). :func:`run_case`
sends a case through the comparison engine; :func:`grid` lists the cases of the report.

How to add an op (say ``batch_norm``) to the grid and to ``python -m jaxcnn.check --op``:

1. Write one case builder ``_batch_norm_cases(dtype: str) -> list[Case]``, returning the
   configurations worth checking (strides that leave a remainder, every padding form, ...);
   mark one or a few ``quick=True`` (the ``--quick`` subset, which CI runs). Build the inputs
   from ``_rng(op, label)`` so that every case is reproducible on its own, and declare the
   comparisons that do not apply in ``skip`` with the reason (see ``_TIES``). For an op of one
   array, :func:`_unary_case` builds a case from the public op and its manual forward.
2. Add one entry ``"batch_norm": _batch_norm_cases`` to :data:`OPS` (its order is the report's).

Nothing else changes: :func:`grid`, the command line's ``--op`` choices and the JSON report read
:data:`OPS`.
"""

from __future__ import annotations

import dataclasses
import zlib
from functools import partial
from typing import Callable

import jax
import numpy as np

from .. import _shapes
from ..activations import (_gelu_manual_forward, _leaky_relu_manual_forward,
                           _log_softmax_manual_forward, _relu_manual_forward,
                           _sigmoid_manual_forward, _softmax_manual_forward, _tanh_manual_forward,
                           gelu, leaky_relu, log_softmax, relu, sigmoid, softmax, tanh)
from ..convolution import (_conv_manual_forward, _conv_transpose_manual_forward, conv,
                           conv_transpose)
from ..linear import _dense_manual_forward, _flatten_manual_forward, dense, flatten
from ..losses import (_bce_manual_forward, _cross_entropy_manual_forward, _mse_manual_forward,
                      binary_cross_entropy_with_logits, cross_entropy, mse)
from ..normalization import (_batch_norm_eval_manual_forward, _batch_norm_train_manual_forward,
                             _layer_norm_manual_forward, _on_axes, batch_norm, layer_norm)
from ..adaptive_pooling import (_adaptive_avg_pool_manual_forward,
                                _adaptive_max_pool_manual_forward,
                                _global_avg_pool_manual_forward,
                                _global_max_pool_manual_forward, adaptive_avg_pool,
                                adaptive_max_pool, global_avg_pool, global_max_pool)
from ..padding import _pad_manual_forward, pad
from ..pooling import (_avg_pool_manual_forward, _counted, _max_pool_manual_forward, avg_pool,
                       max_pool, mode_pad)
from ..regularization import _dropout_manual_forward, _keep_mask, dropout
from ._engine import compare
from .results import CheckResult

_TIES = ("tied maxima: the derivative is undefined there and every subgradient is valid, so "
         "(c) (which splits ties), (d) and (e) do not apply; (b) pins the tie rule (the first "
         "maximum, as jax.grad of reduce_window picks)")
_TIES_SPLIT = ("tied maxima: the derivative is undefined there and every subgradient is valid, "
               "so (c) (jnp.maximum's pairwise halves), (d) and (e) do not apply; (b) pins the "
               "tie rule (equal shares, as jax.grad of jnp.max gives)")
_NO_LAX_GRAD = ("window dilation: JAX has no gradient for a max reduce_window with window "
                "dilation, so impl='lax' differentiates an explicit forward, the same kind of "
                "reference as (c); (c), (d) and (e) check the rule")
_RELU_ZERO = ("relu at exactly 0: not differentiable; (b) pins the convention relu'(0) = 0, "
              "(c) (jnp.maximum gives 1/2), (d) and (e) do not apply")
_LEAKY_ZERO = ("leaky_relu at exactly 0: not differentiable; (b) and (c) pin the convention "
               "leaky_relu'(0) = 1 (jax.nn.leaky_relu selects x >= 0), (e) follows it; (d) "
               "(a central difference straddles the kink: (1 + slope) / 2) does not apply")


@dataclasses.dataclass
class Case:
    """One configuration of one op: arguments and the three forwards to compare."""

    op: str
    label: str
    args: tuple           # floating arrays are differentiated; the rest is passed through
    names: tuple
    manual: Callable      # public op, impl="manual": the custom VJP under test (a)
    lax: Callable         # public op, impl="lax": jax.grad through it is (b)
    forward: Callable     # manual forward without the custom VJP: (c), (d), (e)
    quick: bool = False
    skip: dict = dataclasses.field(default_factory=dict)


def run_case(case: Case) -> CheckResult:
    """Compare the case's custom VJP with (b)-(e): one row of the report."""
    refs = {"reference_grad": case.lax, "bypass_grad": case.forward}
    return compare(case.manual, refs, case.forward, case.args, case.names,
                   title=f"{case.op}: {case.label}", skip=case.skip)


def grid(dtype: str = "float64", ops=None, quick: bool = False) -> list:
    """The cases of the report, op by op in the order of :data:`OPS` (``ops``: only these;
    ``quick``: the representative subset)."""
    ops = tuple(OPS) if ops is None else ops
    cases = [case for op, build in OPS.items() if op in ops for case in build(dtype)]
    return [c for c in cases if c.quick] if quick else cases


# --------------------------------------------------------------------------------------------
# Inputs and the case of one configuration.


def _rng(op, label):
    return np.random.default_rng(zlib.crc32(f"{op}|{label}".encode()))


def _unique(rng, shape, dtype):
    """Distinct, well-separated values (a shuffled grid spanning [-2, 2]): no near-ties, so
    max pooling is differentiable and finite differences with h ≈ 1e-6 never swap a maximum."""
    n = int(np.prod(shape))
    gap = 4.0 / max(n - 1, 1)
    return (rng.permutation(n) * gap - 2.0).reshape(shape).astype(dtype)


def _conv_case(label, x_shape, k_shape, bias=True, quick=False, dtype="float64", **st):
    rng = _rng("conv", label)
    st = {"stride": 1, "padding": "VALID", "dilation": 1, "groups": 1, **st}
    x = rng.standard_normal(x_shape).astype(dtype)
    k = rng.standard_normal(k_shape).astype(dtype)
    b = rng.standard_normal(k_shape[-1]).astype(dtype) if bias else None
    cfg = _shapes.conv_config(x.shape, k.shape, None if b is None else b.shape, **st)
    return Case("conv", label, (x, k, b), ("x", "kernel", "bias"),
                lambda x, k, b: conv(x, k, b, impl="manual", **st),
                lambda x, k, b: conv(x, k, b, impl="lax", **st),
                lambda x, k, b: _conv_manual_forward(x, k, b, cfg, st["groups"]), quick)


def _conv_transpose_case(label, y_shape, k_shape, bias=True, quick=False, dtype="float64",
                         **st):
    rng = _rng("conv_transpose", label)
    st = {"stride": 1, "padding": "VALID", "dilation": 1, "groups": 1, "output_padding": 0,
          **st}
    y = rng.standard_normal(y_shape).astype(dtype)
    k = rng.standard_normal(k_shape).astype(dtype)
    b = rng.standard_normal(k_shape[-2] * st["groups"]).astype(dtype) if bias else None
    cfg, x_shape = _shapes.conv_transpose_config(y.shape, k.shape, None if b is None else b.shape,
                                                 **st)
    return Case("conv_transpose", label, (y, k, b), ("y", "kernel", "bias"),
                lambda y, k, b: conv_transpose(y, k, b, impl="manual", **st),
                lambda y, k, b: conv_transpose(y, k, b, impl="lax", **st),
                lambda y, k, b: _conv_transpose_manual_forward(y, k, b, cfg, st["groups"],
                                                               x_shape), quick)


def _pool_config(op, x_shape, window, st):
    return _shapes.pool_config(x_shape, window, stride=st.get("stride"),
                               padding=st.get("padding", "VALID"), fn=op,
                               dilation=st.get("dilation", 1),
                               ceil_mode=st.get("ceil_mode", False),
                               padding_mode=st.get("padding_mode", "zeros"))


def _max_pool_case(label, x_shape, window, quick=False, dtype="float64", tied_x=None, **st):
    """Unique inputs; or ``tied_x``, an input with tied maxima, where only (b) applies."""
    ties = tied_x is not None
    x = np.asarray(tied_x, dtype) if ties else _unique(_rng("max_pool", label), x_shape, dtype)
    pc = _pool_config("max_pool", x.shape, window, st)
    reason = _TIES_SPLIT if st.get("ties") == "split" else _TIES
    skip = ({k: reason for k in ("bypass_grad", "finite_diff", "adjoint")} if ties else {})
    if any(d > 1 for d in pc.win.dilation) and st.get("ties", "first") == "first":
        skip["reference_grad"] = _NO_LAX_GRAD
    return Case("max_pool", label, (x,), ("x",),
                lambda x: max_pool(x, window, impl="manual", **st),
                lambda x: max_pool(x, window, impl="lax", **st),
                lambda x: _max_pool_manual_forward(mode_pad(x, pc, "plain"), pc.win), quick,
                skip)


def _avg_pool_case(label, x_shape, window, quick=False, dtype="float64", **st):
    rng = _rng("avg_pool", label)
    x = rng.standard_normal(x_shape).astype(dtype)
    pc = _pool_config("avg_pool", x.shape, window, st)
    counted = _counted(x.shape, pc, st.get("count_include_pad", True))
    return Case("avg_pool", label, (x,), ("x",),
                lambda x: avg_pool(x, window, impl="manual", **st),
                lambda x: avg_pool(x, window, impl="lax", **st),
                lambda x: _avg_pool_manual_forward(mode_pad(x, pc, "plain"), pc.win, counted),
                quick)


def _dense_case(label, x_shape, w_shape, bias=True, quick=False, dtype="float64"):
    rng = _rng("dense", label)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[-1]).astype(dtype) if bias else None
    return Case("dense", label, (x, w, b), ("x", "w", "b"),
                lambda x, w, b: dense(x, w, b, impl="manual"),
                lambda x, w, b: dense(x, w, b, impl="lax"),
                _dense_manual_forward, quick)


def _unary_case(op, label, x, op_func, forward, quick=False, skip=None):
    """A case of an op of one array ``x``: ``op_func(x, impl=...)``, its manual ``forward``."""
    return Case(op, label, (x,), ("x",), lambda x: op_func(x, impl="manual"),
                lambda x: op_func(x, impl="lax"), forward, quick, dict(skip or {}))


def _cross_entropy_case(label, n, classes, quick=False, dtype="float64", probs=False, **kw):
    """Integer labels (passed through), or with ``probs`` probability targets (differentiated
    too); ``kw``: ``label_smoothing``, ``reduction``."""
    rng = _rng("cross_entropy", label)
    logits = (2 * rng.standard_normal((n, classes))).astype(dtype)
    labels = (rng.dirichlet(np.ones(classes), n).astype(dtype) if probs
              else rng.integers(0, classes, n).astype(np.int32))
    return Case("cross_entropy", label, (logits, labels), ("logits", "labels"),
                lambda z, y: cross_entropy(z, y, impl="manual", **kw),
                lambda z, y: cross_entropy(z, y, impl="lax", **kw),
                lambda z, y: _cross_entropy_manual_forward(z, y, **kw), quick)


def _pair_case(op, label, args, names, op_func, forward, quick=False, **kw):
    """A case of a loss of two floating arrays (prediction, target), both differentiated."""
    return Case(op, label, args, names, lambda a, b: op_func(a, b, impl="manual", **kw),
                lambda a, b: op_func(a, b, impl="lax", **kw),
                lambda a, b: forward(a, b, **kw), quick)


def _batch_norm_case(label, x_shape, train, quick=False, dtype="float64", constant=()):
    """Batch norm in one mode; ``constant``: channels set to one value (variance 0)."""
    rng = _rng("batch_norm", label)
    c = x_shape[-1]
    x = rng.standard_normal(x_shape).astype(dtype)
    for ch in constant:
        x[..., ch] = 1.5
    scale, offset = (rng.standard_normal(c).astype(dtype) for _ in range(2))
    if train:
        def forward(x, s, o):
            y, mean, var = _batch_norm_train_manual_forward(x, s, o, 1e-5)
            return y, (mean, var)
        return Case("batch_norm", label, (x, scale, offset), ("x", "scale", "offset"),
                    lambda x, s, o: batch_norm(x, s, o, train=True, impl="manual"),
                    lambda x, s, o: batch_norm(x, s, o, train=True, impl="lax"),
                    forward, quick)
    mean = rng.standard_normal(c).astype(dtype)
    var = (0.5 + rng.random(c)).astype(dtype)
    return Case("batch_norm", label, (x, scale, offset, mean, var),
                ("x", "scale", "offset", "mean", "var"),
                lambda *a: batch_norm(*a[:3], mean=a[3], var=a[4], train=False, impl="manual"),
                lambda *a: batch_norm(*a[:3], mean=a[3], var=a[4], train=False, impl="lax"),
                lambda *a: _batch_norm_eval_manual_forward(*a, 1e-5), quick)


def _layer_norm_case(label, x_shape, axes, quick=False, dtype="float64"):
    rng = _rng("layer_norm", label)
    x = rng.standard_normal(x_shape).astype(dtype)
    norm = _shapes.normalize_axes("layer_norm", axes, x_shape)
    feature = tuple(x_shape[a] for a in norm)
    scale, offset = (rng.standard_normal(feature).astype(dtype) for _ in range(2))
    return Case("layer_norm", label, (x, scale, offset), ("x", "scale", "offset"),
                lambda x, s, o: layer_norm(x, s, o, axes=axes, impl="manual"),
                lambda x, s, o: layer_norm(x, s, o, axes=axes, impl="lax"),
                lambda x, s, o: _layer_norm_manual_forward(
                    x, _on_axes(s, x, norm), _on_axes(o, x, norm), norm, 1e-5), quick)


def _dropout_case(label, x_shape, rate, quick=False, dtype="float64"):
    """Dropout with a fixed key (the mask is part of the configuration)."""
    x = _rng("dropout", label).standard_normal(x_shape).astype(dtype)
    key = jax.random.key(zlib.crc32(label.encode()))
    return Case("dropout", label, (x,), ("x",),
                lambda x: dropout(x, rate, key, impl="manual"),
                lambda x: dropout(x, rate, key, impl="lax"),
                lambda x: _dropout_manual_forward(x, _keep_mask(key, x.shape, rate), rate), quick)


# --------------------------------------------------------------------------------------------
# The configurations of each op: one case builder per op, dtype -> list of cases.


def _conv_cases(dtype: str) -> list:
    return [
        _conv_case("2D lecture: 3×3 ⋆ 2×2 + B", (1, 3, 3, 1), (2, 2, 1, 1), quick=True,
                   dtype=dtype),
        _conv_case("2D s2 SAME", (2, 7, 7, 3), (3, 3, 3, 4), stride=2, padding="SAME",
                   dtype=dtype),
        _conv_case("2D s2 VALID, remainder r=1", (2, 6, 6, 2), (3, 3, 2, 3), stride=2,
                   dtype=dtype),
        _conv_case("2D s3 VALID, odd/even, r=(1,2)", (1, 9, 8, 2), (2, 3, 2, 2), stride=3,
                   dtype=dtype),
        _conv_case("2D padding 1, dilation 2", (2, 7, 6, 2), (3, 3, 2, 3), padding=1,
                   dilation=2, dtype=dtype),
        _conv_case("2D uneven pads, s(2,1), dil (2,1)", (1, 8, 7, 2), (3, 2, 2, 2),
                   padding=((0, 2), (1, 0)), stride=(2, 1), dilation=(2, 1), quick=True,
                   dtype=dtype),
        _conv_case("2D padding 3 > window 2 (bwd crops)", (1, 4, 5, 2), (2, 2, 2, 2),
                   padding=3, dtype=dtype),
        _conv_case("2D groups 2, SAME", (2, 6, 6, 4), (3, 3, 2, 6), groups=2,
                   padding="SAME", dtype=dtype),
        _conv_case("2D depthwise ×2, s2 SAME", (2, 6, 5, 3), (3, 3, 1, 6), groups=3,
                   stride=2, padding="SAME", quick=True, dtype=dtype),
        _conv_case("2D no bias, batch 3", (3, 5, 5, 2), (3, 3, 2, 2), bias=False, dtype=dtype),
        _conv_case("2D 1×1 kernel, s2", (1, 5, 5, 3), (1, 1, 3, 2), stride=2, dtype=dtype),
        _conv_case("1D s2 SAME", (3, 11, 2), (3, 2, 4), stride=2, padding="SAME", dtype=dtype),
        _conv_case("1D dil 3, pads (2,1), groups 2", (2, 12, 4), (3, 2, 4), dilation=3,
                   padding=((2, 1),), groups=2, dtype=dtype),
        _conv_case("3D s(2,1,2), padding 1, groups 2", (1, 5, 6, 5, 4), (2, 3, 2, 2, 4),
                   stride=(2, 1, 2), padding=1, groups=2, quick=True, dtype=dtype),
        _conv_case("3D s2 SAME, batch 2", (2, 5, 4, 6, 2), (3, 3, 3, 2, 2), stride=2,
                   padding="SAME", dtype=dtype),
    ]


def _conv_transpose_cases(dtype: str) -> list:
    return [
        _conv_transpose_case("2D s2, k3 (the upsampling of a U-Net)", (2, 4, 4, 3),
                             (3, 3, 2, 3), stride=2, quick=True, dtype=dtype),
        _conv_transpose_case("2D s2 SAME: out = in · 2", (1, 3, 4, 2), (4, 4, 3, 2), stride=2,
                             padding="SAME", dtype=dtype),
        _conv_transpose_case("2D s3 padding 1, output_padding 2", (1, 3, 3, 2), (3, 3, 2, 2),
                             stride=3, padding=1, output_padding=2, dtype=dtype),
        _conv_transpose_case("2D s1 dilation 2, uneven pads, groups 2", (2, 5, 4, 4),
                             (3, 2, 1, 4), dilation=2, padding=((1, 0), (0, 2)), groups=2,
                             dtype=dtype),
        _conv_transpose_case("1D s2 dilation 3, output_padding 1", (2, 6, 3), (3, 2, 3),
                             stride=2, dilation=3, output_padding=1, quick=True, dtype=dtype),
        _conv_transpose_case("3D s(2,1,2), no bias", (1, 3, 4, 3, 2), (2, 3, 2, 2, 2),
                             stride=(2, 1, 2), bias=False, dtype=dtype),
    ]


def _max_pool_cases(dtype: str) -> list:
    rng = _rng("max_pool", "ties")
    after_relu = np.maximum(rng.standard_normal((2, 6, 6, 2)), 0)
    plateau = np.zeros((1, 5, 5, 1))
    plateau[0, 2:4, 1:3, 0] = 1.0
    return [
        _max_pool_case("2×2 s2 (lecture)", (2, 6, 6, 3), 2, quick=True, dtype=dtype),
        _max_pool_case("2×2 s2, remainder r=(1,1)", (1, 5, 7, 2), 2, dtype=dtype),
        _max_pool_case("3×3 s2 SAME, overlapping", (2, 7, 6, 2), 3, stride=2,
                       padding="SAME", quick=True, dtype=dtype),
        _max_pool_case("3×3 s1, overlapping", (1, 6, 6, 2), 3, stride=1, dtype=dtype),
        _max_pool_case("2×3 s(1,2), pads ((1,0),(0,1))", (2, 5, 6, 1), (2, 3),
                       stride=(1, 2), padding=((1, 0), (0, 1)), dtype=dtype),
        _max_pool_case("1D window 3, s2, padding 1", (3, 10, 2), (3,), stride=2,
                       padding=1, dtype=dtype),
        _max_pool_case("3D 2×2×2", (1, 4, 5, 4, 2), 2, dtype=dtype),
        _max_pool_case("ties: constant input", (1, 4, 4, 2), 2,
                       tied_x=np.ones((1, 4, 4, 2)), quick=True, dtype=dtype),
        _max_pool_case("ties: after relu (many zeros)", (2, 6, 6, 2), 2,
                       tied_x=after_relu, dtype=dtype),
        _max_pool_case("ties: 3×3 s1 over a 2×2 plateau", (1, 5, 5, 1), 3, stride=1,
                       tied_x=plateau, dtype=dtype),
        _max_pool_case("3×3 s1, dilation 2", (2, 8, 7, 2), 3, stride=1, dilation=2,
                       quick=True, dtype=dtype),
        _max_pool_case("2×2 s2, dilation (2,3), padding 1", (1, 7, 9, 2), 2, dilation=(2, 3),
                       padding=1, dtype=dtype),
        _max_pool_case("3×3 s2 ceil_mode, padding 1, r=1", (2, 8, 7, 2), 3, stride=2,
                       padding=1, ceil_mode=True, dtype=dtype),
        _max_pool_case("1D 2 s2 ceil_mode, last window half", (2, 9, 2), (2,), ceil_mode=True,
                       dtype=dtype),
        _max_pool_case("3×3 s2, padding 2 reflect", (1, 6, 7, 2), 3, stride=2, padding=2,
                       padding_mode="reflect", dtype=dtype),
        _max_pool_case("2×2 ceil, pads ((1,0),(0,1)) circular", (1, 5, 6, 2), 2,
                       padding=((1, 0), (0, 1)), padding_mode="circular", ceil_mode=True,
                       dtype=dtype),
        _max_pool_case("3×3 s1, padding 1 replicate", (1, 5, 6, 2), 3, stride=1, padding=1,
                       padding_mode="replicate", dtype=dtype),
        _max_pool_case("7×7 s1 SAME (tap loop)", (1, 9, 8, 2), 7, stride=1, padding="SAME",
                       dtype=dtype),
        _max_pool_case("3D 3×3×3 s2, padding 1 (tap loop)", (1, 5, 6, 5, 2), 3, stride=2,
                       padding=1, dtype=dtype),
        _max_pool_case("ties=split, 3×3 s2 SAME", (2, 7, 6, 2), 3, stride=2, padding="SAME",
                       ties="split", dtype=dtype),
        _max_pool_case("ties=split: after relu, 3×3 s1", (2, 6, 6, 2), 3, stride=1,
                       tied_x=after_relu, ties="split", quick=True, dtype=dtype),
        _max_pool_case("ties=split: constant, 2×2", (1, 4, 4, 2), 2,
                       tied_x=np.ones((1, 4, 4, 2)), ties="split", dtype=dtype),
    ]


def _avg_pool_cases(dtype: str) -> list:
    return [
        _avg_pool_case("2×2 s2 (lecture)", (2, 6, 6, 3), 2, quick=True, dtype=dtype),
        _avg_pool_case("3×3 s1, overlapping", (1, 6, 6, 2), 3, stride=1, dtype=dtype),
        _avg_pool_case("3×3 s2 SAME, count_include_pad=False", (2, 7, 6, 2), 3, stride=2,
                       padding="SAME", count_include_pad=False, quick=True, dtype=dtype),
        _avg_pool_case("3×3 s2 SAME, count_include_pad=True", (2, 7, 6, 2), 3, stride=2,
                       padding="SAME", dtype=dtype),
        _avg_pool_case("3×3 s2, pads ((1,0),(0,2)), exclude pad", (1, 5, 7, 2), 3,
                       stride=2, padding=((1, 0), (0, 2)), count_include_pad=False,
                       dtype=dtype),
        _avg_pool_case("1D window 4, s3, remainder r=1", (2, 11, 2), (4,), stride=3,
                       dtype=dtype),
        _avg_pool_case("3D 2×2×2, padding 1, exclude pad", (1, 4, 5, 3, 2), 2,
                       padding=1, count_include_pad=False, dtype=dtype),
        _avg_pool_case("3×3 s1, dilation 2, padding 2, exclude pad", (1, 7, 8, 2), 3,
                       stride=1, dilation=2, padding=2, count_include_pad=False, dtype=dtype),
        _avg_pool_case("3×3 s2 ceil_mode, padding 1, include pad", (2, 8, 7, 2), 3, stride=2,
                       padding=1, ceil_mode=True, quick=True, dtype=dtype),
        _avg_pool_case("3×3 s2 ceil_mode, padding 1, exclude pad", (2, 8, 7, 2), 3, stride=2,
                       padding=1, ceil_mode=True, count_include_pad=False, dtype=dtype),
        _avg_pool_case("2×2 s2, padding 1 reflect", (1, 5, 6, 2), 2, padding=1,
                       padding_mode="reflect", dtype=dtype),
        _avg_pool_case("5×5 s2, padding 2 circular (tap loop)", (1, 7, 6, 2), 5, stride=2,
                       padding=2, padding_mode="circular", dtype=dtype),
        _avg_pool_case("3D 3×3×3 s1, padding 1, exclude pad (tap loop)", (1, 4, 5, 4, 2), 3,
                       stride=1, padding=1, count_include_pad=False, dtype=dtype),
    ]


def _pad_cases(dtype: str) -> list:
    rng = _rng("pad", "inputs")
    x2, x1, x3 = (rng.standard_normal(s).astype(dtype)
                  for s in ((2, 4, 5, 3), (2, 6, 2), (1, 3, 4, 3, 2)))
    pads2 = ((2, 1), (0, 3))

    def case(label, x, padding, mode, quick=False):
        return _unary_case("pad", label, x, partial(pad, padding=padding, mode=mode),
                           partial(_pad_manual_forward, pads=_shapes.pad_config(
                               "pad", x.shape, padding, mode), mode=mode), quick)

    return [
        case("2D reflect ((3,1),(2,4)), the largest", x2, ((3, 1), (2, 4)), "reflect",
             quick=True),
        case("2D replicate ((2,1),(0,3))", x2, pads2, "replicate"),
        case("2D circular ((2,1),(0,3))", x2, pads2, "circular"),
        case("2D zeros ((2,1),(0,3))", x2, pads2, "zeros"),
        case("1D reflect (5,5), the largest", x1, 5, "reflect"),
        case("1D circular (6,6), the largest", x1, 6, "circular"),
        case("3D reflect 1, corners reflected twice", x3, 1, "reflect"),
        case("3D circular ((1,2),(3,0),(0,2))", x3, ((1, 2), (3, 0), (0, 2)), "circular"),
    ]


def _global_pool_cases(op: str, dtype: str) -> list:
    rng = _rng(op, "inputs")
    func, forward = {"global_avg_pool": (global_avg_pool, _global_avg_pool_manual_forward),
                     "global_max_pool": (global_max_pool, _global_max_pool_manual_forward)}[op]
    x2, x3 = _unique(rng, (2, 5, 6, 3), dtype), _unique(rng, (1, 3, 4, 5, 2), dtype)
    cases = [_unary_case(op, "2D (2,5,6,3)", x2, func, forward, quick=True),
             _unary_case(op, "3D (1,3,4,5,2)", x3, func, forward),
             _unary_case(op, "1D (3,7,2)", _unique(rng, (3, 7, 2), dtype), func, forward)]
    if op == "global_max_pool":
        after_relu = np.maximum(rng.standard_normal((2, 4, 4, 2)), 0).astype(dtype)
        split = partial(global_max_pool, ties="split")
        cases += [
            _unary_case(op, "ties=split, unique values", x2, split, forward),
            _unary_case(op, "ties: after relu", after_relu, func, forward,
                        skip={k: _TIES for k in ("bypass_grad", "finite_diff", "adjoint")}),
            _unary_case(op, "ties=split: after relu", after_relu, split, forward,
                        skip={k: _TIES_SPLIT for k in ("bypass_grad", "finite_diff",
                                                       "adjoint")}),
        ]
    return cases


def _adaptive_cases(op: str, dtype: str) -> list:
    rng = _rng(op, "inputs")
    func, forward = {
        "adaptive_avg_pool": (adaptive_avg_pool, _adaptive_avg_pool_manual_forward),
        "adaptive_max_pool": (adaptive_max_pool, _adaptive_max_pool_manual_forward)}[op]

    def case(label, x, size, quick=False, skip=None, **kw):
        windows = _shapes.adaptive_windows(op, x.shape, size)
        return _unary_case(op, label, x, partial(func, output_size=size, **kw),
                           partial(forward, windows=windows), quick, skip)

    x = _unique(rng, (2, 7, 9, 3), dtype)
    cases = [
        case("(7,9) -> (3,4), overlapping windows", x, (3, 4), quick=True),
        case("(7,9) -> (5,2), sizes 2-3 and 5", x, (5, 2)),
        case("(7,9) -> (10,12), larger than the input", x, (10, 12)),
        case("(7,9) -> (1,1), global", x, 1),
        case("1D 7 -> 4", _unique(rng, (2, 7, 2), dtype), 4),
        case("3D (5,4,6) -> (2,3,4)", _unique(rng, (1, 5, 4, 6, 2), dtype), (2, 3, 4)),
    ]
    if op == "adaptive_max_pool":
        after_relu = np.maximum(rng.standard_normal((2, 7, 6, 2)), 0).astype(dtype)
        cases += [
            case("ties=split, (7,9) -> (3,4)", x, (3, 4), ties="split"),
            case("ties: after relu, (7,6) -> (3,4)", after_relu, (3, 4),
                 skip={k: _TIES for k in ("bypass_grad", "finite_diff", "adjoint")}),
            case("ties=split: after relu, (7,6) -> (3,4)", after_relu, (3, 4), ties="split",
                 skip={k: _TIES_SPLIT for k in ("bypass_grad", "finite_diff", "adjoint")}),
        ]
    return cases


def _dense_cases(dtype: str) -> list:
    return [
        _dense_case("x(4,5)·W(5,3) + b", (4, 5), (5, 3), quick=True, dtype=dtype),
        _dense_case("batch dims x(2,3,5)", (2, 3, 5), (5, 4), dtype=dtype),
        _dense_case("no bias, square W(6,6)", (3, 6), (6, 6), bias=False, dtype=dtype),
    ]


def _relu_cases(dtype: str) -> list:
    rng = _rng("relu", "inputs")
    away = lambda s: (np.sign(z := rng.standard_normal(s)) * (0.05 + np.abs(z))).astype(dtype)
    zeros = np.array([[-1.0, 0.0, 2.0, 0.0], [0.0, 3.0, -2.0, 0.0]], dtype)
    return [
        _unary_case("relu", "x(3,7), |x| >= 0.05", away((3, 7)), relu,
                    _relu_manual_forward, quick=True),
        _unary_case("relu", "x(2,4,4,3)", away((2, 4, 4, 3)), relu, _relu_manual_forward),
        _unary_case("relu", "ties: x = 0 exactly", zeros, relu, _relu_manual_forward,
                    skip={k: _RELU_ZERO for k in ("bypass_grad", "finite_diff", "adjoint")}),
    ]


def _flatten_cases(dtype: str) -> list:
    rng = _rng("flatten", "inputs")
    return [
        _unary_case("flatten", "x(2,3,4,2)", rng.standard_normal((2, 3, 4, 2)).astype(dtype),
                    flatten, _flatten_manual_forward, quick=True),
        _unary_case("flatten", "x(3,5), already flat", rng.standard_normal((3, 5)).astype(dtype),
                    flatten, _flatten_manual_forward),
    ]


def _log_softmax_cases(dtype: str) -> list:
    rng = _rng("log_softmax", "inputs")
    return [
        _unary_case("log_softmax", "x(4,10)", (2 * rng.standard_normal((4, 10))).astype(dtype),
                    log_softmax, _log_softmax_manual_forward, quick=True),
        _unary_case("log_softmax", "x(2,3,5)", rng.standard_normal((2, 3, 5)).astype(dtype),
                    log_softmax, _log_softmax_manual_forward),
        _unary_case("log_softmax", "x(4,3,2), axis 0",
                    rng.standard_normal((4, 3, 2)).astype(dtype),
                    lambda x, impl: log_softmax(x, 0, impl=impl),
                    lambda x: _log_softmax_manual_forward(x, 0)),
        _unary_case("log_softmax", "large logits x + 100",
                    (100 + rng.standard_normal((3, 6))).astype(dtype), log_softmax,
                    _log_softmax_manual_forward),
    ]


def _leaky_relu_cases(dtype: str) -> list:
    rng = _rng("leaky_relu", "inputs")
    away = lambda s: (np.sign(z := rng.standard_normal(s)) * (0.05 + np.abs(z))).astype(dtype)
    zeros = np.array([[-1.0, 0.0, 2.0, 0.0], [0.0, 3.0, -2.0, 0.0]], dtype)
    op = lambda slope: (lambda x, impl: leaky_relu(x, slope, impl=impl))
    fwd = lambda slope: (lambda x: _leaky_relu_manual_forward(x, slope))
    return [
        _unary_case("leaky_relu", "x(3,7), slope 0.01, |x| >= 0.05", away((3, 7)), op(0.01),
                    fwd(0.01), quick=True),
        _unary_case("leaky_relu", "x(2,4,4,3), slope 0.2", away((2, 4, 4, 3)), op(0.2),
                    fwd(0.2)),
        _unary_case("leaky_relu", "kink: x = 0 exactly, slope 0.1", zeros, op(0.1), fwd(0.1),
                    skip={"finite_diff": _LEAKY_ZERO}),
    ]


def _smooth_unary_cases(op, op_func, forward, dtype) -> list:
    """A small and a 4-D input of unit scale, and one out to |x| = 100 (saturation)."""
    rng = _rng(op, "inputs")
    wide = np.concatenate([[-100.0, -40.0, -15.0, 15.0, 40.0, 100.0], rng.standard_normal(6)])
    return [
        _unary_case(op, "x(3,7)", (2 * rng.standard_normal((3, 7))).astype(dtype), op_func,
                    forward, quick=True),
        _unary_case(op, "x(2,4,4,3)", rng.standard_normal((2, 4, 4, 3)).astype(dtype),
                    op_func, forward),
        _unary_case(op, "|x| up to 100", wide.reshape(2, 6).astype(dtype), op_func, forward),
    ]


def _sigmoid_cases(dtype: str) -> list:
    return _smooth_unary_cases("sigmoid", sigmoid, _sigmoid_manual_forward, dtype)


def _tanh_cases(dtype: str) -> list:
    return _smooth_unary_cases("tanh", tanh, _tanh_manual_forward, dtype)


def _gelu_cases(dtype: str) -> list:
    exact = _smooth_unary_cases("gelu", gelu, lambda x: _gelu_manual_forward(x, False), dtype)
    rng = _rng("gelu", "approximate")
    approx = lambda x, impl: gelu(x, approximate=True, impl=impl)
    return [dataclasses.replace(c, label=f"exact, {c.label}") for c in exact] + [
        _unary_case("gelu", "approximate, x(3,7)",
                    (2 * rng.standard_normal((3, 7))).astype(dtype), approx,
                    lambda x: _gelu_manual_forward(x, True), quick=True),
        _unary_case("gelu", "approximate, |x| up to 100",
                    np.array([[-100.0, -20.0, -3.0, 3.0, 20.0, 100.0]], dtype), approx,
                    lambda x: _gelu_manual_forward(x, True)),
    ]


def _softmax_cases(dtype: str) -> list:
    rng = _rng("softmax", "inputs")
    along = lambda axis: (lambda x, impl: softmax(x, axis, impl=impl))
    fwd = lambda axis: (lambda x: _softmax_manual_forward(x, axis))
    return [
        _unary_case("softmax", "x(4,10)", (2 * rng.standard_normal((4, 10))).astype(dtype),
                    along(-1), fwd(-1), quick=True),
        _unary_case("softmax", "x(2,3,5), axis 1", rng.standard_normal((2, 3, 5)).astype(dtype),
                    along(1), fwd(1)),
        _unary_case("softmax", "large logits x + 100",
                    (100 + rng.standard_normal((3, 6))).astype(dtype), along(-1), fwd(-1)),
    ]


def _cross_entropy_cases(dtype: str) -> list:
    return [
        _cross_entropy_case("logits(8,10)", 8, 10, quick=True, dtype=dtype),
        _cross_entropy_case("logits(1,3), batch 1", 1, 3, dtype=dtype),
        _cross_entropy_case("smoothing 0.1, sum", 6, 5, dtype=dtype, label_smoothing=0.1,
                            reduction="sum"),
        _cross_entropy_case("smoothing 0.2, none", 5, 4, dtype=dtype, label_smoothing=0.2,
                            reduction="none"),
        _cross_entropy_case("probability targets, smoothing 0.1", 6, 4, quick=True,
                            dtype=dtype, probs=True, label_smoothing=0.1),
        _cross_entropy_case("probability targets, none", 3, 5, dtype=dtype, probs=True,
                            reduction="none"),
    ]


def _bce_cases(dtype: str) -> list:
    rng = _rng("binary_cross_entropy_with_logits", "inputs")
    op, name = "binary_cross_entropy_with_logits", ("logits", "targets")
    f, fwd = binary_cross_entropy_with_logits, _bce_manual_forward
    x = lambda s, scale=3.0: (scale * rng.standard_normal(s)).astype(dtype)
    t = lambda s: rng.uniform(size=s).astype(dtype)
    return [
        _pair_case(op, "x(6,4), mean", (x((6, 4)), t((6, 4))), name, f, fwd, quick=True),
        _pair_case(op, "x(2,3,3,2), none", (x((2, 3, 3, 2)), t((2, 3, 3, 2))), name, f, fwd,
                   reduction="none"),
        _pair_case(op, "|x| up to 100, 0/1 targets, sum",
                   (np.array([[-100.0, -30.0, 30.0, 100.0]], dtype),
                    np.array([[0.0, 1.0, 0.0, 1.0]], dtype)), name, f, fwd, reduction="sum"),
    ]


def _mse_cases(dtype: str) -> list:
    rng = _rng("mse", "inputs")
    name = ("pred", "target")
    x = lambda s: rng.standard_normal(s).astype(dtype)
    return [
        _pair_case("mse", "x(5,3), mean", (x((5, 3)), x((5, 3))), name, mse,
                   _mse_manual_forward, quick=True),
        _pair_case("mse", "x(2,4,4,2), none", (x((2, 4, 4, 2)), x((2, 4, 4, 2))), name, mse,
                   _mse_manual_forward, reduction="none"),
        _pair_case("mse", "x(7,), sum", (x((7,)), x((7,))), name, mse, _mse_manual_forward,
                   reduction="sum"),
    ]


def _batch_norm_cases(dtype: str) -> list:
    return [
        _batch_norm_case("train: x(2,5) features, batch 2", (2, 5), True, quick=True,
                         dtype=dtype),
        _batch_norm_case("train: x(1,5), batch 1: M = 1, variance 0", (1, 5), True,
                         dtype=dtype),
        _batch_norm_case("train: x(1,1,1,3), batch 1 of 1×1", (1, 1, 1, 3), True, dtype=dtype),
        _batch_norm_case("train: x(2,4,3,3) images", (2, 4, 3, 3), True, quick=True,
                         dtype=dtype),
        _batch_norm_case("train: x(2,4,3,3), channel 1 constant", (2, 4, 3, 3), True,
                         constant=(1,), dtype=dtype),
        _batch_norm_case("train: x(2,6,2), 1-D", (2, 6, 2), True, dtype=dtype),
        _batch_norm_case("eval: x(2,4,3,3) images", (2, 4, 3, 3), False, quick=True,
                         dtype=dtype),
        _batch_norm_case("eval: x(1,5), batch 1", (1, 5), False, dtype=dtype),
    ]


def _layer_norm_cases(dtype: str) -> list:
    return [
        _layer_norm_case("x(3,6), last axis", (3, 6), -1, quick=True, dtype=dtype),
        _layer_norm_case("x(2,4,3,5), axes (1,2,3)", (2, 4, 3, 5), (1, 2, 3), dtype=dtype),
        _layer_norm_case("x(2,4,3,5), axes (1,3)", (2, 4, 3, 5), (1, 3), dtype=dtype),
    ]


def _dropout_cases(dtype: str) -> list:
    return [
        _dropout_case("x(4,6), rate 0.3", (4, 6), 0.3, quick=True, dtype=dtype),
        _dropout_case("x(2,5,5,3), rate 0.5", (2, 5, 5, 3), 0.5, dtype=dtype),
    ]


# The ops of the grid, in report order: name (for --op and the report) -> case builder.
OPS: dict[str, Callable[[str], list]] = {
    "conv": _conv_cases,
    "conv_transpose": _conv_transpose_cases,
    "max_pool": _max_pool_cases,
    "avg_pool": _avg_pool_cases,
    "global_max_pool": partial(_global_pool_cases, "global_max_pool"),
    "global_avg_pool": partial(_global_pool_cases, "global_avg_pool"),
    "adaptive_max_pool": partial(_adaptive_cases, "adaptive_max_pool"),
    "adaptive_avg_pool": partial(_adaptive_cases, "adaptive_avg_pool"),
    "pad": _pad_cases,
    "dense": _dense_cases,
    "relu": _relu_cases,
    "leaky_relu": _leaky_relu_cases,
    "sigmoid": _sigmoid_cases,
    "tanh": _tanh_cases,
    "gelu": _gelu_cases,
    "flatten": _flatten_cases,
    "softmax": _softmax_cases,
    "log_softmax": _log_softmax_cases,
    "cross_entropy": _cross_entropy_cases,
    "binary_cross_entropy_with_logits": _bce_cases,
    "mse": _mse_cases,
    "batch_norm": _batch_norm_cases,
    "layer_norm": _layer_norm_cases,
    "dropout": _dropout_cases,
}
