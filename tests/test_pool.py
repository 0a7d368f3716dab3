"""Pooling (max_pool, avg_pool, global and adaptive pooling): both impls against lax, finite
differences, max-pool ties and NaN, errors, the nn layers.

Sections: the deliberate grid (and its new arguments: dilation, ceil_mode, padding modes, the
tie rule, windows large enough for the tap loop), property tests, padding modes against
jnp.pad followed by a VALID pool, ceil_mode by hand, dilation by hand with finite differences
and the adjoint test, global and adaptive pooling, second-order finite differences, max-pool
ties (both rules) and NaN, bad input, the nn layers. Max pooling's main checks use distinct
values; the tie rules have their own tests.
"""

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxcnn as jc
from jaxcnn import _shapes, _windows
from jaxcnn.nn import (AdaptiveAvgPool, AdaptiveMaxPool, AvgPool, GlobalAvgPool, GlobalMaxPool,
                       MaxPool)
from jaxcnn.pooling import _max_pool_manual_forward, mode_pad

from conftest import (GRID_NDS, GRID_PADDINGS, GRID_SPATIAL, IMPLS, assert_close,
                      bad_input_test, compare_impls, sampled, grid_padding, unique_values)

X = np.zeros((2, 8, 8, 3), np.float32)


# --------------------------------------------------------------------------------------------
# The deliberate grid: forward manual == lax and jax.grad through manual == through lax.


