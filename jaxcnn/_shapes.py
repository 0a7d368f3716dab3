"""The one place for argument truth: normalization, padding rules, output sizes, errors.

Both implementations (``impl="lax"`` and ``impl="manual"``) and every hand-derived backward
pass take their strides, paddings, dilations and windows from here, so the two paths cannot
disagree about what an argument means, and they raise the same errors.

Shape vocabulary (used word for word in every docstring):
``x: (N, *spatial, C_in)``, ``kernel: (*window, C_in // groups, C_out)``, ``bias: (C_out,)``,
returns ``(N, *out_spatial, C_out)``.

Output-size rule (the only one in the project). For one spatial dimension with input size
``n``, padding ``(lo, hi)``, window (kernel) size ``k``, kernel dilation ``d`` and stride ``s``,
the dilated window is ``k_eff = (k - 1) * d + 1`` and

    out = floor((n + lo + hi - k_eff) / s) + 1.

The ``r = (n + lo + hi - k_eff) mod s`` trailing rows that no window reaches are the
*stride remainder*: the forward drops them, and the backward pass must give them a zero
gradient (see :func:`conv_input_grad_padding`).

Pooling's ``ceil_mode`` (PyTorch's rule, :func:`pool_output_size`) rounds up instead,

    out = ceil((n + lo + hi - k_eff) / s) + 1,

minus one if that last window would start inside the right padding (at ``(out - 1) * s >= n +
lo``); the windows that then run past the padded input read the *overhang*, which pooling fills
like its padding but never counts as padding (see :class:`PoolConfig`).

Padding forms: ``"VALID"`` (no padding), ``"SAME"`` (lax's rule: ``out = ceil(n / s)``, total
padding ``max((out - 1) * s + k_eff - n, 0)``, the odd extra unit at the end), an int ``p``
(``(p, p)`` on every spatial dim), or one ``(lo, hi)`` pair per spatial dim.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("lax", "manual")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
TIES = ("first", "split")

Pads = tuple[tuple[int, int], ...]


class WindowConfig(NamedTuple):
    """A fully normalized, hashable window configuration (a static jit argument).

    Every field has one entry per spatial dimension.
    """

    window: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Pads
    dilation: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.window)

    @property
    def effective_window(self) -> tuple[int, ...]:
        """Window size after kernel dilation: ``(k - 1) * d + 1``."""
        return effective_window(self.window, self.dilation)


class PoolConfig(NamedTuple):
    """A pooling op's normalized arguments (a static jit argument), from :func:`pool_config`.

    - ``win``: the window the pooling runs, with the padding the pooling itself fills (``-inf``
      for max, 0 for average): in ``"zeros"`` mode the user's ``(lo, hi)`` plus the ceil-mode
      overhang, ``(lo, hi + over)``; in the other modes ``(0, over)``, on an input that is
      first padded by ``pads`` with ``mode`` (:func:`jaxcnn.padding.pad`).
    - ``pads``: the padding the user asked for, one ``(lo, hi)`` pair per spatial dim.
    - ``mode``: the padding mode, one of :data:`PADDING_MODES`.
    - ``overhang``: per spatial dim, the positions past the padded input that ceil mode's last
      window reads (0 without ``ceil_mode``).
    """

    win: WindowConfig
    pads: Pads
    mode: str
    overhang: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Validation helpers. Every message names the function and the argument, what was expected and
# what was given.


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + (",)" if len(shape) == 1 else ")")


def check_impl(fn: str, impl) -> str:
    if not isinstance(impl, str):
        raise TypeError(f"{fn}: impl must be a string, one of {IMPLS}; got {impl!r}")
    return check_choice(fn, "impl", impl, IMPLS)


def check_array(fn: str, name: str, a, *, floating: bool = True):
    """Check that ``a`` is an array-like with a (floating) numeric dtype; return its shape."""
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is None or dtype is None:
        if isinstance(a, (int, float, list, tuple)) or hasattr(a, "__array__"):
            arr = np.asarray(a)
            shape, dtype = arr.shape, arr.dtype
        else:
            raise TypeError(f"{fn}: {name} must be an array; got {type(a).__name__}")
    if floating and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fn}: {name} must have a floating dtype (float16, bfloat16, float32 or float64); "
            f"got {np.dtype(dtype).name}"
        )
    return tuple(shape)


def is_int(v) -> bool:
    """True for Python and numpy integers, False for bools (a bool is never a count)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_int(fn: str, name: str, value, *, minimum: int | None = None) -> int:
    """``value`` as an int, or ``TypeError`` / ``ValueError`` naming ``fn`` and ``name``.

    The one integer check of the project (counts, sizes, seeds, epochs, channels, classes).
    """
    if not is_int(value):
        raise TypeError(f"{fn}: {name} must be an int; got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}; got {value}")
    return int(value)


def check_choice(fn: str, name: str, value, choices):
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {tuple(choices)}; got {value!r}")
    return value


