"""Layers as ``(init, apply)`` pairs, and ``serial`` to chain them (the style of jax's stax).

Every constructor returns a :class:`Layer`, a named pair that unpacks like stax's::

    init, apply = serial(Conv(6, 5, padding="SAME"), Relu, MaxPool(2), Flatten, Dense(10))
    out_shape, params = init(jax.random.key(0), (1, 28, 28, 1))
    logits = apply(params, x)                      # x: (N, 28, 28, 1) -> (N, 10)

- ``init(key, input_shape) -> (output_shape, params)``. ``input_shape`` is a full shape, batch
  first, ``(N, *spatial, C_in)``; ``N`` may be ``-1`` (any batch size, as in stax). The output
  shape comes from ``jax.eval_shape`` on the op itself, so it follows the op's output-size rule
  (:mod:`jaxcnn._shapes`) and the op's own shape errors surface at ``init``.
- ``apply(params, x, *, impl="manual") -> y``. ``impl`` picks the op implementation:
  ``"manual"`` (the hand-derived gradients, the default here) or ``"lax"``.

Parameters are plain pytrees that optax, ``jax.tree_util`` and ``numpy.savez`` take as they
are: ``Conv`` has ``{"kernel": (*window, C_in // groups, C_out), "bias": (C_out,)}``, ``Dense``
has ``{"w": (D_in, D_out), "b": (D_out,)}`` (the op's argument names), parameterless layers
have ``{}``, and ``serial`` has a list with one entry per layer.

Initialisation. Biases start at zero. Weights are drawn from a normal distribution with
standard deviation ``sqrt(gain / fan_in)``, where ``fan_in`` is the number of inputs of one
output unit (``prod(window) * C_in // groups`` for a convolution, ``D_in`` for dense):

- **He** (``gain = 2``, ``init="he"``) keeps the activations' variance constant through a
  ReLU, which zeroes half of its input;
- **LeCun** (``gain = 1``, ``init="lecun"``) keeps it constant through a linear layer.

The default ``init=None`` picks for you: inside :func:`serial`, a ``Conv`` or ``Dense``
directly followed by :data:`Relu` gets He, every other one LeCun (a layer used on its own
gets LeCun). ``serial`` tells the layer by calling its ``init`` with ``before_relu=True``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _shapes
from .activations import relu
from .convolution import conv
from .linear import dense, flatten
from .adaptive_pooling import (adaptive_avg_pool, adaptive_max_pool, global_avg_pool,
                               global_max_pool)
from .pooling import avg_pool, max_pool

INITS = ("he", "lecun")
_GAINS = {"he": 2.0, "lecun": 1.0}


class Layer(NamedTuple):
    """A layer: ``init(key, input_shape) -> (output_shape, params)`` and
    ``apply(params, x, *, impl="manual") -> y``. Unpacks as ``init, apply = layer``."""

    init: Callable[..., tuple[tuple[int, ...], Any]]
    apply: Callable[..., Any]


# --------------------------------------------------------------------------------------------
# Layers with weights.


def Conv(out_channels, window, *, stride=1, padding="VALID", dilation=1, groups=1,
         padding_mode="zeros", init=None):
    """Convolution layer: ``(N, *spatial, C_in) -> (N, *out_spatial, out_channels)``.

    Args:
      out_channels: ``C_out``, an int >= 1 (divisible by ``groups``).
      window: the kernel's spatial size, an int (the same on every spatial dim of the input)
        or one int per spatial dim.
      stride, padding, dilation, groups, padding_mode: as for :func:`jaxcnn.conv`.
      init: ``"he"``, ``"lecun"`` or None (He when :func:`serial` finds a ``Relu`` right after
        this layer, LeCun otherwise); see the module docstring.

    Params: ``{"kernel": (*window, C_in // groups, out_channels), "bias": (out_channels,)}``.
    """
    fn = "Conv"
    out_channels = _shapes.check_int(fn, "out_channels", out_channels, minimum=1)
    window = _int_or_ints(fn, "window", window)
    _int_or_ints(fn, "stride", stride)
    _int_or_ints(fn, "dilation", dilation)
    groups = _shapes.check_int(fn, "groups", groups, minimum=1)
    _check_padding(fn, padding)
    _shapes.check_choice(fn, "padding_mode", padding_mode, _shapes.PADDING_MODES)
    _check_init(fn, init)
    if out_channels % groups:
        raise ValueError(
            f"{fn}: groups ({groups}) must divide out_channels ({out_channels})"
        )
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                   padding_mode=padding_mode)

    def init_fn(key, input_shape, *, before_relu=False):
        input_shape = _check_input_shape(fn, input_shape)
        nd = len(input_shape) - 2
        win = window * nd if len(window) == 1 else window
        c_in = input_shape[-1]
        if c_in % groups:
            raise ValueError(
                f"{fn}: groups ({groups}) must divide the input channels "
                f"(input_shape[-1]={c_in}); input_shape is {tuple(input_shape)}"
            )
        kernel_shape = (*win, c_in // groups, out_channels)
        output_shape = _eval_shape(
            lambda x, k: conv(x, k, **options), input_shape, kernel_shape)
        kernel = _normal(key, kernel_shape, fan_in=math.prod(kernel_shape[:-1]),
                         scheme=_scheme(init, before_relu))
        return output_shape, {"kernel": kernel, "bias": _zeros(out_channels)}

    def apply_fn(params, x, *, impl="manual"):
        return conv(x, params["kernel"], params["bias"], impl=impl, **options)

    return Layer(init_fn, apply_fn)


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

    return Layer(init_fn, apply_fn)


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

    return Layer(init_fn, apply_fn)


Relu = _parameterless("Relu", lambda x, impl: relu(x, impl=impl))
"""``relu(x) = max(x, 0)`` elementwise. A constant layer, as in stax: write ``Relu``, not
``Relu()``; :func:`serial` recognises it to give the layer before it He initialisation."""

Flatten = _parameterless("Flatten", lambda x, impl: flatten(x, impl=impl))
"""``(N, *rest) -> (N, prod(rest))``. A constant layer: write ``Flatten``."""


# --------------------------------------------------------------------------------------------
# Composition.


def serial(*layers):
    """Chain layers: ``apply`` feeds each layer's output to the next.

    Params are a list with one entry per layer (``{}`` for parameterless ones). The ``init``
    of a layer directly followed by :data:`Relu` is called with ``before_relu=True`` (so a
    ``Conv`` or ``Dense`` with ``init=None`` gets He initialisation), and ``serial``'s own
    ``init`` accepts ``before_relu`` and passes it on to its last layer. Other ``(init, apply)``
    pairs (for instance written for stax) work too; they are called without ``before_relu``.
    """
    fn = "serial"
    if not layers:
        raise ValueError(f"{fn}: needs at least one layer; got none")
    for i, layer in enumerate(layers):
        if not (isinstance(layer, tuple) and len(layer) == 2 and all(map(callable, layer))):
            raise TypeError(
                f"{fn}: layer {i} must be an (init, apply) pair such as Conv(...) or Relu; got "
                f"{type(layer).__name__} {layer!r:.80}"
            )
    followed_by_relu = [layers[i + 1] is Relu for i in range(len(layers) - 1)]

    def init_fn(key, input_shape, *, before_relu=False):
        keys = jax.random.split(key, len(layers))
        params = []
        shape = input_shape
        for i, (layer, layer_key) in enumerate(zip(layers, keys)):
            relu_next = followed_by_relu[i] if i < len(layers) - 1 else before_relu
            kwargs = {"before_relu": True} if relu_next and isinstance(layer, Layer) else {}
            shape, layer_params = layer[0](layer_key, shape, **kwargs)
            params.append(layer_params)
        return shape, params

    def apply_fn(params, x, *, impl="manual"):
        if not isinstance(params, (list, tuple)) or len(params) != len(layers):
            raise ValueError(
                f"{fn}: params must be a list with one entry per layer ({len(layers)}); got "
                f"{type(params).__name__} of length "
                f"{len(params) if hasattr(params, '__len__') else 'n/a'}"
            )
        for (_, layer_apply), layer_params in zip(layers, params):
            x = layer_apply(layer_params, x, impl=impl)
        return x

    return Layer(init_fn, apply_fn)


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


def _zeros(n: int):
    """A float32 zero bias, put on the device without compiling anything."""
    return jnp.asarray(np.zeros((n,), np.float32))


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
