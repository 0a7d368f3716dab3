"""Activations (relu, leaky_relu, sigmoid, tanh, gelu, softmax, log_softmax): both impls against
lax (forward and gradients), finite differences, hand-computed cases, kinks, saturation, errors,
and their nn layers.

Sections: the grid, second-order finite differences and forward-over-reverse, cases by hand,
kinks, large |x| and half precision, bad input, nn layers. Each new activation adds its name to
ACTIVATIONS (default arguments) and its other configurations to VARIANTS.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc
from jaxcnn import nn

from conftest import bad_input_test, IMPLS, assert_close, compare_impls, unique_values

ACTIVATIONS = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softmax", "log_softmax"]

# Configurations other than the defaults: name -> op(x, impl).
VARIANTS = {
    "leaky_relu slope -0.5": lambda x, impl: jc.leaky_relu(x, negative_slope=-0.5, impl=impl),
    "gelu approximate": lambda x, impl: jc.gelu(x, approximate=True, impl=impl),
    "softmax axis 0": lambda x, impl: jc.softmax(x, 0, impl=impl),
    "log_softmax axis -3": lambda x, impl: jc.log_softmax(x, -3, impl=impl),
}

ALL_OPS = {**{name: (lambda op: lambda x, impl: op(x, impl=impl))(getattr(jc, name))
              for name in ACTIVATIONS}, **VARIANTS}
# Every op once and the variants that change the backward's code path.
SOME_OPS = {name: ALL_OPS[name] for name in
            ACTIVATIONS + ["leaky_relu slope -0.5", "gelu approximate", "softmax axis 0"]}


# --------------------------------------------------------------------------------------------
# The grid: forward manual == lax and jax.grad through manual == through lax.


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_grid(name, dtype):
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(dtype)
    op = getattr(jc, name)
    compare_impls(lambda x, impl: op(x, impl=impl), (x,), dtype)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", VARIANTS)
def test_activation_variant_grid(name):
    """float64; float32 is met by every op in test_activation_grid and the half-precision test."""
    x = (2 * np.random.default_rng(1).normal(size=(3, 4, 5)))
    compare_impls(VARIANTS[name], (x,), "float64")


# --------------------------------------------------------------------------------------------
# Finite differences, second order, reverse mode (forward mode cannot go through a custom_vjp),
# and forward-over-reverse (jax.jacfwd of jax.grad, through the custom VJP's rules).


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_check_grads_second_order(name):
    op = getattr(jc, name)
    # Distinct values 0.1 apart, offset from 0: no relu kink within the finite-difference step.
    x = unique_values((2, 6, 7, 2), step=0.1, centred=True) + 0.05
    check_grads(lambda x: op(x, impl="manual"), (x,), order=2, modes=["rev"])


@pytest.mark.usefixtures("x64")
def test_gelu_approximate_check_grads_second_order():
    """The one variant with a backward formula of its own (the others change a constant or the
    axis of the same code, met by the variant grid)."""
    x = unique_values((3, 4, 2), step=0.2, centred=True) + 0.1
    check_grads(lambda x: VARIANTS["gelu approximate"](x, "manual"), (x,), order=2, modes=["rev"])


@pytest.mark.usefixtures("x64")
def test_forward_over_reverse_matches_lax():
    """jax.jacfwd(jax.grad(f)) through every manual activation equals it through lax: the
    custom VJP's forward and backward rules are themselves differentiable in forward mode."""
    x = np.random.default_rng(2).normal(size=(2, 3))
    weights = jnp.arange(1.0, 7.0).reshape(2, 3)

    @jax.jit
    def hessians(x):
        out = {}
        for name, op in SOME_OPS.items():
            for impl in IMPLS:
                f = lambda v: jnp.sum(jnp.sin(op(v, impl)) * weights)
                out[name, impl] = jax.jacfwd(jax.grad(f))(x)
        return out

    out = hessians(x)
    for name in SOME_OPS:
        assert_close(out[name, "manual"], out[name, "lax"], "float64", name)
        assert np.any(out[name, "lax"] != 0) or name.startswith(("relu", "leaky")), name


# --------------------------------------------------------------------------------------------
# Small cases whose numbers are written by hand: y and dy/dx elementwise (for softmax, the
# gradient of y_0).

PHI_1 = 0.8413447460685429                      # Φ(1), the standard normal CDF at 1
PDF_1 = math.exp(-0.5) / math.sqrt(2 * math.pi)  # φ(1) = 0.24197072451914337