def check_bool(fn: str, name: str, value) -> bool:
    """``value`` as a bool (Python or numpy), else ``TypeError``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool; got {value!r}")
    return bool(value)


def check_float(fn: str, name: str, value, *, minimum: float | None = None,
                maximum: float | None = None, exclusive_minimum: bool = False,
                exclusive_maximum: bool = False, meaning: str = "") -> float:
    """``value`` as a Python float: a real number (not a bool, not an array), finite, and within
    ``[minimum, maximum]`` (open at either end with ``exclusive_minimum`` /
    ``exclusive_maximum``); else ``TypeError`` / ``ValueError`` naming ``fn`` and ``name``.
    ``meaning`` (e.g. `` (the probability of dropping)``) follows the rule in the message. The
    one float check of the project (rates, epsilons, momenta, slopes, smoothing, learning
    rates); such arguments are static (hashable, part of the compiled function).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise TypeError(f"{fn}: {name} must be a Python number{meaning}; got "
                        f"{type(value).__name__} {value!r}")
    v = float(value)
    if minimum is not None and maximum is not None:
        rule = (f"in {'(' if exclusive_minimum else '['}{minimum:g}, {maximum:g}"
                f"{')' if exclusive_maximum else ']'}")
    elif minimum is not None:
        rule = f"{'>' if exclusive_minimum else '>='} {minimum:g}"
    elif maximum is not None:
        rule = f"{'<' if exclusive_maximum else '<='} {maximum:g}"
    else:
        rule = ""
    too_low = minimum is not None and (v <= minimum if exclusive_minimum else v < minimum)
    too_high = maximum is not None and (v >= maximum if exclusive_maximum else v > maximum)
    if not np.isfinite(v) or too_low or too_high:
        raise ValueError(f"{fn}: {name} must be a finite number{' ' + rule if rule else ''}"
                         f"{meaning}; got {value!r}")
    return v


def _as_int(fn: str, name: str, v) -> int:
    if not is_int(v):
        raise TypeError(f"{fn}: {name} must be an int or a tuple of ints; got {v!r}")
    return int(operator.index(v))


def to_tuple(fn: str, name: str, v, ndim: int, *, minimum: int = 1) -> tuple[int, ...]:
    """``int -> (int,) * ndim``; a sequence must have ``ndim`` ints, each ``>= minimum``."""
    if isinstance(v, (list, tuple)):
        vals = tuple(_as_int(fn, name, e) for e in v)
        if len(vals) != ndim:
            raise ValueError(
                f"{fn}: {name} must be an int or a tuple of {ndim} ints (one per spatial "
                f"dimension); got {tuple(v)!r}"
            )
    else:
        vals = (_as_int(fn, name, v),) * ndim
    for e in vals:
        if e < minimum:
            raise ValueError(f"{fn}: {name} must be >= {minimum}; got {v!r}")
    return vals