def _pool_cases():
    cases = []
    for i, (nd, s, p) in enumerate(itertools.product(GRID_NDS, (None, 1, 2, 3), GRID_PADDINGS)):
        kind = ("max", "avg", "avg_exclude_pad")[i % 3]
        window = (2, 3)[i % 2]
        batch = (1, 3)[(i // 2) % 2]
        dtype = ("float64", "float32")[(i // 3) % 2]
        cases.append((kind, nd, s, p, window, batch, dtype))
    return cases


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("kind,nd,stride,padding,window,batch,dtype", sampled(_pool_cases()))
def test_pool_grid(kind, nd, stride, padding, window, batch, dtype):
    # Unique values (a permutation) for max pooling: ties have their own tests.
    x = unique_values((batch, *GRID_SPATIAL[nd], 3), seed=0, step=1 / 7.0).astype(dtype)
    pad = grid_padding(padding, nd)
    if isinstance(pad, tuple):
        pad = tuple((min(lo, window - 1), min(hi, window - 1)) for lo, hi in pad)

    def op(x, impl):
        if kind == "max":
            return jc.max_pool(x, window, stride=stride, padding=pad, impl=impl)
        return jc.avg_pool(x, window, stride=stride, padding=pad, impl=impl,
                           count_include_pad=(kind == "avg"))

    compare_impls(op, (x,), dtype)


# The new arguments, deliberately: dilation, ceil_mode (with and without padding), every
# padding mode, the "split" tie rule, strides that do not divide, overlapping windows, and
# windows above _windows.UNROLL_TAPS taps (5x5, 7x7, 3x3x3: the tap loop).
NEW_ARGUMENTS = [
    # (kind, nd, window, arguments, dtype)
    ("avg", 2, 3, dict(stride=2, dilation=(2, 1), padding=2), "float32"),
    ("avg_exclude", 1, 3, dict(stride=2, dilation=2, padding=((1, 2),)), "float64"),
    ("max_split", 3, 2, dict(stride=1, dilation=(1, 2, 1), padding=1), "float64"),
    ("max_split", 2, 3, dict(stride=2, padding="SAME"), "float32"),
    ("max", 2, 3, dict(stride=2, padding=1, ceil_mode=True), "float32"),
    ("avg_exclude", 2, (2, 3), dict(stride=2, padding=((1, 0), (0, 2)), ceil_mode=True),
     "float64"),
    ("max", 2, 3, dict(stride=2, padding=2, padding_mode="reflect"), "float64"),
    ("avg", 2, 2, dict(padding=((1, 0), (0, 1)), padding_mode="circular", ceil_mode=True),
     "float32"),
    ("max_split", 3, 2, dict(stride=1, padding=1, padding_mode="replicate"), "float64"),
    ("avg_exclude", 3, 3, dict(stride=2, padding=1, ceil_mode=True), "float64"),
    ("max", 2, 7, dict(stride=1, padding="SAME"), "float32"),
    ("max_split", 2, 5, dict(stride=3, padding=2, ceil_mode=True), "float64"),
    ("max", 3, 3, dict(stride=(1, 2, 1), padding=1, padding_mode="circular"), "float64"),
]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("kind,nd,window,arguments,dtype", sampled(NEW_ARGUMENTS, 2, (0,)))
def test_pool_grid_new_arguments(kind, nd, window, arguments, dtype):
    x = unique_values((2, *GRID_SPATIAL[nd], 2), seed=3, step=1 / 7.0).astype(dtype)

    def op(x, impl):
        if kind.startswith("max"):
            return jc.max_pool(x, window, impl=impl, ties=kind[4:] or "first", **arguments)
        return jc.avg_pool(x, window, impl=impl, count_include_pad=(kind == "avg"),
                           **arguments)

    compare_impls(op, (x,), dtype)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("kind,x_shape,window,arguments", [
    ("avg_exclude", (2, 7, 8, 6, 3), 3, dict(stride=(2, 1, 3), padding=1, ceil_mode=True)),
    ("max", (1, 11, 9, 2), (5, 4), dict(stride=(2, 1), dilation=(1, 2), padding="SAME")),
    ("avg", (2, 9, 10, 2), (1, 17), dict(stride=(3, 1), padding=((0, 0), (8, 8)))),
])
def test_windows_past_the_unroll_reduce_dim_by_dim(kind, x_shape, window, arguments):
    """Above UNROLL_TAPS taps the forward reduces one dim at a time (_windows.reduce_taps):
    its own stride, dilation and window per dim, ceil mode and the padding-excluded counts;
    a dim of 17 taps runs its own loop, a dim of 1 with a stride still strides."""
    window_taps = np.prod(np.broadcast_to(window, (len(x_shape) - 2,)))
    assert window_taps > _windows.UNROLL_TAPS
    x = unique_values(x_shape, seed=4, step=1 / 7.0)

    def op(x, impl):
        if kind == "max":
            return jc.max_pool(x, window, impl=impl, **arguments)
        return jc.avg_pool(x, window, impl=impl, count_include_pad=(kind == "avg"),
                           **arguments)

    compare_impls(op, (x,), "float64")


def test_large_windows_do_not_grow_the_program():
    # Above UNROLL_TAPS taps the backward's per-tap work runs in a loop, and the forward reduces
    # one dim at a time (_windows.reduce_taps), each dim's taps written out up to UNROLL_TAPS
    # and looped above. So a 9x9 window's program grows by the 8 more taps of its two dims
    # over a 5x5 one's (written out tap by tap, it would be 81 / 25 times one tap's code), and
    # past UNROLL_TAPS per dim it does not grow at all.
    def size(window):
        x = jax.ShapeDtypeStruct((1, 40, 40, 1), np.float32)
        loss = lambda x: jnp.sum(jc.max_pool(x, window, stride=1, ties="split",  # noqa: E731
                                             impl="manual"))
        return len(str(jax.make_jaxpr(jax.grad(loss))(x)))

    assert 5 * 5 > _windows.UNROLL_TAPS and 17 > _windows.UNROLL_TAPS
    assert size(9) <= 1.2 * size(5)
    assert size(33) <= 1.05 * size(17)


# --------------------------------------------------------------------------------------------
# Property tests: over random valid configurations (the conftest hypothesis profile is
# derandomized and bounded: the same examples on every run), manual == lax.


@st.composite
def pool_configs(draw):
    nd = draw(st.integers(1, 3))
    window = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = draw(st.one_of(st.none(), st.tuples(*[st.integers(1, 3) for _ in range(nd)])))
    padding = draw(st.one_of(
        st.sampled_from(["VALID", "SAME"]),
        st.tuples(*[st.tuples(st.integers(0, w - 1), st.integers(0, w - 1)) for w in window])))
    spatial = tuple(draw(st.integers(w, w + 4)) for w in window)
    return dict(x=(draw(st.integers(1, 2)), *spatial, 2), window=window, stride=stride,
                padding=padding, kind=draw(st.sampled_from(["max", "avg", "avg_exclude_pad"])))


@pytest.mark.usefixtures("x64")
@given(pool_configs())
def test_pool_manual_equals_lax(cfg):
    x = unique_values(cfg["x"], seed=2, step=1 / 3.0)                      # distinct values
    static = dict(stride=cfg["stride"], padding=cfg["padding"])
    if cfg["kind"] == "max":
        f = lambda x, impl: jc.max_pool(x, cfg["window"], impl=impl, **static)   # noqa: E731
    else:
        f = lambda x, impl: jc.avg_pool(x, cfg["window"], impl=impl,              # noqa: E731
                                        count_include_pad=cfg["kind"] == "avg", **static)
    compare_impls(f, (x,), "float64")


# --------------------------------------------------------------------------------------------
# Padding modes: the same as jnp.pad(mode=...) followed by a pool with no padding.

NUMPY_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("kind,mode,padding,ceil_mode", [
    ("max", "reflect", ((2, 1), (1, 2)), False), ("avg", "replicate", 1, True),
    ("avg_exclude", "circular", "SAME", True)])
def test_padding_mode_is_pad_then_valid_pool(kind, mode, padding, ceil_mode):
    x = unique_values((2, 6, 7, 2), seed=4, step=1 / 7.0)
    # SAME for a 3x3 window at stride 2: 6 -> (0, 1), 7 -> (1, 1).
    pads = ((0, 1), (1, 1)) if padding == "SAME" else grid_padding(padding, 2)
    pads = ((pads, pads),) * 2 if isinstance(pads, int) else pads

    def pool(x, impl, **kw):    # count_include_pad has no effect: padded values are real
        if kind == "max":
            return jc.max_pool(x, 3, stride=2, ceil_mode=ceil_mode, impl=impl, **kw)
        return jc.avg_pool(x, 3, stride=2, ceil_mode=ceil_mode, impl=impl,
                           count_include_pad=kind == "avg", **kw)

    fs = {impl: partial(pool, impl=impl, padding=padding, padding_mode=mode) for impl in IMPLS}
    fs["reference"] = lambda x: pool(jnp.pad(x, ((0, 0), *pads, (0, 0)),
                                             mode=NUMPY_MODES[mode]), "lax")
    out = jax.jit(lambda x: {k: (f(x), jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x))
                             for k, f in fs.items()})(x)
    for impl in IMPLS:
        assert_close(out[impl][0], out["reference"][0], "float64", f"{impl} forward")
        assert_close(out[impl][1], out["reference"][1], "float64", f"{impl} gradient")


# --------------------------------------------------------------------------------------------
# ceil_mode: PyTorch's output size, and the divisor of windows that run past the padded input.

# (n, padding, window, stride, floor size, ceil size), each worked out by hand; positions in
# padded coordinates, the input at lo .. lo + n - 1.
CEIL_SIZES = [
    (5, (0, 0), 2, 2, 2, 3),    # windows 0-1, 2-3, and 4 (+1 past the input): kept
    (6, (0, 0), 2, 2, 3, 3),    # exact: ceil changes nothing
    (5, (1, 1), 2, 2, 3, 3),    # rounding up would add a window at 6-7, starting in the right
                                # padding (6 >= n + lo = 6): dropped
    (6, (1, 1), 3, 2, 3, 4),    # the 4th window (6-8) starts on the last input element (6)
    (7, (0, 0), 3, 3, 2, 3),    # windows 0-2, 3-5, 6-8: the last holds one input element
    (4, (1, 0), 2, 4, 1, 2),    # windows 0-1, 4-5: the second starts on the last input
                                # element (4 < n + lo = 5) and runs 1 past the padded input
    (4, (0, 2), 3, 2, 2, 2),    # windows 0-2, 2-4: a third at 4 would start in the padding
    (8, (2, 2), 5, 4, 2, 3),    # 0-4, 4-8, 8-12 (starts at 8 < n + lo = 10): kept
]


@pytest.mark.parametrize("n,padding,window,stride,floor_size,ceil_size", CEIL_SIZES)
def test_ceil_mode_output_size(n, padding, window, stride, floor_size, ceil_size):
    assert _shapes.pool_output_size(n, padding, window, stride, False) == floor_size
    assert _shapes.pool_output_size(n, padding, window, stride, True) == ceil_size
    x = jax.ShapeDtypeStruct((1, n, 1), np.float32)
    for impl in IMPLS:
        for ceil_mode, size in ((False, floor_size), (True, ceil_size)):
            for op in (jc.max_pool, jc.avg_pool):
                out = jax.eval_shape(lambda x: op(x, window, stride=stride, padding=(padding,),
                                                  ceil_mode=ceil_mode, impl=impl), x)
                assert out.shape == (1, size, 1)


# x = [1, 2, 3, 4, 5, 6], window 3, stride 2, padding 1, ceil_mode: windows (padded positions)
# 0-2 = [pad, 1, 2], 2-4 = [2, 3, 4], 4-6 = [4, 5, 6], 6-8 = [6, pad, past the padded input].
# PyTorch divides by the elements inside the padded input (count_include_pad=True: 3, 3, 3, 2)
# or by the input elements (False: 2, 3, 3, 1).
CEIL_VALUES = {
    "max": ([2, 4, 6, 6], [0, 1, 0, 1, 0, 2]),
    "avg": ([1, 3, 5, 3], [1 / 3, 2 / 3, 1 / 3, 2 / 3, 1 / 3, 1 / 3 + 1 / 2]),
    "avg_exclude": ([1.5, 3, 5, 6], [1 / 2, 1 / 2 + 1 / 3, 1 / 3, 2 / 3, 1 / 3, 1 / 3 + 1]),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("kind", sorted(CEIL_VALUES))
def test_ceil_mode_by_hand(kind):
    x = np.arange(1.0, 7.0).reshape(1, 6, 1)
    values, grad = CEIL_VALUES[kind]
    for impl in IMPLS:
        if kind == "max":
            f = lambda x: jc.max_pool(x, 3, stride=2, padding=1, ceil_mode=True,  # noqa: E731
                                      impl=impl)
        else:
            f = lambda x: jc.avg_pool(x, 3, stride=2, padding=1, ceil_mode=True,  # noqa: E731
                                      count_include_pad=kind == "avg", impl=impl)
        np.testing.assert_allclose(f(x)[0, :, 0], values, rtol=1e-15, err_msg=impl)
        np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(f(x)))(x)[0, :, 0], grad,
                                   rtol=1e-15, err_msg=impl)


@pytest.mark.usefixtures("x64")
def test_ceil_mode_window_that_would_start_in_the_padding():
    # x = [1 .. 5], window 2, stride 2, padding 1: windows [pad, 1], [2, 3], [4, 5]; a 4th
    # window would start in the right padding and is dropped. max: [1, 3, 5]; avg (counting
    # the padding): [0.5, 2.5, 4.5]; avg without it: [1, 2.5, 4.5].
    x = np.arange(1.0, 6.0).reshape(1, 5, 1)
    for impl in IMPLS:
        kw = dict(stride=2, padding=1, ceil_mode=True, impl=impl)
        np.testing.assert_array_equal(jc.max_pool(x, 2, **kw)[0, :, 0], [1, 3, 5])
        np.testing.assert_array_equal(jc.avg_pool(x, 2, **kw)[0, :, 0], [0.5, 2.5, 4.5])
        np.testing.assert_array_equal(
            jc.avg_pool(x, 2, count_include_pad=False, **kw)[0, :, 0], [1, 2.5, 4.5])
    # With a padding mode the padded input has no padding left (PyTorch: F.pad, then pool):
    # [2 | 1 2 3 4 5 | 4] (reflect) gives windows [2, 1], [2, 3], [4, 5], [4]: 4 outputs.
    for impl in IMPLS:
        out = jc.max_pool(x, 2, stride=2, padding=1, ceil_mode=True, padding_mode="reflect",
                          impl=impl)
        np.testing.assert_array_equal(out[0, :, 0], [2, 3, 5, 4])


# --------------------------------------------------------------------------------------------
# Window dilation: by hand, finite differences and the adjoint test (lax has no gradient for a
# dilated max reduce_window: the lax path differentiates the explicit forward).


@pytest.mark.usefixtures("x64")
def test_dilation_by_hand():
    # x = [1 .. 7], window 2, dilation 3, stride 1: windows (0, 3), (1, 4), (2, 5), (3, 6).
    x = np.arange(1.0, 8.0).reshape(1, 7, 1)
    for impl in IMPLS:
        kw = dict(stride=1, dilation=3, impl=impl)
        np.testing.assert_array_equal(jc.max_pool(x, 2, **kw)[0, :, 0], [4, 5, 6, 7])
        np.testing.assert_array_equal(jc.avg_pool(x, 2, **kw)[0, :, 0], [2.5, 3.5, 4.5, 5.5])
        g = jax.grad(lambda x: jnp.sum(jc.max_pool(x, 2, **kw) * jnp.arange(1.0, 5.0)[:, None]))
        np.testing.assert_array_equal(g(x)[0, :, 0], [0, 0, 0, 1, 2, 3, 4])
        g = jax.grad(lambda x: jnp.sum(jc.avg_pool(x, 2, **kw)))
        np.testing.assert_array_equal(g(x)[0, :, 0], [0.5, 0.5, 0.5, 1, 0.5, 0.5, 0.5])


def test_lax_has_no_gradient_for_a_dilated_max_reduce_window():
    # Why the lax path needs its explicit forward: if this starts to pass, JAX grew the rule
    # and max_pool's lax path can use reduce_window again.
    x = jnp.ones((1, 7, 1))
    f = lambda x: jnp.sum(jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 1),  # noqa
                                                (1, 1, 1), "VALID", window_dilation=(1, 2, 1)))
    with pytest.raises(NotImplementedError):
        jax.grad(f)(x)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("window,kw", [
    ((2, 3), dict(stride=(2, 1), dilation=(3, 2), padding=((1, 2), (0, 1)), ceil_mode=True)),
    (5, dict(stride=2, dilation=(1, 2), padding=((2, 2), (4, 4)))),        # the tap loop
], ids=["2x3-d(3,2)-ceil", "5x5-d(1,2)-loop"])
def test_dilated_max_pool_finite_differences_and_adjoint(window, kw):
    x = unique_values((2, 9, 10, 2), seed=5, step=0.1, centred=True)
    f = lambda x: jc.max_pool(x, window, impl="manual", **kw)  # noqa: E731
    pc = _shapes.pool_config(x.shape, window, fn="max_pool", **kw)
    forward = lambda x: _max_pool_manual_forward(mode_pad(x, pc, "plain"), pc.win)  # noqa
    # (b) autodiff of the plain manual forward, (d) finite differences, (e) the adjoint test.
    result = jc.check_vjp(f, forward, x)
    assert result, str(result)
    assert {k for a in result.args for k, c in a.comparisons.items() if c is not None} == {
        "reference_grad", "finite_diff", "adjoint"}


