"""Layers as ``(init, apply)`` pairs, and ``serial`` to chain them (the style of jax's stax).

Every constructor returns a :class:`Layer`, a named pair that unpacks like stax's::

    init, apply = serial(Conv(6, 5, padding="SAME"), Relu, MaxPool(2), Flatten, Dense(10))
    out_shape, params = init(jax.random.key(0), (1, 28, 28, 1))
    logits = apply(params, x)                      # x: (N, 28, 28, 1) -> (N, 10)

- ``init(key, input_shape, *, before_relu=False, with_state=False) -> (output_shape, params)``,
  or ``(output_shape, params, state)`` with ``with_state=True``. ``input_shape`` is a full
  shape, batch first, ``(N, *spatial, C_in)``; ``N`` may be ``-1`` (any batch size, as in
  stax). The output shape comes from ``jax.eval_shape`` on the op itself, so it follows the
  op's output-size rule (:mod:`jaxcnn._shapes`) and the op's own shape errors surface at
  ``init``.
- ``apply(params, x, *, impl="manual", train=False, rng=None, state=None) -> y``, or
  ``(y, new_state)`` when ``state`` is given. ``impl`` picks the op implementation:
  ``"manual"`` (the hand-derived gradients, the default here) or ``"lax"``. ``train`` (a
  Python bool) switches batch norm to batch statistics and dropout on; ``rng`` is the PRNG key
  dropout draws its mask from (needed only in train mode). Other keyword arguments are
  ignored, as stax's layers do, so that jaxcnn layers work inside
  ``jax.example_libraries.stax.serial`` (which passes ``rng=``); there, ``train=True`` must be
  passed to ``apply`` by name.

Three pytrees, kept apart:

- ``params``: what the optimizer updates, and nothing else (plain dicts and lists that optax,
  ``jax.tree_util`` and ``numpy.savez`` take as they are). ``Conv`` has ``{"kernel": (*window,
  C_in // groups, C_out), "bias": (C_out,)}``, ``Dense`` has ``{"w": (D_in, D_out), "b":
  (D_out,)}`` (the op's argument names), ``BatchNorm`` and ``LayerNorm`` ``{"scale",
  "offset"}``, parameterless layers ``{}``, ``serial`` and ``parallel`` a list with one entry
  per layer.
- ``state``: what a layer updates itself during training and does not learn by gradient:
  ``BatchNorm``'s running averages ``{"mean": (C,), "var": (C,)}``; ``{}`` for every other
  layer; ``serial`` and ``parallel`` a list with one entry per layer, like ``params``.
  ``apply`` is pure: it returns the new state, it never changes the old one.
- the PRNG key ``rng``: passed per call; ``serial`` and ``parallel`` give their ``i``-th layer
  ``jax.random.fold_in(rng, i)``.

Training code calls :func:`apply_model`, the same for models with and without state::

    out_shape, params, state = init(key, (-1, 28, 28, 1), with_state=True)
    logits, state = apply_model(apply, params, state, x, train=True, rng=step_key)   # step
    logits, _ = apply_model(apply, params, state, x, train=False)                    # eval

A residual block in a few lines (``FanOut`` copies the input to two branches, ``parallel``
applies one layer to each, ``FanInSum`` adds them; the shortcut is a strided 1×1 projection
where the shape changes)::

    def residual(channels, stride=1):
        main = serial(Conv(channels, 3, stride=stride, padding="SAME", use_bias=False),
                      BatchNorm(), Relu,
                      Conv(channels, 3, padding="SAME", use_bias=False), BatchNorm())
        shortcut = Identity if stride == 1 else serial(
            Conv(channels, 1, stride=stride, use_bias=False), BatchNorm())
        return serial(FanOut(2), parallel(main, shortcut), FanInSum, Relu)

Initialisation. Biases start at zero. Weights are drawn from a normal distribution with
standard deviation ``sqrt(gain / fan_in)``, where ``fan_in`` is the number of inputs of one
output unit (``prod(window) * C_in // groups`` for a convolution, ``D_in`` for dense):

- **He** (``gain = 2``, ``init="he"``) keeps the activations' variance constant through a
  ReLU, which zeroes half of its input;
- **LeCun** (``gain = 1``, ``init="lecun"``) keeps it constant through a linear layer.

The default ``init=None`` picks for you: inside :func:`serial`, a ``Conv`` or ``Dense``
directly followed by :data:`Relu` gets He, every other one LeCun (a layer used on its own
gets LeCun). ``serial`` tells the layer by calling its ``init`` with ``before_relu=True``.
Normalization layers start as the identity map: ``scale`` 1, ``offset`` 0, running mean 0 and
running variance 1.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _shapes
from .activations import gelu, leaky_relu, relu, sigmoid, softmax, tanh
from .convolution import conv, conv_transpose
from .linear import dense, flatten
from .normalization import batch_norm, layer_norm
from .adaptive_pooling import (adaptive_avg_pool, adaptive_max_pool, global_avg_pool,
                               global_max_pool)
from .padding import pad
from .pooling import avg_pool, max_pool
from .regularization import dropout

INITS = ("he", "lecun")
_GAINS = {"he": 2.0, "lecun": 1.0}


class Layer(NamedTuple):
    """A layer: ``init(key, input_shape, *, before_relu=False, with_state=False)`` and
    ``apply(params, x, *, impl="manual", train=False, rng=None, state=None)``, as described in
    the module docstring. Unpacks as ``init, apply = layer``."""

    init: Callable[..., tuple]
    apply: Callable[..., Any]


def _make_layer(fn: str, init_fn, apply_fn) -> Layer:
    """A :class:`Layer` from its two parts, both with every argument explicit:

    - ``init_fn(key, input_shape, before_relu) -> (output_shape, params, state)``;
    - ``apply_fn(params, state, x, impl, train, rng) -> (y, new_state)``, where ``state`` is
      None when the caller keeps no state (the layer then does without: batch norm uses the
      batch statistics) and ``new_state`` is then ignored.

    The public ``init`` drops the state unless ``with_state=True``; the public ``apply``
    returns ``y`` alone when it was given no state.
    """

    def init(key, input_shape, *, before_relu=False, with_state=False):
        output_shape, params, state = init_fn(key, input_shape, before_relu)
        if _shapes.check_bool(fn, "with_state", with_state):
            return output_shape, params, state
        return output_shape, params

    def apply(params, x, *, impl="manual", train=False, rng=None, state=None, **ignored):
        train = _shapes.check_bool(fn, "train", train)
        y, new_state = apply_fn(params, state, x, impl, train, rng)
        return y if state is None else (y, new_state)

    return Layer(init, apply)


def _stateless(fn: str, init_fn, apply_fn) -> Layer:
    """A :class:`Layer` without state from ``init_fn(key, input_shape, *, before_relu) ->
    (output_shape, params)`` and ``apply_fn(params, x, *, impl) -> y``: its state is ``{}``,
    passed through unchanged, and ``train`` and ``rng`` do not concern it."""
    return _make_layer(
        fn,
        lambda key, shape, before_relu: (*init_fn(key, shape, before_relu=before_relu), {}),
        lambda params, state, x, impl, train, rng: (apply_fn(params, x, impl=impl), state))


# --------------------------------------------------------------------------------------------
# Layers with weights.


def Conv(out_channels, window, *, stride=1, padding="VALID", dilation=1, groups=1,
         use_bias=True, padding_mode="zeros", init=None):
    """Convolution layer: ``(N, *spatial, C_in) -> (N, *out_spatial, out_channels)``.

    Args:
      out_channels: ``C_out``, an int >= 1 (divisible by ``groups``).
      window: the kernel's spatial size. An int means a square 2-D window (images); a tuple
        of 1, 2 or 3 ints gives one size per spatial dim and so the number of spatial dims:
        ``(5,)`` for a 1-D, ``(3, 3, 3)`` for a 3-D convolution. ``init`` refuses an input of
        another rank (e.g. ``(28, 28, 1)`` without the batch axis for a 2-D window).
      stride, padding, dilation, groups, padding_mode: as for :func:`jaxcnn.conv`.
      use_bias: False leaves the bias out (e.g. before a ``BatchNorm``, whose offset does its
        job and which would cancel it: its gradient is zero in train mode).
      init: ``"he"``, ``"lecun"`` or None (He when :func:`serial` finds a ``Relu`` right after
        this layer, LeCun otherwise); see the module docstring.

    Params: ``{"kernel": (*window, C_in // groups, out_channels), "bias": (out_channels,)}``
    (no ``"bias"`` with ``use_bias=False``).
    """
    fn = "Conv"
    padding_mode = _shapes.check_choice(fn, "padding_mode", padding_mode, _shapes.PADDING_MODES)

    def kernel_shape(win, c_in, out, groups):
        if c_in % groups:
            raise ValueError(
                f"{fn}: groups ({groups}) must divide the input channels "
                f"(input_shape[-1]={c_in})"
            )
        return (*win, c_in // groups, out)

    return _conv_layer(fn, conv, kernel_shape, out_channels, window, stride=stride,
                       padding=padding, dilation=dilation, groups=groups, use_bias=use_bias,
                       init=init, padding_mode=padding_mode)


def ConvTranspose(out_channels, window, *, stride=1, padding="VALID", dilation=1, groups=1,
                  output_padding=0, use_bias=True, init=None):
    """Transposed convolution layer: ``(N, *spatial, C_in) -> (N, *out_spatial,
    out_channels)``, :func:`jaxcnn.conv_transpose` (the adjoint of the convolution with the
    same ``stride``, ``padding``, ``dilation`` and ``groups``: ``"SAME"`` multiplies each
    spatial size by the stride; PyTorch's ``ConvTranspose`` with its ``padding``).

    Args:
      out_channels: ``C_out``, an int >= 1 (divisible by ``groups``).
      window, stride, padding, dilation, groups, use_bias, init: as for :func:`Conv`.
      output_padding: as for :func:`jaxcnn.conv_transpose`.

    Params: ``{"kernel": (*window, out_channels // groups, C_in), "bias": (out_channels,)}``:
    the kernel of the convolution that maps the result back to the input. He / LeCun
    initialisation use ``fan_in = prod(window) · out_channels / groups`` (PyTorch's count for
    its transposed convolutions).
    """
    return _conv_layer("ConvTranspose", conv_transpose,
                       lambda win, c_in, out, groups: (*win, out // groups, c_in),
                       out_channels, window, stride=stride, padding=padding, dilation=dilation,
                       groups=groups, use_bias=use_bias, init=init,
                       output_padding=output_padding)


def _conv_layer(fn, op, kernel_shape, out_channels, window, *, stride, padding, dilation,
                groups, use_bias, init, **more):
    """A layer computing ``op(x, kernel, bias, **options)`` (``conv`` or ``conv_transpose``)
    with ``kernel: kernel_shape(window, C_in, out_channels, groups)``: the checks both layers
    share, then He / LeCun initialisation with ``fan_in = prod(kernel.shape[:-1])``."""
    out_channels = _shapes.check_int(fn, "out_channels", out_channels, minimum=1)
    window_given = window
    window = _int_or_ints(fn, "window", window)
    nd = len(window) if isinstance(window_given, (list, tuple)) else 2
    _int_or_ints(fn, "stride", stride)
    _int_or_ints(fn, "dilation", dilation)
    _check_spatial_dims_agree(fn, nd, window_given, stride=stride, dilation=dilation,
                              padding=padding)
    groups = _shapes.check_int(fn, "groups", groups, minimum=1)
    _check_padding(fn, padding)
    use_bias = _shapes.check_bool(fn, "use_bias", use_bias)
    _check_init(fn, init)
    if out_channels % groups:
        raise ValueError(f"{fn}: groups ({groups}) must divide out_channels ({out_channels})")
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, **more)

    def init_fn(key, input_shape, *, before_relu=False):
        input_shape = _check_input_shape(fn, input_shape)
        _check_spatial_rank(fn, input_shape, nd, window_given)
        win = window * nd if len(window) == 1 else window
        k_shape = kernel_shape(win, input_shape[-1], out_channels, groups)
        output_shape = _eval_shape(lambda x, k: op(x, k, **options), input_shape, k_shape)
        kernel = _normal(key, k_shape, fan_in=math.prod(k_shape[:-1]),
                         scheme=_scheme(init, before_relu))
        params = {"kernel": kernel}
        if use_bias:
            params["bias"] = _zeros(out_channels)
        return output_shape, params

    def apply_fn(params, x, *, impl="manual"):
        return op(x, params["kernel"], params.get("bias"), impl=impl, **options)

    return _stateless(fn, init_fn, apply_fn)


def Dense(out_features, *, init=None):
    """Fully connected layer ``z = x · W + b``: ``(N, D_in) -> (N, out_features)``.

    Args:
      out_features: ``D_out``, an int >= 1.
      init: ``"he"``, ``"lecun"`` or None (He before a ``Relu`` in :func:`serial`, else LeCun).

    Params: ``{"w": (D_in, out_features), "b": (out_features,)}``.
    """
    fn = "Dense"
    out_features = _shapes.check_int(fn, "out_features", out_features, minimum=1)
    _check_init(fn, init)

    def init_fn(key, input_shape, *, before_relu=False):
        input_shape = _check_input_shape(fn, input_shape, min_rank=2)
        w_shape = (input_shape[-1], out_features)
        output_shape = _eval_shape(lambda x, w: dense(x, w), input_shape, w_shape)
        w = _normal(key, w_shape, fan_in=w_shape[0], scheme=_scheme(init, before_relu))
        return output_shape, {"w": w, "b": _zeros(out_features)}

    def apply_fn(params, x, *, impl="manual"):
        return dense(x, params["w"], params["b"], impl=impl)

    return _stateless(fn, init_fn, apply_fn)


# --------------------------------------------------------------------------------------------
# Layers with state or randomness: normalization and dropout.


def BatchNorm(*, momentum=0.9, eps=1e-5):
    """Batch normalization (:func:`jaxcnn.batch_norm`) per channel, with running averages:
    ``(N, *spatial, C) -> (N, *spatial, C)``.

    Args:
      momentum: in ``[0, 1]``: how much of the old running average each train step keeps,
        ``new = momentum · old + (1 − momentum) · batch`` (Flax's convention; PyTorch's
        ``momentum=0.1`` is this ``0.9``).
      eps: ``ε > 0``, added to the variance.

    Params: ``{"scale": (C,), "offset": (C,)}`` (ones, zeros). State: ``{"mean": (C,),
    "var": (C,)}`` (zeros, ones).

    ``apply`` by mode:

    - ``train=True`` with ``state``: normalizes with the batch statistics and returns the
      running averages moved towards them. The running variance averages the **biased**
      batch variance (divided by ``M = N · prod(spatial)``, the one the batch was normalized
      with), as Flax does; PyTorch averages the unbiased one (divided by ``M − 1``), larger by
      ``M / (M − 1)``: negligible for conv layers, whose ``M`` is in the thousands.
    - ``train=False`` with ``state``: normalizes with the running averages; the state comes
      back unchanged.
    - without ``state`` (for instance inside ``stax.serial``): normalizes with the batch
      statistics in either mode, as ``stax.BatchNorm`` does.
    """
    fn = "BatchNorm"
    momentum = _shapes.check_float(fn, "momentum", momentum, minimum=0.0, maximum=1.0)
    eps = _shapes.check_float(fn, "eps", eps, minimum=0.0, exclusive_minimum=True)

    def init_fn(key, input_shape, before_relu):
        input_shape = _check_input_shape(fn, input_shape, min_rank=2)
        c = input_shape[-1]
        params = {"scale": _ones(c), "offset": _zeros(c)}
        return input_shape, params, {"mean": _zeros(c), "var": _ones(c)}

    def apply_fn(params, state, x, impl, train, rng):
        scale, offset = params["scale"], params["offset"]
        if state is None:
            y, _ = batch_norm(x, scale, offset, train=True, eps=eps, impl=impl)
            return y, None
        _check_state(fn, state, ("mean", "var"))
        if not train:
            y = batch_norm(x, scale, offset, mean=state["mean"], var=state["var"], train=False,
                           eps=eps, impl=impl)
            return y, state
        y, batch_stats = batch_norm(x, scale, offset, train=True, eps=eps, impl=impl)
        batch = dict(zip(("mean", "var"), lax.stop_gradient(batch_stats)))
        new_state = {k: (momentum * state[k] + (1 - momentum) * batch[k]).astype(state[k].dtype)
                     for k in ("mean", "var")}
        return y, new_state

    return _make_layer(fn, init_fn, apply_fn)


def LayerNorm(*, axes=-1, eps=1e-5):
    """Layer normalization (:func:`jaxcnn.layer_norm`) of each example over ``axes``.

    ``axes``: an int or a tuple of ints, counted in the full input shape ``(N, ...)``; the batch
    axis 0 cannot be one of them. Default: the last (channels or features). ``eps > 0``.

    Params: ``{"scale", "offset"}`` of the input's shape on ``axes`` (ones, zeros); no state.
    The same in train and eval mode.
    """
    fn = "LayerNorm"
    eps = _shapes.check_float(fn, "eps", eps, minimum=0.0, exclusive_minimum=True)
    raw = tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)
    if not raw or not all(map(_shapes.is_int, raw)):
        raise TypeError(f"{fn}: axes must be an int or a non-empty tuple of ints; got {axes!r}")

    def init_fn(key, input_shape, *, before_relu=False):
        input_shape = _check_input_shape(fn, input_shape, min_rank=2)
        norm = _shapes.normalize_axes(fn, axes, input_shape, name="the input")
        if 0 in norm:
            raise ValueError(
                f"{fn}: axes must not include the batch axis 0 (the params would depend on the "
                f"batch size); got {axes!r} for input_shape {input_shape}"
            )
        feature = tuple(input_shape[a] for a in norm)
        return input_shape, {"scale": _ones(feature), "offset": _zeros(feature)}

    def apply_fn(params, x, *, impl="manual"):
        return layer_norm(x, params["scale"], params["offset"], axes=axes, eps=eps, impl=impl)

    return _stateless(fn, init_fn, apply_fn)


def Dropout(rate):
    """Inverted dropout (:func:`jaxcnn.dropout`) in train mode, the identity in eval mode.

    **``rate`` is the probability of dropping** an element (kept ones are scaled by
    ``1 / (1 − rate)``). This is the opposite of ``stax.Dropout(rate)``, whose ``rate`` is the
    probability of keeping: ``stax.Dropout(0.9)`` is ``Dropout(0.1)`` here.

    ``apply(..., train=True, rng=key)`` draws the mask from ``rng`` (required then);
    ``train=False`` (the default) returns ``x``. No params (``{}``), no state.
    """
    fn = "Dropout"
    rate = _shapes.check_rate(fn, rate)

    def init_fn(key, input_shape, before_relu):
        input_shape = _check_input_shape(fn, input_shape, min_rank=1)
        return input_shape, {}, {}

    def apply_fn(params, state, x, impl, train, rng):
        if not train or rate == 0.0:
            return x, state
        if rng is None:
            raise ValueError(
                f"{fn}: train=True needs rng, the PRNG key the dropout mask is drawn from "
                f"(apply(params, x, train=True, rng=key)); got rng=None"
            )
        return dropout(x, rate, rng, impl=impl), state

    return _make_layer(fn, init_fn, apply_fn)


# --------------------------------------------------------------------------------------------
# Layers without weights (params ``{}``).


def MaxPool(window, *, stride=None, padding="VALID", dilation=1, ceil_mode=False,
            padding_mode="zeros", ties="first"):
    """Max pooling: ``(N, *spatial, C) -> (N, *out_spatial, C)``; as :func:`jaxcnn.max_pool`,
    whose **stride defaults to the window** (stax's and flax's default to 1). ``dilation``,
    ``ceil_mode``, ``padding_mode`` and ``ties`` as there."""
    fn = "MaxPool"
    options = _pool_options(fn, window, stride, padding, dilation, ceil_mode, padding_mode)
    options["ties"] = _shapes.check_choice(fn, "ties", ties, _shapes.TIES)
    return _parameterless(fn, lambda x, impl: max_pool(x, window, impl=impl, **options))


def AvgPool(window, *, stride=None, padding="VALID", dilation=1, ceil_mode=False,
            padding_mode="zeros", count_include_pad=True):
    """Average pooling: ``(N, *spatial, C) -> (N, *out_spatial, C)``; as
    :func:`jaxcnn.avg_pool` (**stride defaults to the window**)."""
    fn = "AvgPool"
    options = _pool_options(fn, window, stride, padding, dilation, ceil_mode, padding_mode)
    options["count_include_pad"] = _shapes.check_bool(fn, "count_include_pad",
                                                      count_include_pad)
    return _parameterless(fn, lambda x, impl: avg_pool(x, window, impl=impl, **options))


def Pad(padding, *, mode="zeros"):
    """Padding layer: ``(N, *spatial, C) -> (N, *(n + low + high), C)``, :func:`jaxcnn.pad`
    (``mode``: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``)."""
    fn = "Pad"
    _check_padding(fn, padding)
    mode = _shapes.check_choice(fn, "mode", mode, _shapes.PADDING_MODES)
    return _parameterless(fn, lambda x, impl: pad(x, padding, mode=mode, impl=impl))


def GlobalAvgPool():
    """Global average pooling: ``(N, *spatial, C) -> (N, C)``, the mean over every position;
    :func:`jaxcnn.global_avg_pool`. Write ``GlobalAvgPool()``."""
    return _parameterless("GlobalAvgPool", lambda x, impl: global_avg_pool(x, impl=impl))


def GlobalMaxPool(*, ties="first"):
    """Global max pooling: ``(N, *spatial, C) -> (N, C)``; :func:`jaxcnn.global_max_pool`."""
    ties = _shapes.check_choice("GlobalMaxPool", "ties", ties, _shapes.TIES)
    return _parameterless("GlobalMaxPool",
                          lambda x, impl: global_max_pool(x, ties=ties, impl=impl))


def AdaptiveAvgPool(output_size):
    """Adaptive average pooling: ``(N, *spatial, C) -> (N, *output_size, C)`` with PyTorch's
    windows; :func:`jaxcnn.adaptive_avg_pool`."""
    fn = "AdaptiveAvgPool"
    _check_output_size(fn, output_size)
    return _parameterless(fn, lambda x, impl: adaptive_avg_pool(x, output_size, impl=impl))


def AdaptiveMaxPool(output_size, *, ties="first"):
    """Adaptive max pooling: ``(N, *spatial, C) -> (N, *output_size, C)`` with PyTorch's
    windows; :func:`jaxcnn.adaptive_max_pool`."""
    fn = "AdaptiveMaxPool"
    _check_output_size(fn, output_size)
    ties = _shapes.check_choice(fn, "ties", ties, _shapes.TIES)
    return _parameterless(fn, lambda x, impl: adaptive_max_pool(x, output_size, ties=ties,
                                                                impl=impl))


def _pool_options(fn, window, stride, padding, dilation, ceil_mode, padding_mode) -> dict:
    """Check what a pooling layer can check before it sees the input; the op checks the rest
    (the number of spatial dims, the padding's limits) at ``init``."""
    _int_or_ints(fn, "window", window)
    if stride is not None:
        _int_or_ints(fn, "stride", stride)
    _int_or_ints(fn, "dilation", dilation)
    _check_padding(fn, padding)
    return dict(stride=stride, padding=padding, dilation=dilation,
                ceil_mode=_shapes.check_bool(fn, "ceil_mode", ceil_mode),
                padding_mode=_shapes.check_choice(fn, "padding_mode", padding_mode,
                                                  _shapes.PADDING_MODES))


def _check_output_size(fn, output_size):
    """An int >= 1 or 1 to 3 entries, each an int >= 1 or None (keep that dim's size)."""
    if isinstance(output_size, (list, tuple)):
        _int_or_ints(fn, "output_size", tuple(1 if o is None else o for o in output_size))
    else:
        _int_or_ints(fn, "output_size", output_size)


def _parameterless(fn, op) -> Layer:
    """A layer with params ``{}`` that computes ``op(x, impl)``."""

    def init_fn(key, input_shape, *, before_relu=False):
        input_shape = _check_input_shape(fn, input_shape, min_rank=1)
        return _eval_shape(lambda x: op(x, "lax"), input_shape), {}

    def apply_fn(params, x, *, impl="manual"):
        return op(x, impl)

    return _stateless(fn, init_fn, apply_fn)


Relu = _parameterless("Relu", lambda x, impl: relu(x, impl=impl))
"""``relu(x) = max(x, 0)`` elementwise. A constant layer, as in stax: write ``Relu``, not
``Relu()``; :func:`serial` recognises it to give the layer before it He initialisation."""

Flatten = _parameterless("Flatten", lambda x, impl: flatten(x, impl=impl))
"""``(N, *rest) -> (N, prod(rest))``. A constant layer: write ``Flatten``."""


# --------------------------------------------------------------------------------------------
# More activation layers (params ``{}``, any input shape). As with ``Relu``, a layer with
# nothing to configure is a constant (write ``Sigmoid``, ``Tanh``); one with an option is a
# factory, called even for its defaults (``LeakyRelu()``, ``Gelu()``, ``Softmax()``), so that
# the option is visible where the model is written. Only ``Relu`` gives the layer before it He
# initialisation in :func:`serial`; pass ``init="he"`` to a ``Conv`` / ``Dense`` before
# ``LeakyRelu`` or ``Gelu`` to get it there too.

Sigmoid = _parameterless("Sigmoid", lambda x, impl: sigmoid(x, impl=impl))
"""``σ(x) = 1 / (1 + exp(-x))`` elementwise (:func:`jaxcnn.sigmoid`). A constant layer:
write ``Sigmoid``."""

Tanh = _parameterless("Tanh", lambda x, impl: tanh(x, impl=impl))
"""``tanh(x)`` elementwise (:func:`jaxcnn.tanh`). A constant layer: write ``Tanh``."""


def LeakyRelu(negative_slope=0.01):
    """``x`` for ``x >= 0``, ``negative_slope · x`` otherwise (:func:`jaxcnn.leaky_relu`)."""
    fn = "LeakyRelu"
    negative_slope = _shapes.check_float(fn, "negative_slope", negative_slope)
    return _parameterless(fn, lambda x, impl: leaky_relu(x, negative_slope, impl=impl))


def Gelu(approximate=False):
    """``x · Φ(x)`` elementwise, or its tanh approximation with ``approximate=True``
    (:func:`jaxcnn.gelu`; the exact form by default, unlike ``jax.nn.gelu``)."""
    fn = "Gelu"
    approximate = _shapes.check_bool(fn, "approximate", approximate)
    return _parameterless(fn, lambda x, impl: gelu(x, approximate, impl=impl))


def Softmax(axis=-1):
    """``exp(x_j) / Σ_k exp(x_k)`` along ``axis`` (:func:`jaxcnn.softmax`; default the last,
    the class axis of channels-last logits)."""
    fn = "Softmax"
    axis = _shapes.check_int(fn, "axis", axis)
    return _parameterless(fn, lambda x, impl: softmax(x, axis, impl=impl))


# --------------------------------------------------------------------------------------------
# Composition: chains, branches, and the entry point for training code.


def serial(*layers):
    """Chain layers: ``apply`` feeds each layer's output to the next.

    Params and state are lists with one entry per layer (``{}`` for layers without any). The
    ``init`` of a layer directly followed by :data:`Relu` is called with ``before_relu=True``
    (so a ``Conv`` or ``Dense`` with ``init=None`` gets He initialisation), and ``serial``'s own
    ``init`` accepts ``before_relu`` and passes it on to its last layer. ``apply`` passes
    ``impl`` and ``train`` to every layer, gives layer ``i`` the key ``fold_in(rng, i)``, and
    threads the state: layer ``i`` gets ``state[i]`` and its new state is entry ``i`` of the
    new list.

    Other ``(init, apply)`` pairs (stax's layers, or yours written for stax) work too: their
    ``init`` is called as ``init(key, input_shape)``, their ``apply`` as ``apply(params, x,
    impl=..., train=..., rng=...)`` (stax's layers take and ignore keyword arguments), and
    their state is ``{}``.
    """
    fn = "serial"
    _check_layers(fn, layers)
    followed_by_relu = [layers[i + 1] is Relu for i in range(len(layers) - 1)]

    def init_fn(key, input_shape, before_relu):
        keys = jax.random.split(key, len(layers))
        params, state = [], []
        shape = input_shape
        for i, (layer, layer_key) in enumerate(zip(layers, keys)):
            relu_next = followed_by_relu[i] if i < len(layers) - 1 else before_relu
            shape, layer_params, layer_state = _init_child(layer, layer_key, shape, relu_next)
            params.append(layer_params)
            state.append(layer_state)
        return shape, params, state

    def apply_fn(params, state, x, impl, train, rng):
        _check_per_layer(fn, "params", params, len(layers))
        states = [None] * len(layers) if state is None else state
        if state is not None:
            _check_per_layer(fn, "state", state, len(layers))
        new_state = []
        for i, (layer, p, s) in enumerate(zip(layers, params, states)):
            x, s = _apply_child(layer, p, s, x, impl, train, _fold_in(rng, i))
            new_state.append(s)
        return x, new_state

    return _make_layer(fn, init_fn, apply_fn)


def parallel(*layers):
    """Apply ``layers[i]`` to the ``i``-th of a list of inputs: ``[x_0, ..., x_{n-1}] ->
    [layers[0](x_0), ..., layers[n-1](x_{n-1})]``; ``input_shape`` is the list of the inputs'
    shapes. Params and state are lists with one entry per layer, keys ``fold_in(rng, i)``, as
    in :func:`serial`. With :data:`FanOut` before and :data:`FanInSum` after, the branches of a
    residual block (module docstring)."""
    fn = "parallel"
    _check_layers(fn, layers)

    def init_fn(key, input_shape, before_relu):
        _check_branches(fn, "input_shape", input_shape, len(layers))
        keys = jax.random.split(key, len(layers))
        shapes, params, state = zip(*(_init_child(layer, k, shape, before_relu)
                                      for layer, k, shape in zip(layers, keys, input_shape)))
        return list(shapes), list(params), list(state)

    def apply_fn(params, state, x, impl, train, rng):
        _check_branches(fn, "x", x, len(layers))
        _check_per_layer(fn, "params", params, len(layers))
        states = [None] * len(layers) if state is None else state
        if state is not None:
            _check_per_layer(fn, "state", state, len(layers))
        ys, new_state = zip(*(_apply_child(layer, p, s, xi, impl, train, _fold_in(rng, i))
                              for i, (layer, p, s, xi) in enumerate(zip(layers, params, states,
                                                                         x))))
        return list(ys), list(new_state)

    return _make_layer(fn, init_fn, apply_fn)


def FanOut(n):
    """``x -> [x] * n``: ``n`` copies of the input, one per branch of a :func:`parallel`."""
    fn = "FanOut"
    n = _shapes.check_int(fn, "n", n, minimum=1)
    return _stateless(fn, lambda key, shape, *, before_relu=False: ([shape] * n, {}),
                      lambda params, x, *, impl="manual": [x] * n)


def _fan_in_sum_init(key, input_shape, *, before_relu=False):
    fn = "FanInSum"
    _check_branches(fn, "input_shape", input_shape)
    if any(tuple(s) != tuple(input_shape[0]) for s in input_shape):
        raise ValueError(f"{fn}: the branches must have equal shapes to be added; got "
                         f"{[tuple(s) for s in input_shape]}")
    return tuple(input_shape[0]), {}


def _fan_in_sum_apply(params, x, *, impl="manual"):
    _check_branches("FanInSum", "x", x)
    return sum(x[1:], x[0])


FanInSum = _stateless("FanInSum", _fan_in_sum_init, _fan_in_sum_apply)
"""``[x_0, ..., x_{n-1}] -> x_0 + ... + x_{n-1}`` (equal shapes). A constant layer, as in
stax: write ``FanInSum``; it joins the branches of a residual block."""


def FanInConcat(axis=-1):
    """``[x_0, ..., x_{n-1}] -> concatenate(x_i, axis)``: the branches joined along ``axis``
    (default the channels); every other dim must agree. ``axis`` counts in the full shape
    ``(N, ...)``, and cannot be the batch axis."""
    fn = "FanInConcat"
    axis = _shapes.check_int(fn, "axis", axis)

    def init_fn(key, input_shape, *, before_relu=False):
        _check_branches(fn, "input_shape", input_shape)
        shapes = [tuple(s) for s in input_shape]
        rank = len(shapes[0])
        if (any(len(s) != rank for s in shapes) or not -rank <= axis < rank
                or axis % rank == 0):
            raise ValueError(f"{fn}: the branches must have one rank and axis ({axis}) must be "
                             f"one of their non-batch axes; got shapes {shapes}")
        a = axis % rank
        if any(s[:a] + s[a + 1:] != shapes[0][:a] + shapes[0][a + 1:] for s in shapes):
            raise ValueError(f"{fn}: the branches must agree on every dim but axis {axis}; got "
                             f"shapes {shapes}")
        return (*shapes[0][:a], sum(s[a] for s in shapes), *shapes[0][a + 1:]), {}

    def apply_fn(params, x, *, impl="manual"):
        _check_branches(fn, "x", x)
        return jnp.concatenate(x, axis=axis)

    return _stateless(fn, init_fn, apply_fn)


Identity = _stateless("Identity", lambda key, shape, *, before_relu=False: (shape, {}),
                      lambda params, x, *, impl="manual": x)
"""``x -> x``, e.g. the shortcut of a residual block. A constant layer: write ``Identity``."""


def apply_model(apply, params, state, x, *, train, rng=None, impl="manual"):
    """Run a model built from this module in train or eval mode: ``(y, new_state)``.

    The one call training code needs, for every model here, with or without state (a model
    without state has ``state`` such as ``[{}, {}, ...]`` and gets it back unchanged):

    - ``apply``: the model's ``apply`` (e.g. ``jaxcnn.models.resnet().apply``).
    - ``params``, ``state``: from ``init(key, input_shape, with_state=True) -> (output_shape,
      params, state)``. Differentiate with respect to ``params`` only, and carry ``state``
      beside them: ``jax.value_and_grad(loss, has_aux=True)`` with ``loss`` returning
      ``(value, new_state)``. ``state`` is a pytree of arrays like ``params`` (save it, shard it
      and replicate it the same way); it is never changed in place.
    - ``train``: a Python bool (static under ``jit``). True in the training step: batch norm
      normalizes with the batch statistics and moves its running averages, dropout drops.
      False for evaluation: batch norm uses the running averages, dropout is off, and
      ``new_state`` holds the very arrays of ``state``.
    - ``rng``: a PRNG key, needed with ``train=True`` when the model has ``Dropout`` (derive a
      fresh one per step, e.g. ``jax.random.fold_in(key, step)``); otherwise None.
    - ``impl``: ``"manual"`` or ``"lax"``, for every layer.

    Under data parallelism (a batch sharded over devices, one jitted step), batch norm's
    statistics are means over the whole global batch, as on one device: XLA reduces across
    the devices.
    """
    fn = "apply_model"
    train = _shapes.check_bool(fn, "train", train)
    impl = _shapes.check_impl(fn, impl)
    if state is None:
        raise ValueError(
            f"{fn}: state is required (the model's non-trainable state, from init(key, "
            f"input_shape, with_state=True)); got None"
        )
    return apply(params, x, impl=impl, train=train, rng=rng, state=state)


def count_params(params) -> int:
    """Total number of scalars in a params pytree."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------------------------
# Helpers: initialisation, output shapes, argument checks.


def _scheme(init, before_relu: bool) -> str:
    """The initialisation scheme: the explicit ``init``, else He before a relu, else LeCun."""
    if init is not None:
        return init
    return "he" if before_relu else "lecun"


def _normal(key, shape, *, fan_in: int, scheme: str):
    """``N(0, gain / fan_in)`` weights of ``shape``, float32; gain 2 for He, 1 for LeCun.

    The samples are drawn in chunks of :data:`_CHUNK` (chunk ``i`` from ``fold_in(key, i)``)
    and cut to size: the sampler compiles once for every shape, where a direct
    ``jax.random.normal(key, shape)`` takes a fresh XLA compilation of the PRNG (about half a
    second on a small CPU) for each new shape.
    """
    std = math.sqrt(_GAINS[scheme] / fan_in)
    size = math.prod(shape)
    chunks = [_normal_chunk(key, i) for i in range(-(-size // _CHUNK))]
    return _scale_to_shape(jnp.concatenate(chunks), std, shape=tuple(shape))


_CHUNK = 4096


@jax.jit
def _normal_chunk(key, i):
    return jax.random.normal(jax.random.fold_in(key, i), (_CHUNK,), jnp.float32)


@partial(jax.jit, static_argnames=("shape",))
def _scale_to_shape(samples, std, *, shape):
    return std * samples[: math.prod(shape)].reshape(shape)


def _zeros(n):
    """Float32 zeros of shape ``n`` (an int or a tuple), put on the device without compiling
    anything."""
    return jnp.asarray(np.zeros(n, np.float32))


def _ones(n):
    """Float32 ones of shape ``n``, like :func:`_zeros`."""
    return jnp.asarray(np.ones(n, np.float32))


def _eval_shape(op, input_shape, *param_shapes) -> tuple[int, ...]:
    """Output shape of ``op(x, *params)`` from ``jax.eval_shape`` (no computation).

    A batch size of -1 (any) is traced as 1 and given back as -1.
    """
    any_batch = input_shape[0] == -1
    shape = (1, *input_shape[1:]) if any_batch else input_shape
    specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in (shape, *param_shapes)]
    out = tuple(int(d) for d in jax.eval_shape(op, *specs).shape)
    return (-1, *out[1:]) if any_batch else out


def _check_input_shape(fn, input_shape, *, min_rank=3) -> tuple[int, ...]:
    if not isinstance(input_shape, (tuple, list)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in input_shape):
        raise TypeError(
            f"{fn}: input_shape must be a tuple of ints (N, ...); got {input_shape!r}"
        )
    shape = tuple(int(d) for d in input_shape)
    if len(shape) < min_rank:
        raise ValueError(
            f"{fn}: input_shape must have rank >= {min_rank}, batch first; got {shape}"
        )
    if shape[0] != -1 and shape[0] < 1 or any(d < 1 for d in shape[1:]):
        raise ValueError(
            f"{fn}: input_shape entries must be >= 1 (the batch size may be -1 for any); "
            f"got {shape}"
        )
    return shape




def _int_or_ints(fn, name, value) -> tuple[int, ...]:
    """Check an int or a tuple of ints, each >= 1 (the op checks the count per spatial dim)."""
    if isinstance(value, (list, tuple)):
        if not 1 <= len(value) <= 3:
            raise ValueError(
                f"{fn}: {name} must be an int or a tuple of 1 to 3 ints (one per spatial "
                f"dimension); got {value!r}"
            )
        return _shapes.to_tuple(fn, name, value, len(value))
    return _shapes.to_tuple(fn, name, value, 1)


def _check_padding(fn, padding):
    """Catch a misspelt padding mode now; the per-dimension forms are checked at ``init``."""
    if isinstance(padding, str) and padding.upper() not in ("VALID", "SAME"):
        raise ValueError(
            f"{fn}: padding must be 'VALID', 'SAME', an int or (low, high) pairs; "
            f"got {padding!r}"
        )
    if isinstance(padding, bool) or not isinstance(padding, (str, int, np.integer, list, tuple)):
        raise TypeError(
            f"{fn}: padding must be 'VALID', 'SAME', an int or (low, high) pairs; "
            f"got {type(padding).__name__} {padding!r}"
        )
    if isinstance(padding, (int, np.integer)) and padding < 0:
        raise ValueError(f"{fn}: padding must be >= 0; got {padding}")


def _check_init(fn, init):
    if init is not None:
        _shapes.check_choice(fn, "init", init, INITS)


def _check_spatial_dims_agree(fn, nd, window, **tuples):
    """Each option given per spatial dim (a tuple) must have the window's ``nd`` entries."""
    for name, value in tuples.items():
        if isinstance(value, (list, tuple)) and len(value) != nd:
            raise ValueError(
                f"{fn}: {name} {value!r} has {len(value)} entries (one per spatial dim), but "
                f"window {window!r} means {nd} spatial dims; give window as a tuple of "
                f"{len(value)} ints for a {len(value)}-D layer"
            )


def _check_spatial_rank(fn, input_shape, nd, window):
    """The input must have rank ``nd + 2``, ``(N, *spatial, C)``, for an ``nd``-D window."""
    if len(input_shape) != nd + 2:
        hint = ""
        if len(input_shape) == nd + 1:
            hint = (f"; is the batch axis missing? (-1, {', '.join(map(str, input_shape))}) "
                    f"means any batch size")
        raise ValueError(
            f"{fn}: input_shape must have rank {nd + 2}, (N, *spatial, C_in) with {nd} spatial "
            f"dims for window {window!r} (an int window is 2-D; a tuple of 1 or 3 ints makes a "
            f"1-D or 3-D layer); got {tuple(input_shape)} (rank {len(input_shape)}){hint}"
        )


# --------------------------------------------------------------------------------------------
# Helpers of the combinators: children that are ours or stax's, lists, keys and state.


def _init_child(layer, key, input_shape, before_relu):
    """``(output_shape, params, state)`` of a child layer; a foreign (stax) one has state
    ``{}`` and is not told ``before_relu``."""
    if isinstance(layer, Layer):
        return layer.init(key, input_shape, before_relu=before_relu, with_state=True)
    output_shape, params = layer[0](key, input_shape)
    return output_shape, params, {}


def _apply_child(layer, params, state, x, impl, train, rng):
    """``(y, new_state)`` of a child layer; ``state`` None (no state kept) stays None."""
    if not isinstance(layer, Layer):
        return layer[1](params, x, impl=impl, train=train, rng=rng), state
    if state is None:
        return layer.apply(params, x, impl=impl, train=train, rng=rng), None
    return layer.apply(params, x, impl=impl, train=train, rng=rng, state=state)


def _fold_in(rng, i):
    """Layer ``i``'s key: ``fold_in(rng, i)`` (None without a key)."""
    return None if rng is None else jax.random.fold_in(rng, i)


def _check_layers(fn, layers):
    if not layers:
        raise ValueError(f"{fn}: needs at least one layer; got none")
    for i, layer in enumerate(layers):
        if not (isinstance(layer, tuple) and len(layer) == 2 and all(map(callable, layer))):
            raise TypeError(
                f"{fn}: layer {i} must be an (init, apply) pair such as Conv(...) or Relu; got "
                f"{type(layer).__name__} {layer!r:.80}"
            )


def _check_per_layer(fn, name, value, n):
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(
            f"{fn}: {name} must be a list with one entry per layer ({n}); got "
            f"{type(value).__name__} of length "
            f"{len(value) if hasattr(value, '__len__') else 'n/a'}"
        )


def _check_branches(fn, name, value, n=None):
    """``value`` must be a list (or tuple) of branches: ``n`` of them when given, else >= 1."""
    entry = (list, tuple) if name == "input_shape" else object   # shapes, or arrays
    if (not isinstance(value, (list, tuple)) or not value or (n is not None and len(value) != n)
            or not all(isinstance(v, entry) for v in value)):
        want = f"{n} branches" if n is not None else "at least one branch"
        raise ValueError(
            f"{fn}: {name} must be a list with one entry per branch ({want}), as FanOut or "
            f"parallel gives; got {type(value).__name__} {value!r:.80}"
        )


def _check_state(fn, state, keys):
    if not isinstance(state, dict) or set(state) != set(keys):
        raise ValueError(
            f"{fn}: state must be a dict with the keys {list(keys)}, as init(key, input_shape, "
            f"with_state=True) gives; got {type(state).__name__} {state!r:.80}"
        )