def same_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """lax's "SAME" rule for one dim: output ``ceil(size / stride)``, extra unit at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def resolve_padding(fn: str, padding, spatial: Sequence[int], eff_window: Sequence[int],
                    stride: Sequence[int]) -> Pads:
    """Turn any padding form into one ``(lo, hi)`` pair of ints per spatial dimension."""
    ndim = len(spatial)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0),) * ndim
        if mode == "SAME":
            return tuple(same_padding(n, k, s) for n, k, s in zip(spatial, eff_window, stride))
        raise ValueError(
            f"{fn}: padding must be 'VALID', 'SAME', an int or {ndim} (low, high) pairs; "
            f"got {padding!r}"
        )
    return explicit_padding(fn, padding, ndim, forms="'VALID', 'SAME', an int or")


def explicit_padding(fn: str, padding, ndim: int, *, forms: str = "an int or") -> Pads:
    """An int ``p`` (``(p, p)`` on every spatial dim) or ``ndim`` ``(lo, hi)`` pairs, ints >= 0,
    as one ``(lo, hi)`` pair per spatial dim. ``forms`` lists the accepted forms in messages."""
    if is_int(padding):
        p = int(padding)
        if p < 0:
            raise ValueError(f"{fn}: padding must be >= 0; got {padding!r}")
        return ((p, p),) * ndim
    if isinstance(padding, (list, tuple)):
        if len(padding) != ndim or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in padding
        ):
            raise ValueError(
                f"{fn}: padding must be {forms} {ndim} (low, high) pairs "
                f"(one per spatial dimension); got {padding!r}"
            )
        pads = tuple((_as_int(fn, "padding", lo), _as_int(fn, "padding", hi))
                     for lo, hi in padding)
        if any(lo < 0 or hi < 0 for lo, hi in pads):
            raise ValueError(f"{fn}: padding must be >= 0; got {padding!r}")
        return pads
    exc = ValueError if isinstance(padding, str) else TypeError
    raise exc(
        f"{fn}: padding must be {forms} {ndim} (low, high) pairs; "
        f"got {type(padding).__name__} {padding!r}"
    )


def output_size(n: int, pad: tuple[int, int], eff_window: int, stride: int) -> int:
    """The output-size rule: ``floor((n + lo + hi - k_eff) / s) + 1``."""
    return (n + pad[0] + pad[1] - eff_window) // stride + 1


def output_spatial(spatial: Sequence[int], cfg: WindowConfig) -> tuple[int, ...]:
    return tuple(output_size(n, p, k, s) for n, p, k, s in
                 zip(spatial, cfg.padding, cfg.effective_window, cfg.stride))


class Phase(NamedTuple):
    """The input positions a convolution reads, where stride and dilation share a factor:
    ``x[start : limit : step]`` per spatial dim, convolved with ``cfg``."""

    start: tuple[int, ...]
    limit: tuple[int, ...]
    step: tuple[int, ...]
    cfg: WindowConfig


def conv_phase(spatial: Sequence[int], cfg: WindowConfig) -> Phase | None:
    """Where a dim's stride ``s`` and dilation ``d`` share a factor ``g = gcd(s, d) > 1`` (and
    the window has more than one tap), the convolution reads only every ``g``-th input
    position along it: padded position ``i·s + m·d`` is a multiple of ``g``, so input position
    ``i·s + m·d - lo`` is ``r + g·u`` with ``r = -lo mod g`` and ``u = i·(s/g) + m·(d/g) -
    lo'``, ``lo' = (lo + r) / g``. So ``Z`` is the convolution of ``x[r::g]`` with stride
    ``s/g``, dilation ``d/g`` and padding ``(lo', hi')``, ``hi'`` giving the same output size
    (the input cut where it has more than that output reads). None where no dim has such a
    factor, or where a dim would keep no input position (every tap reads padding)."""
    if all(k == 1 or math.gcd(s, d) == 1 for k, s, d in
           zip(cfg.window, cfg.stride, cfg.dilation)):
        return None
    out = output_spatial(spatial, cfg)
    start, limit, step, stride, dilation, pads = [], [], [], [], [], []
    for n, o, k, s, d, (lo, _) in zip(spatial, out, cfg.window, cfg.stride, cfg.dilation,
                                      cfg.padding):
        g = math.gcd(s, d) if k > 1 else 1
        r = -lo % g
        lo2, s2, d2 = (lo + r) // g, s // g, d // g
        need = (o - 1) * s2 + (k - 1) * d2 + 1 - lo2     # input positions the output reads
        n2 = min(-(-(n - r) // g), need)
        if n2 <= 0:
            return None
        start.append(r)
        limit.append(r + (n2 - 1) * g + 1)
        step.append(g)
        stride.append(s2)
        dilation.append(d2)
        pads.append((lo2, need - n2))
    return Phase(tuple(start), tuple(limit), tuple(step),
                 WindowConfig(cfg.window, tuple(stride), tuple(pads), tuple(dilation)))


def pool_output_size(n: int, pad: tuple[int, int], eff_window: int, stride: int,
                     ceil_mode: bool) -> int:
    """Pooling's output size: the output-size rule, or with ``ceil_mode`` PyTorch's rule.

    ``ceil_mode=True``: ``out = ceil((n + lo + hi - k_eff) / s) + 1``, but a last window that
    would start inside the right padding (``(out - 1) * s >= n + lo``, in padded coordinates)
    is dropped: every window starts on an input element or in the left padding.
    """
    if not ceil_mode:
        return output_size(n, pad, eff_window, stride)
    out = -(-(n + pad[0] + pad[1] - eff_window) // stride) + 1
    if (out - 1) * stride >= n + pad[0]:
        out -= 1
    return out


def stride_remainder(n: int, pad: tuple[int, int], eff_window: int, stride: int) -> int:
    """Trailing padded positions that no window reaches: ``(n + lo + hi - k_eff) mod s``."""
    return (n + pad[0] + pad[1] - eff_window) % stride


def _check_fits(fn: str, what: str, spatial, cfg: WindowConfig, x_shape, extra: str = ""):
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(spatial, cfg.padding))
    if any(p < k for p, k in zip(padded, cfg.effective_window)):
        raise ValueError(
            f"{fn}: the {what} {_fmt_shape(cfg.effective_window)}{extra} is larger than the "
            f"padded input {_fmt_shape(padded)}; x has shape {_fmt_shape(x_shape)}, padding "
            f"{cfg.padding}"
        )


# --------------------------------------------------------------------------------------------
# Per-op normalizers, shared by both impls.


def effective_window(window, dilation) -> tuple[int, ...]:
    """Each window size after dilation, ``k_eff = (k - 1) * d + 1``."""
    return tuple((k - 1) * d + 1 for k, d in zip(window, dilation))


def _conv_window(fn, k_shape, nd, stride, dilation):
    """A convolution's ``(window, stride, dilation)`` as tuples: the window from the kernel's
    leading dims, stride and dilation ints >= 1, one per spatial dim."""
    return (tuple(int(k) for k in k_shape[:nd]), to_tuple(fn, "stride", stride, nd),
            to_tuple(fn, "dilation", dilation, nd))


def _conv_spatial_dims(fn, name, a_shape, k_shape, kernel_layout) -> int:
    """The number of spatial dims of a convolution, from the kernel's rank; the activation
    ``name`` must have two more (batch and channels)."""
    nd = len(k_shape) - 2
    if nd not in (1, 2, 3):
        raise ValueError(
            f"{fn}: kernel must have rank 3, 4 or 5, {kernel_layout} for 1, 2 or 3 spatial "
            f"dims; got kernel shape {_fmt_shape(k_shape)} (rank {len(k_shape)})"
        )
    if len(a_shape) != nd + 2:
        raise ValueError(
            f"{fn}: {name} must have rank {nd + 2}, (N, *spatial, C_in) with {nd} spatial dims "
            f"as the kernel has; got {name} shape {_fmt_shape(a_shape)} (rank {len(a_shape)}) "
            f"and kernel shape {_fmt_shape(k_shape)}"
        )
    return nd


def conv_config(x_shape, k_shape, b_shape, *, stride, padding, dilation, groups,
                fn: str = "conv") -> WindowConfig:
    """Validate a convolution's arguments and return its normalized :class:`WindowConfig`."""
    nd = _conv_spatial_dims(fn, "x", x_shape, k_shape, "(*window, C_in // groups, C_out)")
    groups = check_int(fn, "groups", groups, minimum=1)
    c_in, k_in, c_out = x_shape[-1], k_shape[-2], k_shape[-1]
    if c_in % groups:
        raise ValueError(
            f"{fn}: groups ({groups}) must divide the x channels (x.shape[-1]={c_in}); "
            f"x has shape {_fmt_shape(x_shape)}"
        )
    if c_out % groups:
        raise ValueError(
            f"{fn}: groups ({groups}) must divide the kernel out-channels "
            f"(kernel.shape[-1]={c_out}); kernel has shape {_fmt_shape(k_shape)}"
        )
    if k_in * groups != c_in:
        raise ValueError(
            f"{fn}: kernel in-channels (kernel.shape[-2]={k_in}) times groups ({groups}) must "
            f"equal x channels (x.shape[-1]={c_in}); x has shape {_fmt_shape(x_shape)}, kernel "
            f"{_fmt_shape(k_shape)}"
        )
    if b_shape is not None and tuple(b_shape) != (c_out,):
        raise ValueError(
            f"{fn}: bias must have shape (C_out,) = ({c_out},); got bias shape "
            f"{_fmt_shape(b_shape)}"
        )
    window, stride_t, dilation_t = _conv_window(fn, k_shape, nd, stride, dilation)
    eff = effective_window(window, dilation_t)
    spatial = tuple(int(n) for n in x_shape[1:-1])
    pads = resolve_padding(fn, padding, spatial, eff, stride_t)
    cfg = WindowConfig(window, stride_t, pads, dilation_t)
    _check_fits(fn, "dilated kernel window", spatial, cfg, x_shape,
                extra=f" (kernel {_fmt_shape(window)} with dilation {dilation_t})")
    return cfg


