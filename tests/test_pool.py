"""Pooling (max_pool, avg_pool): both impls against lax, finite differences, max-pool ties and NaN, errors.

Sections: the deliberate grid, property tests, second-order finite differences, max-pool ties
and NaN, bad input. Max pooling's main checks use distinct values; the tie rule has its own tests.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxcnn as jc

from conftest import (GRID_NDS, GRID_PADDINGS, GRID_SPATIAL, IMPLS, compare_impls, grid_padding,
                      unique_values)

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
@pytest.mark.parametrize("kind,nd,stride,padding,window,batch,dtype", _pool_cases())
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
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("call,exc,pattern", ERROR_CASES,
                         ids=[f"case{i}" for i in range(len(ERROR_CASES))])
def test_bad_input_message(call, exc, pattern, impl):
    with pytest.raises(exc, match=pattern):
        call(impl)
