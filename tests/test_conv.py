"""conv: both impls against lax (forward and gradients), finite differences, the lecture's example, errors.

Sections: the deliberate grid, property tests, second-order finite differences, the scatter and
gather forms of dX, transformations, the lecture's worked example, bad input.
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
from jaxcnn import _shapes
from jaxcnn.convolution import _conv_input_grad_gather, _conv_input_grad_scatter

from conftest import (GRID_NDS, GRID_PADDINGS, GRID_SPATIAL, GRID_STRIDES, IMPLS, assert_close,
                      compare_impls, grid_padding)

X = np.zeros((2, 8, 8, 3), np.float32)
K = np.zeros((3, 3, 3, 4), np.float32)


# --------------------------------------------------------------------------------------------
# The deliberate grid: forward manual == lax and jax.grad through manual == through lax.


def _conv_cases():
    cases = []
    for i, (nd, s, p) in enumerate(itertools.product(GRID_NDS, GRID_STRIDES, GRID_PADDINGS)):
        dilation = (1, 2)[i % 2]
        groups = ("1", "2", "depthwise")[i % 3]
        batch = (1, 3)[(i // 2) % 2]
        dtype = ("float64", "float32")[(i // 3) % 2]
        cases.append((nd, s, p, dilation, groups, batch, dtype))
    return cases


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("nd,stride,padding,dilation,groups,batch,dtype", _conv_cases())
def test_conv_grid(nd, stride, padding, dilation, groups, batch, dtype):
    rng = np.random.default_rng(0)
    c_in = 4
    g = {"1": 1, "2": 2, "depthwise": c_in}[groups]
    c_out = 2 * c_in if groups == "depthwise" else 6
    window = (3, 2, 2)[:nd]
    x = rng.normal(size=(batch, *GRID_SPATIAL[nd], c_in)).astype(dtype)
    # He-scaled kernel, as a trained layer has: keeps activations and gradients O(1), which is
    # the scale at which float32's rtol/atol of 1e-5 are meaningful.
    fan_in = np.prod(window) * (c_in // g)
    k = (rng.normal(size=(*window, c_in // g, c_out)) / np.sqrt(fan_in)).astype(dtype)
    b = rng.normal(size=(c_out,)).astype(dtype)
    pad = grid_padding(padding, nd)

    def op(x, k, b, impl):
        return jc.conv(x, k, b, stride=stride, padding=pad, dilation=dilation, groups=g, impl=impl)

    compare_impls(op, (x, k, b), dtype)


# --------------------------------------------------------------------------------------------
# Property tests: over random valid configurations (the conftest hypothesis profile is
# derandomized and bounded: the same examples on every run), manual == lax.


@st.composite
def conv_configs(draw):
    nd = draw(st.integers(1, 3))
    window = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    eff = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    padding = draw(st.one_of(
        st.sampled_from(["VALID", "SAME"]), st.integers(0, 2),
        st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2)) for _ in range(nd)])))
    pads = ([(0, 0)] * nd if padding in ("VALID", "SAME") else
            [(padding, padding)] * nd if isinstance(padding, int) else list(padding))
    spatial = tuple(draw(st.integers(max(1, e - lo - hi), e + 4))
                    for e, (lo, hi) in zip(eff, pads))
    batch = draw(st.integers(1, 2))
    return dict(x=(batch, *spatial, c_in), k=(*window, c_in // groups, c_out), stride=stride,
                padding=padding, dilation=dilation, groups=groups)


@pytest.mark.usefixtures("x64")
@given(conv_configs())
def test_conv_manual_equals_lax(cfg):
    rng = np.random.default_rng(1)
    x, k = rng.normal(size=cfg["x"]), rng.normal(size=cfg["k"])
    b = rng.normal(size=cfg["k"][-1:])
    static = {key: cfg[key] for key in ("stride", "padding", "dilation", "groups")}
    compare_impls(lambda x, k, b, impl: jc.conv(x, k, b, impl=impl, **static), (x, k, b),
                  "float64")


# --------------------------------------------------------------------------------------------
# Finite differences, second order, reverse mode (forward mode cannot go through a custom_vjp).

SECOND_ORDER_CASES = {
    "conv stride 2 SAME dilation 1": lambda x, k, b: jc.conv(x, k, b, stride=2, padding="SAME", impl="manual"),
    "conv groups 2 dilation 2 uneven pad": lambda x, k, b: jc.conv(
        x, k[..., :1, :], b, padding=((1, 2), (0, 1)), dilation=2, groups=2, impl="manual"),
    "conv stride 3 remainder": lambda x, k, b: jc.conv(x, k, b, stride=3, impl="manual"),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", sorted(SECOND_ORDER_CASES))
def test_conv_check_grads_second_order(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 8, 2))
    k = rng.normal(size=(3, 2, 2, 4))
    b = rng.normal(size=(4,))
    check_grads(SECOND_ORDER_CASES[name], (x, k, b), order=2, modes=["rev"])


# --------------------------------------------------------------------------------------------
# The scatter form of dX equals the gather form.


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("stride,padding,dilation,groups", [
    (1, "VALID", 1, 1), (2, "SAME", 1, 2), (3, ((2, 0), (1, 3)), 2, 1), (2, 1, 2, 4)])
def test_input_grad_scatter_form_equals_gather_form(stride, padding, dilation, groups):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 8, 4))
    k = rng.normal(size=(3, 2, 4 // groups, 4))
    cfg = _shapes.conv_config(x.shape, k.shape, None, stride=stride, padding=padding,
                              dilation=dilation, groups=groups)
    dz = rng.normal(size=(2, *_shapes.output_spatial((9, 8), cfg), 4))
    gather = _conv_input_grad_gather(dz, k, x.shape, cfg, groups)
    scatter = _conv_input_grad_scatter(dz, k, x.shape, cfg, groups)
    assert_close(scatter, gather, "float64")


# --------------------------------------------------------------------------------------------
# Transformations of conv alone (jit / vmap / grad-of-grad over every op: test_transformations.py).


def test_vmap_of_manual_conv_over_kernels():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 1)), jnp.float32)
    ks = jnp.asarray(rng.normal(size=(4, 3, 3, 1, 2)), jnp.float32)
    got = jax.vmap(lambda k: jc.conv(x, k, impl="manual"))(ks)
    want = jnp.stack([jc.conv(x, k) for k in ks])
    assert_close(got, want, "float32")


# --------------------------------------------------------------------------------------------
# The lecture's worked example, by hand: X 3x3, K 2x2, Z 2x2.


@pytest.mark.usefixtures("x64")
def test_lecture_worked_example_by_hand():
    X = np.array([[1., 2., 0.], [3., -1., 4.], [2., 1., -2.]])
    K = np.array([[1., -1.], [2., 0.5]])
    B = 0.5
    c = np.array([[1., -2.], [0.5, 3.]])            # L = Σ_ij c_ij z_ij, so dL/dz_ij = c_ij
    x, k = X[None, :, :, None], K[:, :, None, None]
    # Forward: z_ij = Σ_mn X[i+m, j+n] K_mn + B.
    Z = np.array([[np.sum(X[i:i + 2, j:j + 2] * K) + B for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(jc.conv(x, k, jnp.asarray([B]), impl="manual")[0, :, :, 0], Z)

    loss = lambda x, k, b: jnp.sum(jc.conv(x, k, b, impl="manual")[0, :, :, 0] * c)   # noqa: E731
    dx, dk, db = jax.grad(loss, argnums=(0, 1, 2))(x, k, jnp.asarray([B]))
    dZ = c
    # dL/dK_mn = Σ_ij dL/dz_ij · ∂z_ij/∂K_mn, and ∂z_ij/∂K_mn = X[i+m, j+n].
    dK = np.zeros((2, 2))
    for m, n in itertools.product(range(2), range(2)):
        dK[m, n] = sum(dZ[i, j] * X[i + m, j + n] for i in range(2) for j in range(2))
    np.testing.assert_allclose(dk[:, :, 0, 0], dK)
    # dL/dB = Σ_ij dL/dz_ij.
    np.testing.assert_allclose(db, [dZ.sum()])
    # dL/dX = (dL/dZ zero-padded by 1) correlated with rot180(K).
    dZpad = np.pad(dZ, 1)
    Krot = K[::-1, ::-1]
    dX = np.array([[np.sum(dZpad[p:p + 2, q:q + 2] * Krot) for q in range(3)] for p in range(3)])
    np.testing.assert_allclose(dx[0, :, :, 0], dX)
    # And element by element from the chain rule: dL/dX_pq = Σ_ij dZ_ij · K[p-i, q-j].
    for p, q in itertools.product(range(3), range(3)):
        terms = [dZ[i, j] * K[p - i, q - j] for i in range(2) for j in range(2)
                 if 0 <= p - i < 2 and 0 <= q - j < 2]
        assert dX[p, q] == pytest.approx(sum(terms))


# --------------------------------------------------------------------------------------------
# Bad input: a clear ValueError / TypeError before any computation, the same for both impls.

ERROR_CASES = [
    # (call, exception, message pattern)
    (lambda i: jc.conv(X[0], K, impl=i), ValueError,
     r"conv: x must have rank 4, \(N, \*spatial, C_in\) with 2 spatial dims .* got x shape \(8, 8, 3\)"),
    (lambda i: jc.conv(X, K[0, 0], impl=i), ValueError,
     r"conv: kernel must have rank 3, 4 or 5, .* got kernel shape \(3, 4\) \(rank 2\)"),
    (lambda i: jc.conv(X, np.zeros((3, 3, 2, 4), np.float32), impl=i), ValueError,
     r"conv: kernel in-channels \(kernel.shape\[-2\]=2\) times groups \(1\) must equal x channels "
     r"\(x.shape\[-1\]=3\); x has shape \(2, 8, 8, 3\), kernel \(3, 3, 2, 4\)"),
    (lambda i: jc.conv(X, K, groups=2, impl=i), ValueError,
     r"conv: groups \(2\) must divide the x channels \(x.shape\[-1\]=3\)"),
    (lambda i: jc.conv(np.zeros((1, 8, 8, 4), np.float32), np.zeros((3, 3, 2, 3), np.float32),
                       groups=2, impl=i), ValueError,
     r"conv: groups \(2\) must divide the kernel out-channels \(kernel.shape\[-1\]=3\)"),
    (lambda i: jc.conv(X, K, groups=0, impl=i), ValueError, r"conv: groups must be >= 1; got 0"),
    (lambda i: jc.conv(X, K, groups=1.0, impl=i), TypeError, r"conv: groups must be an int; got float 1.0"),
    (lambda i: jc.conv(X, K, stride=0, impl=i), ValueError, r"conv: stride must be >= 1; got 0"),
    (lambda i: jc.conv(X, K, stride=1.5, impl=i), TypeError,
     r"conv: stride must be an int or a tuple of ints; got 1.5"),
    (lambda i: jc.conv(X, K, stride=(1, 2, 1), impl=i), ValueError,
     r"conv: stride must be an int or a tuple of 2 ints \(one per spatial dimension\); got \(1, 2, 1\)"),
    (lambda i: jc.conv(X, K, dilation=0, impl=i), ValueError, r"conv: dilation must be >= 1; got 0"),
    (lambda i: jc.conv(X, K, padding="FULL", impl=i), ValueError,
     r"conv: padding must be 'VALID', 'SAME', an int or 2 \(low, high\) pairs; got 'FULL'"),
    (lambda i: jc.conv(X, K, padding=-1, impl=i), ValueError, r"conv: padding must be >= 0; got -1"),
    (lambda i: jc.conv(X, K, padding=((1, -1), (0, 0)), impl=i), ValueError,
     r"conv: padding must be >= 0; got \(\(1, -1\), \(0, 0\)\)"),
    (lambda i: jc.conv(X, K, padding=((1, 1),), impl=i), ValueError,
     r"conv: padding must be .* \(one per spatial dimension\); got \(\(1, 1\),\)"),
    (lambda i: jc.conv(X, K, padding=1.0, impl=i), TypeError, r"conv: padding must be .* got float 1.0"),
    (lambda i: jc.conv(X, K, dilation=4, impl=i), ValueError,
     r"conv: the dilated kernel window \(9, 9\) \(kernel \(3, 3\) with dilation \(4, 4\)\) is larger "
     r"than the padded input \(8, 8\)"),
    (lambda i: jc.conv(X, K, np.zeros((3,), np.float32), impl=i), ValueError,
     r"conv: bias must have shape \(C_out,\) = \(4,\); got bias shape \(3,\)"),
    (lambda i: jc.conv(X.astype(np.int32), K, impl=i), TypeError,
     r"conv: x must have a floating dtype .* got int32"),
    (lambda i: jc.conv("x", K, impl=i), TypeError, r"conv: x must be an array; got str"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("call,exc,pattern", ERROR_CASES,
                         ids=[f"case{i}" for i in range(len(ERROR_CASES))])
def test_bad_input_message(call, exc, pattern, impl):
    with pytest.raises(exc, match=pattern):
        call(impl)
