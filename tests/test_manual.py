"""The manual path beyond the grid: finite differences, ties, transformations, the lecture."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc
from jaxcnn import _shapes
from jaxcnn.check import BFLOAT16_TOLERANCES
from jaxcnn.convolution import _conv_input_grad_gather, _conv_input_grad_scatter

from conftest import assert_close


def _unique(shape, seed=0, scale=1.0):
    """Well-separated distinct values (no ties, no near-ties for finite differences)."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n) - n / 2).reshape(shape) * scale


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


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("op", [
    lambda x: jc.max_pool(x, 2, impl="manual"),
    lambda x: jc.max_pool(x, 3, stride=1, padding="SAME", impl="manual"),
    lambda x: jc.avg_pool(x, 3, stride=2, padding=1, count_include_pad=False, impl="manual"),
    lambda x: jc.avg_pool(x, (2, 3), impl="manual"),
    lambda x: jc.relu(x, impl="manual"),
    lambda x: jc.flatten(x, impl="manual"),
    lambda x: jc.log_softmax(x, impl="manual"),
], ids=["max_pool", "max_pool_overlap", "avg_pool_exclude", "avg_pool", "relu", "flatten",
        "log_softmax"])
def test_pool_and_head_check_grads_second_order(op):
    # Distinct values 0.1 apart: no ties and no relu kinks within the finite-difference step.
    check_grads(op, (_unique((2, 6, 7, 2), scale=0.1) + 0.05,), order=2, modes=["rev"])


@pytest.mark.usefixtures("x64")
def test_dense_and_cross_entropy_check_grads_second_order():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(4, 5)), rng.normal(size=(5, 3)), rng.normal(size=(3,))
    check_grads(lambda x, w, b: jc.dense(x, w, b, impl="manual"), (x, w, b), order=2, modes=["rev"])
    labels = jnp.asarray([0, 2, 1, 2])
    check_grads(lambda z: jc.cross_entropy(z, labels, impl="manual"), (x @ w,), order=2, modes=["rev"])


# --------------------------------------------------------------------------------------------
# Max-pool ties: the first maximum in row-major window order takes the gradient.


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
    for impl in ("lax", "manual"):
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
    for impl in ("lax", "manual"):
        outs[impl] = jax.value_and_grad(lambda x: jnp.nansum(jc.max_pool(x, 2, impl=impl)))(x)
    np.testing.assert_array_equal(outs["manual"][1], outs["lax"][1])
    assert np.isnan(jc.max_pool(x, 2, impl="manual")[0, 0, 0, 0])


# --------------------------------------------------------------------------------------------
# Transformations: jit, vmap, grad-of-grad.


def _conv_loss(x, k, impl):
    return jnp.sum(jnp.tanh(jc.conv(x, k, stride=2, padding="SAME", impl=impl)) ** 2)


@pytest.mark.usefixtures("x64")
def test_manual_ops_under_jit_vmap_and_grad_of_grad():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(3, 2, 7, 7, 2))                     # a leading ensemble axis for vmap
    k = rng.normal(size=(3, 3, 2, 3))
    results = {}
    for impl in ("lax", "manual"):
        f = jax.jit(jax.vmap(jax.grad(lambda x, k: _conv_loss(x, k, impl), argnums=1), (0, None)))
        hvp = jax.jit(jax.grad(lambda k: jnp.sum(jax.grad(lambda k: _conv_loss(xs[0], k, impl))(k) ** 2)))
        pool = jax.vmap(jax.grad(lambda x: jnp.sum(jc.max_pool(x, 2, impl=impl) ** 2)))
        results[impl] = (f(xs, k), hvp(k), pool(xs))
    for got, want in zip(results["manual"], results["lax"]):
        assert_close(got, want, "float64")


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
# The scatter form of dX equals the gather form; half precision.


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


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_keeps_dtype_and_accumulates_in_float32(dtype):
    rng = np.random.default_rng(0)
    x32 = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    k32 = (rng.normal(size=(3, 3, 3, 4)) / 5).astype(np.float32)
    x, k = jnp.asarray(x32, dtype), jnp.asarray(k32, dtype)
    for impl in ("lax", "manual"):
        z = jc.conv(x, k, padding="SAME", impl=impl)
        assert z.dtype == dtype
        dx, dk = jax.grad(lambda x, k: jnp.sum(jc.conv(x, k, impl=impl).astype(jnp.float32)),
                          argnums=(0, 1))(x, k)
        assert dx.dtype == dtype and dk.dtype == dtype
        ref = jc.conv(x.astype(np.float32), k.astype(np.float32), padding="SAME")
        # One rounding of a float32-accumulated result: within the half type's resolution.
        eps = float(jnp.finfo(dtype).eps)
        np.testing.assert_allclose(np.asarray(z, np.float32), ref, rtol=2 * eps, atol=2 * eps * 4)
        for op in (lambda v: jc.max_pool(v, 2, impl=impl), lambda v: jc.avg_pool(v, 2, impl=impl),
                   lambda v: jc.relu(v, impl=impl)):
            assert op(x).dtype == dtype


# Ops whose backward sums several contributions per input element (overlapping windows, many
# taps, a contraction): each sum must run in float32 and be rounded to bfloat16 once.
HALF_PRECISION_OPS = {
    "conv 3x3 SAME": lambda x, k, impl: jc.conv(x, k, padding="SAME", impl=impl),
    "conv 3x3 stride 2 groups 2": lambda x, k, impl: jc.conv(
        x, k[:, :, :2], stride=2, padding=((1, 0), (0, 1)), groups=2, impl=impl),
    "max_pool 3/1": lambda x, k, impl: jc.max_pool(x, 3, stride=1, padding="SAME", impl=impl),
    "avg_pool 3/2": lambda x, k, impl: jc.avg_pool(x, 3, stride=2, padding=1, impl=impl),
    "dense": lambda x, k, impl: jc.dense(x, k.reshape(36, 4), impl=impl),
}


@pytest.mark.parametrize("name", HALF_PRECISION_OPS)
def test_bfloat16_backward_accumulates_in_float32(name):
    """On values bfloat16 holds exactly, every bfloat16 cotangent of the manual path is the
    float32 one rounded once: within eps/2 relative, element by element. A sum run in bfloat16
    rounds at every term and misses this. (lax meets it too, except max pooling with
    overlapping windows: its transpose, XLA's select_and_scatter, adds in bfloat16 on CPU.)"""
    op = HALF_PRECISION_OPS[name]
    rng = np.random.default_rng(1)
    bf16 = jnp.bfloat16
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), bf16)
    if name == "dense":
        x = jnp.asarray(rng.normal(size=(5, 36)), bf16)
    k = jnp.asarray(rng.normal(size=(3, 3, 4, 4)) / 3, bf16)
    z32, vjp32 = jax.vjp(lambda x, k: op(x, k, "lax"), x.astype(np.float32), k.astype(np.float32))
    dz = jnp.asarray(rng.normal(size=z32.shape), bf16)
    want = vjp32(dz.astype(np.float32))
    tol = BFLOAT16_TOLERANCES["op"]
    for impl in ("manual",) if name.startswith("max_pool") else ("manual", "lax"):
        _, vjp = jax.vjp(lambda x, k: op(x, k, impl), x, k)
        for what, got, ref in zip(("dx", "dk"), vjp(dz), want):
            assert got.dtype == bf16, (impl, what, got.dtype)
            got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
            np.testing.assert_allclose(got, ref, rtol=tol["rtol"],
                                       atol=tol["atol"] * np.abs(ref).max(),
                                       err_msg=f"{name} {impl} {what}")