def conv_transpose_config(y_shape, k_shape, b_shape, *, stride, padding, dilation, groups,
                          output_padding, fn: str = "conv_transpose"):
    """Validate ``conv_transpose``'s arguments; return ``(cfg, x_shape)``.

    ``cfg`` is the :class:`WindowConfig` of the convolution being transposed, the one that maps
    the result ``x: x_shape`` back to ``y``; ``kernel: (*window, C_x // groups, C_y)`` is that
    convolution's kernel. Each spatial size of the result, by the output-size rule read
    backwards:

        n = (o - 1) * s - lo - hi + k_eff + output_padding        (explicit padding)
        n = o * s                                                  ("SAME")

    ``output_padding`` (``0 <= output_padding < max(stride, dilation)``, as in PyTorch) picks
    one of the ``s`` input sizes that a strided convolution maps to the same ``o``.
    """
    nd = _conv_spatial_dims(fn, "y", y_shape, k_shape, "(*window, C_out // groups, C_in)")
    groups = check_int(fn, "groups", groups, minimum=1)
    if y_shape[-1] != k_shape[-1]:
        raise ValueError(
            f"{fn}: y channels (y.shape[-1]={y_shape[-1]}) must equal the kernel's last dim "
            f"(kernel.shape[-1]={k_shape[-1]}): the kernel is the (*window, C_out // groups, "
            f"C_in) kernel of the convolution that maps the result back to y; y has shape "
            f"{_fmt_shape(y_shape)}, kernel {_fmt_shape(k_shape)}"
        )
    if k_shape[-1] % groups:
        raise ValueError(
            f"{fn}: groups ({groups}) must divide the y channels (y.shape[-1]={y_shape[-1]})"
        )
    c_x = k_shape[-2] * groups
    if b_shape is not None and tuple(b_shape) != (c_x,):
        raise ValueError(
            f"{fn}: bias must have shape (C_out,) = ({c_x},) (kernel.shape[-2] times groups); "
            f"got bias shape {_fmt_shape(b_shape)}"
        )
    window, stride_t, dilation_t = _conv_window(fn, k_shape, nd, stride, dilation)
    out_pad = to_tuple(fn, "output_padding", output_padding, nd, minimum=0)
    for op, s, d in zip(out_pad, stride_t, dilation_t):
        if op >= max(s, d):
            raise ValueError(
                f"{fn}: output_padding must be smaller than the stride or the dilation in every "
                f"dim (it picks one of the stride's input sizes); got output_padding "
                f"{out_pad}, stride {stride_t}, dilation {dilation_t}"
            )
    eff = effective_window(window, dilation_t)
    o = tuple(int(v) for v in y_shape[1:-1])
    if isinstance(padding, str) and padding.upper() == "SAME":
        if any(out_pad):
            raise ValueError(f"{fn}: output_padding must be 0 with padding 'SAME' (the result "
                             f"has size in * stride); got {out_pad}")
        spatial = tuple(v * s for v, s in zip(o, stride_t))
        pads = resolve_padding(fn, "SAME", spatial, eff, stride_t)
    else:
        pads = resolve_padding(fn, padding, o, eff, stride_t)
        spatial = tuple((v - 1) * s - lo - hi + k + op for v, s, (lo, hi), k, op in
                        zip(o, stride_t, pads, eff, out_pad))
    if any(n < 1 for n in spatial):
        raise ValueError(
            f"{fn}: the result would have spatial size {spatial}: the padding {pads} is larger "
            f"than what the window and stride cover; y has shape {_fmt_shape(y_shape)}, "
            f"kernel {_fmt_shape(k_shape)}, stride {stride_t}"
        )
    cfg = WindowConfig(window, stride_t, pads, dilation_t)
    return cfg, (int(y_shape[0]), *spatial, c_x)