# --------------------------------------------------------------------------------------------
# Global and adaptive pooling.


@pytest.mark.usefixtures("x64")
def test_global_pools_by_hand():
    x = np.array([[[1.0, -2.0], [4.0, 0.0]], [[3.0, 5.0], [2.0, -1.0]]]).reshape(1, 2, 2, 2)
    x = np.moveaxis(x, 1, -1).reshape(1, 2, 2, 2)     # channel 0: [[1, 3], [-2, 5]] ...
    for impl in IMPLS:
        np.testing.assert_array_equal(jc.global_avg_pool(x, impl=impl), x.mean(axis=(1, 2)))
        np.testing.assert_array_equal(jc.global_max_pool(x, impl=impl), x.max(axis=(1, 2)))
        g = jax.grad(lambda x: jnp.sum(jc.global_avg_pool(x, impl=impl) * np.array([1.0, 2.0])))
        np.testing.assert_array_equal(g(x), np.broadcast_to([0.25, 0.5], x.shape))
        g = jax.grad(lambda x: jnp.sum(jc.global_max_pool(x, impl=impl) * np.array([1.0, 2.0])))
        want = (x == x.max(axis=(1, 2), keepdims=True)) * np.array([1.0, 2.0])
        np.testing.assert_array_equal(g(x), want)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("nd,dtype", [(2, "float32"), (3, "float64")])