HAND_CASES = {
    # name: (op, x, y, dy/dx)
    "sigmoid": (jc.sigmoid, [0.0, math.log(3.0)], [0.5, 0.75], [0.25, 0.75 * 0.25]),
    "tanh": (jc.tanh, [0.0, math.log(2.0)], [0.0, 0.6], [1.0, 1 - 0.36]),
    "leaky_relu": (lambda x, impl: jc.leaky_relu(x, 0.1, impl=impl), [-2.0, 3.0],
                   [-0.2, 3.0], [0.1, 1.0]),
    "gelu": (jc.gelu, [0.0, 1.0, -1.0], [0.0, PHI_1, -(1 - PHI_1)],
             [0.5, PHI_1 + PDF_1, (1 - PHI_1) - PDF_1]),
    "relu": (jc.relu, [-1.5, 2.5], [0.0, 2.5], [0.0, 1.0]),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", HAND_CASES)
def test_elementwise_by_hand(name, impl):
    op, x, y, dydx = HAND_CASES[name]
    got = jax.jit(lambda x: (op(x, impl=impl), jax.grad(lambda v: jnp.sum(op(v, impl=impl)))(x)))(
        np.asarray(x))
    assert_close(got[0], y, "float64", "y")
    assert_close(got[1], dydx, "float64", "dy/dx")


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", IMPLS)
def test_softmax_and_log_softmax_by_hand(impl):
    """x = (0, ln 2, ln 3): exp(x) = (1, 2, 3), softmax = (1/6, 1/3, 1/2). The gradient of
    y_0 is y_0·(δ_0i - y_i) = (5/36, -1/18, -1/12); that of log_softmax_0 is δ_0i - y_i."""
    x = np.array([0.0, math.log(2.0), math.log(3.0)])
    y = np.array([1 / 6, 1 / 3, 1 / 2])
    cols = np.stack([x, x[::-1]], axis=1)      # along axis 0: each column the same computation

    @jax.jit
    def run(x, cols):
        return (jc.softmax(x, impl=impl), jax.grad(lambda v: jc.softmax(v, impl=impl)[0])(x),
                jc.log_softmax(x, impl=impl),
                jax.grad(lambda v: jc.log_softmax(v, impl=impl)[0])(x),
                jc.softmax(cols, 0, impl=impl))

    got = run(x, cols)
    assert_close(got[0], y, "float64", "softmax")
    assert_close(got[1], [5 / 36, -1 / 18, -1 / 12], "float64", "d softmax_0")
    assert_close(got[2], np.log(y), "float64", "log_softmax")
    assert_close(got[3], [5 / 6, -1 / 3, -1 / 2], "float64", "d log_softmax_0")
    assert_close(got[4], np.stack([y, y[::-1]], axis=1), "float64", "softmax axis 0")


# --------------------------------------------------------------------------------------------
# Kinks: the derivative at exactly 0, pinned to lax's convention.


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", IMPLS)
def test_kink_conventions(impl):
    """relu'(0) = 0 (jax.nn.relu) and leaky_relu'(0) = 1 (jax.nn.leaky_relu selects x >= 0),
    under both impls, as jax.grad of jax.nn's own functions gives."""
    x = np.array([-1.0, 0.0, 0.0, 2.0])
    grad = lambda f: jax.grad(lambda v: jnp.sum(f(v)))   # noqa: E731

    @jax.jit
    def run(x):
        return (grad(lambda v: jc.relu(v, impl=impl))(x), grad(jax.nn.relu)(x),
                grad(lambda v: jc.leaky_relu(v, 0.1, impl=impl))(x),
                grad(lambda v: jax.nn.leaky_relu(v, 0.1))(x),
                jc.leaky_relu(x, 0.0, impl=impl), jc.relu(x, impl=impl))

    relu_grad, relu_want, leaky_grad, leaky_want, leaky0, relu = run(x)
    np.testing.assert_array_equal(relu_grad, [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(relu_grad, relu_want)
    np.testing.assert_array_equal(leaky_grad, [0.1, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(leaky_grad, leaky_want)
    # leaky_relu with slope 0 is relu everywhere but at the kink's derivative.
    np.testing.assert_array_equal(leaky0, relu)


# --------------------------------------------------------------------------------------------
# Large |x| (float32, no overflow) and half precision.

# name: (op, y at (-100, 100), dy/dx at (-100, 100)); softmax over the pair.
SATURATION = {
    "sigmoid": (jc.sigmoid, [0.0, 1.0], [0.0, 0.0]),
    "tanh": (jc.tanh, [-1.0, 1.0], [0.0, 0.0]),
    "gelu": (jc.gelu, [0.0, 100.0], [0.0, 1.0]),
    "gelu approximate": (lambda x, impl: jc.gelu(x, True, impl=impl), [0.0, 100.0], [0.0, 1.0]),
    "leaky_relu": (jc.leaky_relu, [-1.0, 100.0], [0.01, 1.0]),
    "relu": (jc.relu, [0.0, 100.0], [0.0, 1.0]),
    "softmax": (jc.softmax, [0.0, 1.0], [0.0, 0.0]),
    "log_softmax": (jc.log_softmax, [-200.0, 0.0], [1.0, -1.0]),
}


def test_large_inputs_float32_no_overflow():
    """x = ±100 in float32: finite outputs and gradients, the saturated values, manual == lax."""
    x = jnp.array([-100.0, 100.0], jnp.float32)

    @jax.jit
    def run(x):
        return {(name, impl): (op(x, impl=impl), jax.grad(lambda v: jnp.sum(op(v, impl=impl)))(x))
                for name, (op, _, _) in SATURATION.items() for impl in IMPLS}

    out = run(x)
    for name, (_, y, dydx) in SATURATION.items():
        for impl in IMPLS:
            for a in out[name, impl]:
                assert a.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a))), (name, impl)
            assert_close(out[name, impl][0], y, "float32", f"{name} {impl} y")
            assert_close(out[name, impl][1], dydx, "float32", f"{name} {impl} dy/dx")


@pytest.mark.parametrize("dtype", [jnp.bfloat16])   # float16 takes the same path (_acc)
def test_half_precision_computes_in_float32(dtype):
    """Output and cotangent keep the half dtype and, under both impls, are the float32 results
    (on the same half-precision values) rounded once: within eps of the half type. (A backward
    that read a half-precision saved output would miss this: y(1 - y) near y = 1 in bfloat16.)"""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 4, 5)) * 3, dtype)
    dy = jnp.asarray(rng.normal(size=(3, 4, 5)), dtype)

    @jax.jit
    def run(x, dy):
        out = {}
        for name, op in SOME_OPS.items():
            y32, vjp32 = jax.vjp(lambda v: op(v, "lax"), x.astype(jnp.float32))
            out[name, "float32"] = (y32, vjp32(dy.astype(jnp.float32))[0])
            for impl in IMPLS:
                y, vjp = jax.vjp(lambda v: op(v, impl), x)
                out[name, impl] = (y, vjp(dy)[0])
        return out

    out = run(x, dy)
    eps = float(jnp.finfo(dtype).eps)
    for name in SOME_OPS:
        for impl in IMPLS:
            for what, got, want in zip(("y", "dx"), out[name, impl], out[name, "float32"]):
                assert got.dtype == dtype, (name, impl, what, got.dtype)
                want = np.asarray(want, np.float64)
                np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=eps,
                                           atol=eps * np.abs(want).max() / 16,
                                           err_msg=f"{name} {impl} {what}")