def transpose_extra_rows(y_shape, x_shape, cfg: WindowConfig) -> tuple[int, ...]:
    """Rows the convolution of ``x_shape`` has beyond ``y``'s, per spatial dim: nonzero only
    when ``output_padding >= stride`` (allowed below the dilation, as in PyTorch), where the
    extra result rows are ones no entry of ``y`` reaches. ``conv_transpose`` then transposes
    the convolution followed by cropping its output to ``y``'s size."""
    return tuple(o - n for o, n in zip(output_spatial(x_shape[1:-1], cfg), y_shape[1:-1]))


def pool_config(x_shape, window, *, stride, padding, fn: str, dilation=1, ceil_mode=False,
                padding_mode="zeros") -> PoolConfig:
    """Validate a pooling op's arguments. ``stride=None`` means stride = window.

    Returns a :class:`PoolConfig`: the output size follows :func:`pool_output_size`.
    """
    if isinstance(window, (list, tuple)):
        nd = len(window)
    elif is_int(window):
        nd = len(x_shape) - 2
    else:
        raise TypeError(f"{fn}: window must be an int or a tuple of ints; got {window!r}")
    if nd not in (1, 2, 3):
        raise ValueError(
            f"{fn}: window must have 1, 2 or 3 entries (one per spatial dim); got {window!r} "
            f"for x of shape {_fmt_shape(x_shape)}"
        )
    if len(x_shape) != nd + 2:
        raise ValueError(
            f"{fn}: x must have rank {nd + 2}, (N, *spatial, C) with {nd} spatial dims to match "
            f"window {window!r}; got x shape {_fmt_shape(x_shape)} (rank {len(x_shape)})"
        )
    window_t = to_tuple(fn, "window", window, nd)
    stride_t = window_t if stride is None else to_tuple(fn, "stride", stride, nd)
    dilation_t = to_tuple(fn, "dilation", dilation, nd)
    ceil_mode = check_bool(fn, "ceil_mode", ceil_mode)
    spatial = tuple(int(n) for n in x_shape[1:-1])
    eff = effective_window(window_t, dilation_t)
    pads = resolve_padding(fn, padding, spatial, eff, stride_t)
    mode = check_padding_mode(fn, padding_mode, pads, x_shape)
    dilated = any(d > 1 for d in dilation_t)
    what = (f"dilated window {_fmt_shape(eff)} (window {_fmt_shape(window_t)} with dilation "
            f"{dilation_t})") if dilated else f"window {window_t}"
    if mode == "zeros":
        for (lo, hi), k in zip(pads, eff):
            if lo >= k or hi >= k:
                raise ValueError(
                    f"{fn}: padding must be smaller than the window on each side (a window made "
                    f"of padding only has no input to pool); got padding {pads}, {what}"
                )
    plain = WindowConfig(window_t, stride_t, pads, dilation_t)
    _check_fits(fn, "dilated window" if dilated else "window", spatial, plain, x_shape,
                extra=f" (window {_fmt_shape(window_t)} with dilation {dilation_t})"
                if dilated else "")
    if mode == "zeros":
        out = tuple(pool_output_size(n, p, k, s, ceil_mode)
                    for n, p, k, s in zip(spatial, pads, eff, stride_t))
        _check_windows_hold_input(fn, spatial, plain, out, what)
    else:   # the input padded with the mode is pooled with no padding (PyTorch: F.pad, pool)
        out = tuple(pool_output_size(n + lo + hi, (0, 0), k, s, ceil_mode)
                    for n, (lo, hi), k, s in zip(spatial, pads, eff, stride_t))
    over = tuple(max(0, (o - 1) * s + k - (n + lo + hi))
                 for o, s, k, n, (lo, hi) in zip(out, stride_t, eff, spatial, pads))
    fill = (tuple((lo, hi + v) for (lo, hi), v in zip(pads, over)) if mode == "zeros"
            else tuple((0, v) for v in over))
    return PoolConfig(WindowConfig(window_t, stride_t, fill, dilation_t), pads, mode, over)


def _check_windows_hold_input(fn, spatial, cfg: WindowConfig, out, what):
    """Every window must read at least one input element (not only padding).

    Window ``i`` reads padded positions ``i * s + m * d``; the input occupies ``lo .. lo + n -
    1``. A window is a product of its per-dim ranges, so checking each dim is enough.
    """
    for dim, (n, (lo, _), k, d, s, o) in enumerate(zip(spatial, cfg.padding, cfg.window,
                                                       cfg.dilation, cfg.stride, out)):
        pos = np.arange(o)[:, None] * s + np.arange(k)[None, :] * d
        holds = ((pos >= lo) & (pos < lo + n)).any(axis=1)
        if not holds.all():
            i = int(np.argmin(holds))
            raise ValueError(
                f"{fn}: window {i} along spatial dim {dim} reads only padding (positions "
                f"{pos[i].tolist()} of the padded input, whose elements are {lo}..{lo + n - 1}); "
                f"every window needs an input element; got padding {cfg.padding}, {what}, "
                f"stride {cfg.stride}"
            )