def test_global_pools_manual_equals_lax(nd, dtype):
    x = unique_values((2, *GRID_SPATIAL[nd], 3), seed=6, step=1 / 7.0).astype(dtype)
    compare_impls(lambda x, impl: jnp.concatenate([
        jc.global_avg_pool(x, impl=impl), jc.global_max_pool(x, impl=impl),
        jc.global_max_pool(x, ties="split", impl=impl)], axis=-1), (x,), dtype)


def test_adaptive_windows_by_hand():
    # PyTorch's start = floor(i·n/o), end = ceil((i+1)·n/o).
    def windows(n, o):
        return _shapes.adaptive_windows("f", (1, n, 1), o)[0]
    assert windows(7, 3) == ((0, 3), (2, 5), (4, 7))               # overlapping
    assert windows(8, 4) == ((0, 2), (2, 4), (4, 6), (6, 8))       # even: a plain 2/2 pool
    assert windows(5, 3) == ((0, 2), (1, 4), (3, 5))               # sizes 2, 3, 2
    assert windows(2, 5) == ((0, 1), (0, 1), (0, 2), (1, 2), (1, 2))   # larger than the input
    assert windows(6, 1) == ((0, 6),)                              # global
    assert _shapes.adaptive_windows("f", (1, 4, 6, 1), (None, 2)) == (
        ((0, 1), (1, 2), (2, 3), (3, 4)), ((0, 3), (3, 6)))        # None keeps the size