# --------------------------------------------------------------------------------------------
# Bad input: a clear ValueError / TypeError before any computation, the same for both impls.

X3 = np.zeros((2, 3, 4), np.float32)

ERROR_CASES = [
    # (call, exception, message pattern)
    (lambda i: jc.relu(np.zeros(3, np.int32), impl=i), TypeError, r"relu: x must have a floating dtype"),
    (lambda i: jc.sigmoid(np.zeros(3, np.int32), impl=i), TypeError,
     r"sigmoid: x must have a floating dtype \(float16, bfloat16, float32 or float64\); got int32"),
    (lambda i: jc.tanh("x", impl=i), TypeError, r"tanh: x must be an array; got str"),
    (lambda i: jc.gelu(np.zeros(3, np.int8), impl=i), TypeError, r"gelu: x must have a floating dtype"),
    (lambda i: jc.leaky_relu(X3, "0.1", impl=i), TypeError,
     r"leaky_relu: negative_slope must be a Python number; got str '0.1'"),
    (lambda i: jc.leaky_relu(X3, True, impl=i), TypeError,
     r"leaky_relu: negative_slope must be a Python number; got bool True"),
    (lambda i: jc.leaky_relu(X3, jnp.asarray(0.1), impl=i), TypeError,
     r"leaky_relu: negative_slope must be a Python number; got ArrayImpl"),
    (lambda i: jc.leaky_relu(X3, float("nan"), impl=i), ValueError,
     r"leaky_relu: negative_slope must be a finite number; got nan"),
    (lambda i: jc.leaky_relu(X3, float("inf"), impl=i), ValueError,
     r"leaky_relu: negative_slope must be a finite number; got inf"),
    (lambda i: jc.gelu(X3, 1, impl=i), TypeError, r"gelu: approximate must be a bool; got 1"),
    (lambda i: jc.gelu(X3, "tanh", impl=i), TypeError, r"gelu: approximate must be a bool; got 'tanh'"),
    (lambda i: jc.softmax(X3, 3, impl=i), ValueError,
     r"softmax: axis must lie in \[-3, 3\) for x of rank 3; got 3"),
    (lambda i: jc.softmax(X3, -4, impl=i), ValueError,
     r"softmax: axis must lie in \[-3, 3\) for x of rank 3; got -4"),
    (lambda i: jc.softmax(X3, 1.0, impl=i), TypeError, r"softmax: axis must be an int; got float 1.0"),
    (lambda i: jc.softmax(X3, (0, 1), impl=i), TypeError, r"softmax: axis must be an int; got tuple \(0, 1\)"),
    (lambda i: jc.softmax(np.float32(1.0), impl=i), ValueError, r"softmax: x must have rank >= 1; got a scalar"),
    (lambda i: jc.softmax(np.zeros(3, np.int32), impl=i), TypeError, r"softmax: x must have a floating dtype"),
    (lambda i: jc.log_softmax(X3, axis=5, impl=i), ValueError,
     r"log_softmax: axis must lie in \[-3, 3\) for x of rank 3; got 5"),
    (lambda i: jc.log_softmax(X3, axis=None, impl=i), TypeError, r"log_softmax: axis must be an int; got NoneType None"),
    (lambda i: jc.log_softmax(np.float32(1.0), impl=i), ValueError, r"log_softmax: x must have rank >= 1; got a scalar"),
]