def check_padding_mode(fn: str, mode, pads: Pads, x_shape) -> str:
    """``mode`` if it is one of :data:`PADDING_MODES` and ``pads`` respects its limits
    (PyTorch's): ``"reflect"`` pads less than the input size on each side (a reflection
    repeats no element), ``"circular"`` at most the input size (it wraps around once)."""
    mode = check_choice(fn, "padding_mode", mode, PADDING_MODES)
    for dim, ((lo, hi), n) in enumerate(zip(pads, x_shape[1:-1])):
        if mode == "reflect" and max(lo, hi) >= n:
            raise ValueError(
                f"{fn}: reflect padding must be smaller than the input size on each side; "
                f"spatial dim {dim} (x axis {dim + 1}) has size {n} and padding ({lo}, {hi}); "
                f"x has shape {_fmt_shape(x_shape)}"
            )
        if mode == "circular" and max(lo, hi) > n:
            raise ValueError(
                f"{fn}: circular padding must be at most the input size on each side; "
                f"spatial dim {dim} (x axis {dim + 1}) has size {n} and padding ({lo}, {hi}); "
                f"x has shape {_fmt_shape(x_shape)}"
            )
    return mode


def pad_config(fn: str, x_shape, padding, mode) -> Pads:
    """Validate :func:`jaxcnn.padding.pad`'s arguments; return one ``(lo, hi)`` per spatial dim."""
    if len(x_shape) < 3:
        raise ValueError(
            f"{fn}: x must have rank >= 3, (N, *spatial, C); got x shape {_fmt_shape(x_shape)} "
            f"(rank {len(x_shape)})"
        )
    pads = explicit_padding(fn, padding, len(x_shape) - 2)
    check_padding_mode(fn, mode, pads, x_shape)
    return pads


def check_pool_input(fn: str, x_shape) -> int:
    """``x: (N, *spatial, C)`` with 1, 2 or 3 spatial dims; return the number of spatial dims."""
    if len(x_shape) not in (3, 4, 5):
        raise ValueError(
            f"{fn}: x must have rank 3, 4 or 5, (N, *spatial, C) with 1, 2 or 3 spatial dims; "
            f"got x shape {_fmt_shape(x_shape)} (rank {len(x_shape)})"
        )
    return len(x_shape) - 2