@pytest.mark.usefixtures("x64")
def test_adaptive_pools_by_hand():
    # x = [0 .. 6] pooled to 3: windows [0, 3), [2, 5), [4, 7) overlap at 2 and 4.
    x = np.arange(7.0).reshape(1, 7, 1)
    for impl in IMPLS:
        np.testing.assert_allclose(jc.adaptive_avg_pool(x, 3, impl=impl)[0, :, 0], [1, 3, 5],
                                   rtol=1e-15)
        np.testing.assert_array_equal(jc.adaptive_max_pool(x, 3, impl=impl)[0, :, 0], [2, 4, 6])
        g = jax.grad(lambda x: jnp.sum(jc.adaptive_avg_pool(x, 3, impl=impl)))(x)
        np.testing.assert_allclose(g[0, :, 0], np.array([1, 1, 2, 1, 2, 1, 1]) / 3, rtol=1e-15)
        g = jax.grad(lambda x: jnp.sum(jc.adaptive_max_pool(x, 3, impl=impl)))(x)
        np.testing.assert_array_equal(g[0, :, 0], [0, 0, 1, 0, 1, 0, 1])
        # Larger than the input: [a, b] to 5 is [a, a, (a+b)/2, b, b] / max [a, a, b, b, b].
        y = np.array([2.0, 6.0]).reshape(1, 2, 1)
        np.testing.assert_array_equal(jc.adaptive_avg_pool(y, 5, impl=impl)[0, :, 0],
                                      [2, 2, 4, 6, 6])
        g = jax.grad(lambda y: jnp.sum(jc.adaptive_max_pool(y, 5, impl=impl)))(y)
        np.testing.assert_array_equal(g[0, :, 0], [2, 3])


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("nd,size,dtype", [
    (1, 4, "float64"), (2, (9, 3), "float32"), (3, (2, 4, 3), "float64")])
def test_adaptive_pools_manual_equals_lax(nd, size, dtype):
    x = unique_values((2, *GRID_SPATIAL[nd], 2), seed=7, step=1 / 7.0).astype(dtype)
    compare_impls(lambda x, impl: jnp.concatenate([
        jc.adaptive_avg_pool(x, size, impl=impl), jc.adaptive_max_pool(x, size, impl=impl),
        jc.adaptive_max_pool(x, size, ties="split", impl=impl)], axis=-1), (x,), dtype)


@pytest.mark.usefixtures("x64")
def test_global_and_adaptive_finite_differences():
    x = unique_values((1, 5, 7, 2), step=0.1, centred=True) + 0.05
    check_grads(lambda x: jnp.concatenate([
        jc.global_avg_pool(x, impl="manual"), jc.global_max_pool(x, impl="manual"),
        jc.adaptive_avg_pool(x, (2, 3), impl="manual").reshape(1, -1),
        jc.adaptive_max_pool(x, (3, 4), ties="split", impl="manual").reshape(1, -1)], axis=-1),
        (x,), order=1, modes=["rev"])


# --------------------------------------------------------------------------------------------
# Finite differences, second order, reverse mode (forward mode cannot go through a custom_vjp).


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("op", [
    lambda x: jc.max_pool(x, 2, impl="manual"),
    lambda x: jc.max_pool(x, 3, stride=1, padding="SAME", impl="manual"),
    lambda x: jc.avg_pool(x, 3, stride=2, padding=1, count_include_pad=False, impl="manual"),
    lambda x: jc.avg_pool(x, (2, 3), impl="manual"),
], ids=["max_pool", "max_pool_overlap", "avg_pool_exclude", "avg_pool"])
def test_pool_check_grads_second_order(op):
    # Distinct values 0.1 apart: no ties within the finite-difference step.
    x = unique_values((2, 6, 7, 2), step=0.1, centred=True) + 0.05
    check_grads(op, (x,), order=2, modes=["rev"])


# --------------------------------------------------------------------------------------------
# Max-pool ties: the first maximum in row-major window order takes the gradient. NaN as lax.


def _max_pool_grad_oracle(x, window, stride, dz):
    """Plain loops: each window's gradient goes to its first maximum (row-major)."""
    n, h, w, c = x.shape
    dx = np.zeros_like(x)
    oh, ow = dz.shape[1:3]
    for b, i, j, ch in itertools.product(range(n), range(oh), range(ow), range(c)):
        win = x[b, i * stride:i * stride + window, j * stride:j * stride + window, ch]
        m, q = np.unravel_index(np.argmax(win), win.shape)    # argmax: first occurrence
        dx[b, i * stride + m, j * stride + q, ch] += dz[b, i, j, ch]
    return dx