test_bad_input_message = bad_input_test(ERROR_CASES)


@pytest.mark.parametrize("op", [jc.leaky_relu, jc.sigmoid, jc.tanh, jc.gelu, jc.softmax])
def test_unknown_impl(op):
    with pytest.raises(ValueError, match=r"\w+: impl must be one of \('lax', 'manual'\); got 'fast'"):
        op(X3, impl="fast")


# --------------------------------------------------------------------------------------------
# nn layers: constants where there is nothing to configure, factories otherwise.

LAYERS = {
    # name: (layer, the op it applies)
    "Sigmoid": (nn.Sigmoid, lambda x, impl: jc.sigmoid(x, impl=impl)),
    "Tanh": (nn.Tanh, lambda x, impl: jc.tanh(x, impl=impl)),
    "LeakyRelu()": (nn.LeakyRelu(), lambda x, impl: jc.leaky_relu(x, 0.01, impl=impl)),
    "LeakyRelu(0.2)": (nn.LeakyRelu(0.2), lambda x, impl: jc.leaky_relu(x, 0.2, impl=impl)),
    "Gelu()": (nn.Gelu(), lambda x, impl: jc.gelu(x, False, impl=impl)),
    "Gelu(approximate=True)": (nn.Gelu(approximate=True),
                               lambda x, impl: jc.gelu(x, True, impl=impl)),
    "Softmax()": (nn.Softmax(), lambda x, impl: jc.softmax(x, -1, impl=impl)),
    "Softmax(axis=1)": (nn.Softmax(axis=1), lambda x, impl: jc.softmax(x, 1, impl=impl)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_activation_layers(name):
    layer, op = LAYERS[name]
    assert isinstance(layer, nn.Layer)
    shape, params = layer.init(jax.random.key(0), (-1, 4, 3))
    assert shape == (-1, 4, 3) and params == {}
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 3)), jnp.float32)
    for impl in IMPLS:
        np.testing.assert_array_equal(layer.apply(params, x, impl=impl), op(x, impl))
    np.testing.assert_array_equal(layer.apply(params, x), op(x, "manual"))   # the nn default


def test_activation_layers_in_serial():
    init, apply = nn.serial(nn.Gelu(), nn.LeakyRelu(0.1), nn.Tanh, nn.Sigmoid, nn.Softmax())
    shape, params = init(jax.random.key(0), (2, 6))
    assert shape == (2, 6) and params == [{}] * 5
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 6)), jnp.float32)
    y, grads = jax.jit(lambda x: (apply(params, x), {
        impl: jax.grad(lambda x: jnp.sum(apply(params, x, impl=impl) ** 2))(x)
        for impl in IMPLS}))(x)
    np.testing.assert_allclose(jnp.sum(y, axis=-1), 1.0, rtol=1e-6)
    assert_close(grads["manual"], grads["lax"], "float32")


LAYER_ERRORS = [
    (lambda: nn.LeakyRelu("0.1"), TypeError, r"LeakyRelu: negative_slope must be a Python number"),
    (lambda: nn.LeakyRelu(float("nan")), ValueError, r"LeakyRelu: negative_slope must be a finite number; got nan"),
    (lambda: nn.Gelu(1), TypeError, r"Gelu: approximate must be a bool; got 1"),
    (lambda: nn.Softmax(1.0), TypeError, r"Softmax: axis must be an int; got float 1.0"),
    (lambda: nn.Softmax(2).init(jax.random.key(0), (2, 3)), ValueError,
     r"softmax: axis must lie in \[-2, 2\) for x of rank 2; got 2"),
]


@pytest.mark.parametrize("call,exc,pattern", LAYER_ERRORS,
                         ids=[f"case{i}" for i in range(len(LAYER_ERRORS))])
def test_activation_layer_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