def adaptive_windows(fn: str, x_shape, output_size):
    """Adaptive pooling's windows, PyTorch's: output ``i`` of a dim of size ``n`` pooled to
    ``o`` covers ``start = floor(i * n / o)`` to ``end = ceil((i + 1) * n / o)`` (exclusive).

    ``output_size``: an int (every spatial dim) or one per spatial dim, each >= 1 or None (keep
    that dim's size). Windows may overlap and differ in size. Returns, per spatial dim, the
    tuple of ``(start, end)`` pairs.
    """
    nd = check_pool_input(fn, x_shape)
    spatial = tuple(int(n) for n in x_shape[1:-1])
    if isinstance(output_size, (list, tuple)):
        output_size = tuple(n if o is None else o for o, n in zip(output_size, spatial)) + \
            tuple(output_size[nd:])
    out = to_tuple(fn, "output_size", output_size, nd)
    return tuple(tuple(((i * n) // o, -(-((i + 1) * n) // o)) for i in range(o))
                 for n, o in zip(spatial, out))


# --------------------------------------------------------------------------------------------
# Backward paddings, derived once here.


def conv_input_grad_padding(spatial: Sequence[int], cfg: WindowConfig) -> Pads:
    """Padding of the stride-dilated ``dZ`` for ``dX = pad(dilate_s(dZ)) ⋆ rot180(K)``.

    Position ``p`` of the padded input is touched by output ``i`` and kernel tap ``m`` when
    ``p = i * s + m * d``. Correlating the dilated ``dZ`` (length ``(out - 1) * s + 1``) with the
    rotated kernel (dilated length ``k_eff``) at stride 1 gives the full convolution if ``dZ`` is
    padded by ``k_eff - 1`` on both sides; we then drop the ``lo`` forward-padding rows at the
    start and the ``hi`` rows at the end, and add back the ``r`` stride-remainder rows the
    forward never reached (their gradient is zero):

        low  = k_eff - 1 - lo
        high = k_eff - 1 - hi + r,    r = (n + lo + hi - k_eff) mod s

    Either can be negative (a forward padding wider than the window): that means crop.
    """
    out = []
    for n, (lo, hi), k, s in zip(spatial, cfg.padding, cfg.effective_window, cfg.stride):
        r = stride_remainder(n, (lo, hi), k, s)
        out.append((k - 1 - lo, k - 1 - hi + r))
    return tuple(out)


def check_dense(fn: str, x_shape, w_shape, b_shape):
    if len(w_shape) != 2:
        raise ValueError(f"{fn}: w must have rank 2, (D_in, D_out); got w shape {_fmt_shape(w_shape)}")
    if len(x_shape) < 1:
        raise ValueError(f"{fn}: x must have rank >= 1, (..., D_in); got a scalar")
    if x_shape[-1] != w_shape[0]:
        raise ValueError(
            f"{fn}: x features (x.shape[-1]={x_shape[-1]}) must equal w rows "
            f"(w.shape[0]={w_shape[0]}); x has shape {_fmt_shape(x_shape)}, w {_fmt_shape(w_shape)}"
        )
    if b_shape is not None and tuple(b_shape) != (w_shape[1],):
        raise ValueError(
            f"{fn}: b must have shape (D_out,) = ({w_shape[1]},); got b shape {_fmt_shape(b_shape)}"
        )


def check_labels(fn: str, logits_shape, labels_shape, labels_dtype):
    if len(logits_shape) != 2:
        raise ValueError(
            f"{fn}: logits must have rank 2, (N, num_classes); got shape {_fmt_shape(logits_shape)}"
        )
    if not np.issubdtype(np.dtype(labels_dtype), np.integer):
        raise TypeError(f"{fn}: labels must be integers (N,); got dtype {np.dtype(labels_dtype).name}")
    if tuple(labels_shape) != (logits_shape[0],):
        raise ValueError(
            f"{fn}: labels must have shape (N,) = ({logits_shape[0]},) to match logits "
            f"{_fmt_shape(logits_shape)}; got {_fmt_shape(labels_shape)}"
        )


LABEL_VALUES = ("{fn}: {name} must lie in 0..{last}{context}; got values from {low} to {high}: "
                "{first} at index {index} ({count} such labels)")
"""The one message for labels out of range (datasets, IDX files, training, losses)."""


def check_label_values(fn: str, name: str, labels, num_classes: int, *,
                       context: str = "") -> None:
    """``ValueError`` unless every value of the integer labels lies in ``0..num_classes-1``.

    The one label range check of the project (datasets, files, training, losses). ``labels`` is
    a concrete (numpy) integer array of any shape; traced labels cannot be checked. The message
    names ``fn``, the argument ``name``, the allowed range (followed by ``context``, e.g.
    `` for logits of shape (2, 3)``), the first bad value, its (flat) index and how many are
    bad, and the smallest and largest label (:data:`LABEL_VALUES`).
    """
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(LABEL_VALUES.format(
            fn=fn, name=name, context=context, last=num_classes - 1,
            first=labels.flat[bad[0]], index=int(bad[0]), count=bad.size, low=labels.min(),
            high=labels.max()))


# --------------------------------------------------------------------------------------------
# Activations and losses: static numbers, axes, reductions, targets.

REDUCTIONS = ("mean", "sum", "none")


def check_axis(fn: str, name: str, axis, ndim: int) -> int:
    """``axis`` of an array of rank ``ndim`` (``-ndim <= axis < ndim``) as a non-negative int."""
    if not is_int(axis):
        raise TypeError(f"{fn}: {name} must be an int; got {type(axis).__name__} {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{fn}: {name} must lie in [-{ndim}, {ndim}) for x of rank {ndim}; got {axis}")
    return int(axis) % ndim


def check_reduction(fn: str, reduction) -> str:
    """One of :data:`REDUCTIONS`: ``"mean"``, ``"sum"`` or ``"none"`` (no reduction)."""
    return check_choice(fn, "reduction", reduction, REDUCTIONS)


def _dtype_of(a):
    return np.dtype(a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype)


def cross_entropy_labels(fn: str, logits_shape, labels, labels_shape) -> str:
    """Validate ``cross_entropy``'s labels for ``logits: (N, C)``; return their kind:
    ``"int"`` (integer class labels ``(N,)``) or ``"prob"`` (floating probability targets of
    the logits' shape ``(N, C)``)."""
    dtype = _dtype_of(labels)
    if not np.issubdtype(dtype, np.floating) or len(logits_shape) != 2:
        check_labels(fn, logits_shape, labels_shape, dtype)
        return "int"
    if len(labels_shape) == 1:
        raise TypeError(
            f"{fn}: labels must be integers (N,) or floating probability targets of the "
            f"logits' shape (N, C) = {_fmt_shape(logits_shape)}; got {dtype.name} labels of "
            f"shape {_fmt_shape(labels_shape)} (cast class labels to an integer dtype)")
    if tuple(labels_shape) != tuple(logits_shape):
        raise ValueError(
            f"{fn}: probability targets (floating labels) must have the logits' shape (N, C) = "
            f"{_fmt_shape(logits_shape)}; got {_fmt_shape(labels_shape)}")
    return "prob"


def check_targets(fn: str, pred_name: str, pred_shape, name: str, targets) -> None:
    """Floating ``targets`` of exactly the shape of the prediction ``pred_name``."""
    shape = check_array(fn, name, targets)
    if tuple(shape) != tuple(pred_shape):
        raise ValueError(
            f"{fn}: {name} must have the shape of {pred_name} {_fmt_shape(pred_shape)}; got "
            f"{_fmt_shape(shape)}")


# Normalization and dropout, shared by both impls.


def batch_norm_config(x_shape, scale_shape, offset_shape, mean_shape, var_shape, *, train: bool,
                      eps, fn: str = "batch_norm") -> float:
    """Validate ``batch_norm``'s arrays for its mode; return ``eps`` as a float.

    ``x: (N, *spatial, C)`` (rank >= 2); ``scale``, ``offset`` and, in eval mode, ``mean`` and
    ``var``: ``(C,)``. Train mode takes no ``mean`` / ``var`` (it computes them) and needs at
    least one element per channel: the statistics of zero elements are undefined.
    """
    eps = check_float(fn, "eps", eps, minimum=0.0, exclusive_minimum=True)
    if len(x_shape) < 2:
        raise ValueError(
            f"{fn}: x must have rank >= 2, (N, *spatial, C) with channels last; got x shape "
            f"{_fmt_shape(x_shape)}"
        )
    c = x_shape[-1]
    for name, shape in (("scale", scale_shape), ("offset", offset_shape)):
        if tuple(shape) != (c,):
            raise ValueError(
                f"{fn}: {name} must have shape (C,) = ({c},), one entry per channel of x "
                f"{_fmt_shape(x_shape)}; got {name} shape {_fmt_shape(shape)}"
            )
    given = [name for name, s in (("mean", mean_shape), ("var", var_shape)) if s is not None]
    if train:
        if given:
            raise ValueError(
                f"{fn}: mean and var are the statistics of eval mode; train mode (train=True) "
                f"computes the batch statistics and returns them; got {' and '.join(given)}"
            )
        m = int(np.prod(x_shape[:-1]))
        if m == 0:
            raise ValueError(
                f"{fn}: train mode needs at least one element per channel over the batch and "
                f"spatial axes (the statistics of zero elements are undefined); got x shape "
                f"{_fmt_shape(x_shape)}"
            )
        return eps
    for name, shape in (("mean", mean_shape), ("var", var_shape)):
        if shape is None:
            raise ValueError(
                f"{fn}: eval mode (train=False) needs mean and var, the statistics to normalize "
                f"with (for instance a BatchNorm layer's running averages); got no {name}"
            )
        if tuple(shape) != (c,):
            raise ValueError(
                f"{fn}: {name} must have shape (C,) = ({c},), one entry per channel of x "
                f"{_fmt_shape(x_shape)}; got {name} shape {_fmt_shape(shape)}"
            )
    return eps


def layer_norm_config(x_shape, scale_shape, offset_shape, *, axes, eps,
                      fn: str = "layer_norm") -> tuple[tuple[int, ...], float]:
    """Validate ``layer_norm``'s arguments; return the normalized axes (sorted, non-negative)
    and ``eps``. ``scale`` and ``offset`` have the shape of ``x`` on those axes, in order."""
    eps = check_float(fn, "eps", eps, minimum=0.0, exclusive_minimum=True)
    norm = normalize_axes(fn, axes, x_shape)
    feature = tuple(x_shape[a] for a in norm)
    if int(np.prod(feature)) == 0:
        raise ValueError(
            f"{fn}: the normalized axes {norm} of x {_fmt_shape(x_shape)} hold no element (the "
            f"statistics of zero elements are undefined)"
        )
    for name, shape in (("scale", scale_shape), ("offset", offset_shape)):
        if tuple(shape) != feature:
            raise ValueError(
                f"{fn}: {name} must have the shape of x on the normalized axes {norm}, "
                f"{_fmt_shape(feature)}; got {name} shape {_fmt_shape(shape)}"
            )
    return norm, eps


def normalize_axes(fn: str, axes, x_shape, *, name: str = "x") -> tuple[int, ...]:
    """``axes`` (an int or a non-empty tuple of ints, negative counting from the end) as sorted
    non-negative axes of an array of shape ``x_shape``, each at most once."""
    rank = len(x_shape)
    if rank < 1:
        raise ValueError(f"{fn}: {name} must have rank >= 1; got a scalar")
    raw = tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)
    if not raw or not all(is_int(a) for a in raw):
        raise TypeError(f"{fn}: axes must be an int or a non-empty tuple of ints; got {axes!r}")
    if any(not -rank <= a < rank for a in raw):
        raise ValueError(
            f"{fn}: axes must lie in [-{rank}, {rank - 1}] for {name} of shape "
            f"{_fmt_shape(x_shape)}; got {axes!r}"
        )
    norm = tuple(sorted(int(a) % rank for a in raw))
    if len(set(norm)) != len(norm):
        raise ValueError(f"{fn}: axes must not repeat an axis; got {axes!r} for {name} of rank "
                         f"{rank}")
    return norm


def check_rate(fn: str, rate) -> float:
    """A dropout rate: the probability of dropping, a finite number in [0, 1]."""
    return check_float(fn, "rate", rate, minimum=0.0, maximum=1.0,
                       meaning=" (the probability of dropping an element)")


def check_key(fn: str, name: str, key):
    """A JAX PRNG key: a typed key (``jax.random.key``) or a raw ``uint32`` key
    (``jax.random.PRNGKey``) of shape ``(2,)``; else ``TypeError``."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{fn}: {name} must be a single PRNG key; got a key array of shape "
                             f"{_fmt_shape(key.shape)}")
        return key
    if dtype is not None and np.dtype(dtype) == np.uint32 and tuple(key.shape) == (2,):
        return key
    raise TypeError(
        f"{fn}: {name} must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)); "
        f"got {type(key).__name__}"
        + (f" of dtype {dtype} and shape {_fmt_shape(key.shape)}" if dtype is not None else "")
    )