TIE_INPUTS = {
    "constant": lambda rng: np.ones((2, 6, 6, 2)),
    "after relu": lambda rng: np.maximum(rng.normal(size=(2, 6, 6, 2)), 0),
    "rounded": lambda rng: np.round(rng.normal(size=(2, 6, 6, 2))),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("window,stride", [(2, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("name", sorted(TIE_INPUTS))
def test_max_pool_ties_follow_the_first_maximum(name, window, stride):
    rng = np.random.default_rng(0)
    x = TIE_INPUTS[name](rng)
    # Integer cotangents: sums over overlapping windows are exact in any order, so the
    # comparison can be exact too (where the gradient goes must agree, not only roughly).
    dz = rng.integers(-9, 10, size=jc.max_pool(x, window, stride=stride).shape).astype(float)
    expected = _max_pool_grad_oracle(x, window, stride, dz)
    for impl in IMPLS:
        _, vjp = jax.vjp(lambda x: jc.max_pool(x, window, stride=stride, impl=impl), x)
        np.testing.assert_array_equal(vjp(dz)[0], expected, err_msg=impl)


@pytest.mark.usefixtures("x64")
def test_max_pool_one_element_winning_several_windows_gets_the_sum():
    x = np.zeros((1, 5, 5, 1))
    x[0, 2, 2, 0] = 9.0                                       # inside all nine 3x3 windows
    g = jax.grad(lambda x: jnp.sum(jc.max_pool(x, 3, stride=1, impl="manual")))(x)
    assert g[0, 2, 2, 0] == 9.0 and np.sum(g) == 9.0


@pytest.mark.usefixtures("x64")
def test_max_pool_nan_matches_lax():
    x = np.random.default_rng(0).normal(size=(1, 4, 4, 1))
    x[0, 0, 1, 0] = x[0, 1, 0, 0] = x[0, 3, 3, 0] = np.nan
    outs = {}
    for impl in IMPLS:
        outs[impl] = jax.value_and_grad(lambda x: jnp.nansum(jc.max_pool(x, 2, impl=impl)))(x)
    np.testing.assert_array_equal(outs["manual"][1], outs["lax"][1])
    assert np.isnan(jc.max_pool(x, 2, impl="manual")[0, 0, 0, 0])


def _tie_oracle(x, windows_of, dz, rule):
    """Plain loops over every output position and channel: ``windows_of(i, j)`` lists the
    window's (row, col) positions in row-major order; "first" sends dZ to the first maximum
    (np.argmax: the first occurrence), "split" gives every maximum an equal share."""
    dx = np.zeros_like(x)
    oh, ow = dz.shape[1:3]
    n, c_in = x.shape[0], x.shape[-1]
    for b, i, j, c in itertools.product(range(n), range(oh), range(ow), range(c_in)):
        pos = windows_of(i, j)
        vals = np.array([x[b, r, q, c] for r, q in pos])
        winners = [pos[np.argmax(vals)]] if rule == "first" else \
            [p for p, v in zip(pos, vals) if v == vals.max()]
        for r, q in winners:
            dx[b, r, q, c] += dz[b, i, j, c] / len(winners)
    return dx


def _pool_windows(window, stride, dilation):
    return lambda i, j: [(i * stride + m * dilation, j * stride + q * dilation)
                         for m in range(window) for q in range(window)]


def _adaptive_windows_of(x_shape, size):
    rows, cols = _shapes.adaptive_windows("f", x_shape, size)
    return lambda i, j: [(r, q) for r in range(*rows[i]) for q in range(*cols[j])]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("op,rule", sampled([
    ("2/2", "split"), ("3/1", "split"), ("3/1 dilation 2", "split"), ("3/1 dilation 2", "first"),
    ("5/1 (tap loop)", "first"), ("5/1 (tap loop)", "split"), ("global", "split"),
    ("global", "first"), ("adaptive (4, 3)", "first"), ("adaptive (4, 3)", "split")], 2, (0,)))
def test_tie_rules(op, rule):
    # "first" on plain windows (2/2, 3/1, 3/2) is test_max_pool_ties_follow_the_first_maximum.
    rng = np.random.default_rng(1)
    x = np.concatenate([f(rng) for f in TIE_INPUTS.values()], axis=0)
    if op == "global":
        f = lambda x, impl: jc.global_max_pool(x, ties=rule, impl=impl)[:, None, None]  # noqa
        windows_of = lambda i, j: [(r, q) for r in range(6) for q in range(6)]  # noqa: E731
    elif op.startswith("adaptive"):
        f = lambda x, impl: jc.adaptive_max_pool(x, (4, 3), ties=rule, impl=impl)  # noqa
        windows_of = _adaptive_windows_of(x.shape, (4, 3))
    else:
        window, stride = int(op[0]), int(op[2])
        dilation = 2 if "dilation" in op else 1
        f = lambda x, impl: jc.max_pool(x, window, stride=stride, dilation=dilation,  # noqa
                                        ties=rule, impl=impl)
        windows_of = _pool_windows(window, stride, dilation)
    dz = rng.integers(-9, 10, size=jax.eval_shape(lambda x: f(x, "lax"), x).shape).astype(float)
    expected = _tie_oracle(x, windows_of, dz, rule)
    got = jax.jit(lambda x, dz: {impl: jax.vjp(lambda x: f(x, impl), x)[1](dz)[0]
                                 for impl in IMPLS})(x, dz)
    for impl in IMPLS:
        np.testing.assert_allclose(got[impl], expected, rtol=1e-14, atol=1e-14, err_msg=impl)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("op", [
    lambda x, impl: jc.global_max_pool(x, impl=impl),
    lambda x, impl: jc.max_pool(x, 2, stride=1, dilation=2, impl=impl),
    lambda x, impl: jc.max_pool(x, 5, stride=1, padding=2, impl=impl),
], ids=["global", "dilated", "5x5 tap loop"])
def test_nan_with_ties_first_follows_the_select_rule(op):
    # The global pool's and the 5x5's lax path is reduce_window (XLA's select_and_scatter);
    # the dilated one differentiates the explicit forward (first_max_index, vectorized).
    x = np.round(np.random.default_rng(3).normal(size=(2, 5, 5, 2)))
    x[np.random.default_rng(4).random(x.shape) < 0.2] = np.nan
    dz = np.random.default_rng(5).integers(
        -9, 10, size=jax.eval_shape(lambda x: op(x, "lax"), x).shape).astype(float)

    @jax.jit
    def both(x, dz):
        out = {}
        for impl in IMPLS:
            z, vjp = jax.vjp(lambda x: op(x, impl), x)
            out[impl] = (z, vjp(dz)[0])
        return out

    out = both(x, dz)
    np.testing.assert_array_equal(out["manual"][0], out["lax"][0])
    np.testing.assert_array_equal(out["manual"][1], out["lax"][1])
    assert np.isnan(out["manual"][0]).any()


@pytest.mark.usefixtures("x64")
def test_nan_with_ties_split_shares_among_the_nans():
    # A window [NaN, 1, NaN, 0]: its maximum is NaN and the NaNs share the gradient (PyTorch's
    # rule; jnp.max's gradient would be NaN everywhere in the window).
    x = np.array([np.nan, 1.0, np.nan, 0.0]).reshape(1, 2, 2, 1)
    for op in (lambda x: jc.max_pool(x, 2, ties="split", impl="manual"),
               lambda x: jc.max_pool(x, 2, stride=1, ties="split", impl="manual"),
               lambda x: jc.global_max_pool(x, ties="split", impl="manual"),
               lambda x: jc.adaptive_max_pool(x, 1, ties="split", impl="manual")):
        _, vjp = jax.vjp(op, x)
        dx = vjp(jnp.full(op(x).shape, 4.0))[0]
        np.testing.assert_array_equal(dx.reshape(-1), [2.0, 0.0, 2.0, 0.0])


# --------------------------------------------------------------------------------------------
# Bad input: a clear ValueError / TypeError before any computation, the same for both impls.

ERROR_CASES = [
    # (call, exception, message pattern)
    (lambda i: jc.max_pool(X, 0, impl=i), ValueError, r"max_pool: window must be >= 1; got 0"),
    (lambda i: jc.max_pool(X, 2.0, impl=i), TypeError, r"max_pool: window must be an int or a tuple of ints; got 2.0"),
    (lambda i: jc.max_pool(X, (2, 2, 2), impl=i), ValueError,
     r"max_pool: x must have rank 5, \(N, \*spatial, C\) with 3 spatial dims to match window \(2, 2, 2\); "
     r"got x shape \(2, 8, 8, 3\)"),
    (lambda i: jc.max_pool(X, 9, impl=i), ValueError,
     r"max_pool: the window \(9, 9\) is larger than the padded input \(8, 8\)"),
    (lambda i: jc.avg_pool(X, 2, stride=0, impl=i), ValueError, r"avg_pool: stride must be >= 1; got 0"),
    (lambda i: jc.avg_pool(X, 2, padding=2, impl=i), ValueError,
     r"avg_pool: padding must be smaller than the window on each side"),
    (lambda i: jc.avg_pool(X, 2, padding="full", impl=i), ValueError,
     r"avg_pool: padding must be 'VALID', 'SAME', an int or 2 \(low, high\) pairs; got 'full'"),
    (lambda i: jc.avg_pool(X, 2, count_include_pad="yes", impl=i), TypeError,
     r"avg_pool: count_include_pad must be a bool; got 'yes'"),
    # dilation
    (lambda i: jc.max_pool(X, 2, dilation=0, impl=i), ValueError,
     r"max_pool: dilation must be >= 1; got 0"),
    (lambda i: jc.avg_pool(X, 2, dilation=(1, 2, 1), impl=i), ValueError,
     r"avg_pool: dilation must be an int or a tuple of 2 ints \(one per spatial dimension\); "
     r"got \(1, 2, 1\)"),
    (lambda i: jc.max_pool(X, 2, dilation=1.5, impl=i), TypeError,
     r"max_pool: dilation must be an int or a tuple of ints; got 1.5"),
    (lambda i: jc.max_pool(X, 3, dilation=4, impl=i), ValueError,
     r"max_pool: the dilated window \(9, 9\) \(window \(3, 3\) with dilation \(4, 4\)\) is "
     r"larger than the padded input \(8, 8\)"),
    (lambda i: jc.max_pool(X, 2, dilation=2, padding=3, impl=i), ValueError,
     r"max_pool: padding must be smaller than the window on each side \(a window made of "
     r"padding only has no input to pool\); got padding \(\(3, 3\), \(3, 3\)\), dilated window "
     r"\(3, 3\) \(window \(2, 2\) with dilation \(2, 2\)\)"),
    (lambda i: jc.max_pool(np.zeros((1, 1, 4, 1)), 2, dilation=2, padding=((1, 1), (0, 0)),
                           stride=1, impl=i), ValueError,
     r"max_pool: window 0 along spatial dim 0 reads only padding \(positions \[0, 2\] of the "
     r"padded input, whose elements are 1\.\.1\); every window needs an input element"),
    # ceil_mode
    (lambda i: jc.max_pool(X, 2, ceil_mode=1, impl=i), TypeError,
     r"max_pool: ceil_mode must be a bool; got 1"),
    # padding_mode
    (lambda i: jc.max_pool(X, 2, padding_mode="edge", impl=i), ValueError,
     r"max_pool: padding_mode must be one of \('zeros', 'reflect', 'replicate', 'circular'\); "
     r"got 'edge'"),
    (lambda i: jc.avg_pool(X, 3, padding=((8, 0), (0, 0)), padding_mode="reflect", impl=i),
     ValueError, r"avg_pool: reflect padding must be smaller than the input size on each side; "
                 r"spatial dim 0 \(x axis 1\) has size 8 and padding \(8, 0\)"),
    (lambda i: jc.max_pool(X, 3, padding=((0, 0), (0, 9)), padding_mode="circular", impl=i),
     ValueError, r"max_pool: circular padding must be at most the input size on each side; "
                 r"spatial dim 1 \(x axis 2\) has size 8 and padding \(0, 9\)"),
    # ties
    (lambda i: jc.max_pool(X, 2, ties="last", impl=i), ValueError,
     r"max_pool: ties must be one of \('first', 'split'\); got 'last'"),
    (lambda i: jc.global_max_pool(X, ties="mean", impl=i), ValueError,
     r"global_max_pool: ties must be one of \('first', 'split'\); got 'mean'"),
    (lambda i: jc.adaptive_max_pool(X, 2, ties=None, impl=i), ValueError,
     r"adaptive_max_pool: ties must be one of \('first', 'split'\); got None"),
    # global and adaptive pooling
    (lambda i: jc.global_avg_pool(np.zeros((2, 3)), impl=i), ValueError,
     r"global_avg_pool: x must have rank 3, 4 or 5, \(N, \*spatial, C\) with 1, 2 or 3 spatial "
     r"dims; got x shape \(2, 3\) \(rank 2\)"),
    (lambda i: jc.global_max_pool(np.zeros((2, 3), np.int32), impl=i), TypeError,
     r"global_max_pool: x must have a floating dtype"),
    (lambda i: jc.adaptive_avg_pool(X, 0, impl=i), ValueError,
     r"adaptive_avg_pool: output_size must be >= 1; got 0"),
    (lambda i: jc.adaptive_avg_pool(X, (2, 2, 2), impl=i), ValueError,
     r"adaptive_avg_pool: output_size must be an int or a tuple of 2 ints \(one per spatial "
     r"dimension\); got \(2, 2, 2\)"),
    (lambda i: jc.adaptive_max_pool(X, 2.0, impl=i), TypeError,
     r"adaptive_max_pool: output_size must be an int or a tuple of ints; got 2.0"),
    (lambda i: jc.adaptive_max_pool(np.zeros((1, 2, 2, 2, 2, 1)), 1, impl=i), ValueError,
     r"adaptive_max_pool: x must have rank 3, 4 or 5"),
]


test_bad_input_message = bad_input_test(ERROR_CASES)


# --------------------------------------------------------------------------------------------
# The nn layers: each computes its op, with every new argument passed through.


def test_pool_layers_apply_their_op():
    x = unique_values((2, 7, 6, 3), step=1 / 7.0).astype(np.float32)
    key = jax.random.key(0)
    kw = dict(stride=2, padding=1, dilation=(1, 2), ceil_mode=True, padding_mode="reflect")
    layers = [
        (MaxPool(3, ties="split", **kw), lambda impl: jc.max_pool(x, 3, ties="split", impl=impl,
                                                                  **kw)),
        (AvgPool(3, count_include_pad=False, **kw),
         lambda impl: jc.avg_pool(x, 3, count_include_pad=False, impl=impl, **kw)),
        (GlobalAvgPool(), lambda impl: jc.global_avg_pool(x, impl=impl)),
        (GlobalMaxPool(ties="split"), lambda impl: jc.global_max_pool(x, ties="split",
                                                                      impl=impl)),
        (AdaptiveAvgPool((3, None)), lambda impl: jc.adaptive_avg_pool(x, (3, None), impl=impl)),
        (AdaptiveMaxPool(4, ties="split"), lambda impl: jc.adaptive_max_pool(x, 4, ties="split",
                                                                             impl=impl)),
    ]
    for layer, want in layers:
        shape, params = layer.init(key, (-1, *x.shape[1:]))
        assert params == {} and shape == (-1, *want("lax").shape[1:])
        for impl in IMPLS:
            np.testing.assert_array_equal(layer.apply(params, x, impl=impl), want(impl))


@pytest.mark.parametrize("make,pattern", [
    (lambda: MaxPool(2, ties="any"), r"MaxPool: ties must be one of \('first', 'split'\)"),
    (lambda: MaxPool(2, dilation=0), r"MaxPool: dilation must be >= 1; got 0"),
    (lambda: AvgPool(2, ceil_mode="no"), r"AvgPool: ceil_mode must be a bool; got 'no'"),
    (lambda: AvgPool(2, padding_mode="wrap"), r"AvgPool: padding_mode must be one of"),
    (lambda: GlobalMaxPool(ties="all"), r"GlobalMaxPool: ties must be one of"),
    (lambda: AdaptiveAvgPool(0), r"AdaptiveAvgPool: output_size must be >= 1; got 0"),
    (lambda: AdaptiveMaxPool((2, "a")), r"AdaptiveMaxPool: output_size must be an int or a "
                                        r"tuple of ints; got 'a'"),
])
def test_pool_layer_errors(make, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        make()
