"""Padding modes (pad, and conv's padding_mode): both impls against numpy and lax, the adjoint
by hand, finite differences, errors.

Sections: the grid against np.pad, the hand-written cases, the adjoint, conv with a padding
mode against jnp.pad followed by a VALID conv, the nn layer, bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc
from jaxcnn.nn import Conv

from conftest import IMPLS, assert_close, bad_input_test, compare_impls, sampled

NUMPY_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
               "circular": "wrap"}
MODES = tuple(NUMPY_MODES)
X = np.zeros((2, 4, 5, 3), np.float32)


# --------------------------------------------------------------------------------------------
# The grid: both impls against numpy's np.pad (forward) and each other (gradient).

PAD_CASES = [
    # (mode, x shape, padding, dtype): every mode in 2D, each limit reached somewhere, 1D and 3D
    ("reflect", (2, 5, 3), ((4, 2),), "float64"),                         # reflect's largest
    ("circular", (2, 4, 3), ((4, 1),), "float64"),                        # circular's largest
    ("zeros", (2, 4, 5, 3), ((2, 1), (0, 3)), "float32"),
    ("reflect", (2, 4, 5, 3), ((3, 1), (2, 4)), "float32"),
    ("replicate", (1, 3, 4, 2), 2, "float64"),                            # an int
    ("circular", (2, 4, 5, 3), ((2, 1), (0, 3)), "float64"),              # one side unpadded
    ("replicate", (1, 3, 4, 3, 2), ((1, 2), (3, 0), (0, 2)), "float32"),  # 3D
    ("reflect", (1, 3, 4, 3, 2), 1, "float64"),
]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode,shape,padding,dtype", sampled(PAD_CASES, 4, (0, 1)))
def test_pad_matches_numpy_and_lax(mode, shape, padding, dtype):
    x = np.random.default_rng(0).normal(size=shape).astype(dtype)
    nd = len(shape) - 2
    pads = ((padding, padding),) * nd if isinstance(padding, int) else padding
    want = np.pad(x, ((0, 0), *pads, (0, 0)), mode=NUMPY_MODES[mode])
    for impl in IMPLS:
        np.testing.assert_array_equal(jc.pad(x, padding, mode=mode, impl=impl), want, impl)
    compare_impls(lambda x, impl: jc.pad(x, padding, mode=mode, impl=impl), (x,), dtype)


# --------------------------------------------------------------------------------------------
# By hand: x = [a b c d] = [1 2 3 4], padding (2, 1) (the docstring's example), and the
# gradient of sum(w * pad(x)) with w = [w0 .. w6] = [1, 10, 100, ..., 10**6].

HAND = {
    #             forward                      dX: which w_q land on x_0, x_1, x_2, x_3
    "zeros": ([0, 0, 1, 2, 3, 4, 0], [[2], [3], [4], [5]]),
    # y = [c b | a b c d | c]: x_1 (b) gets its own w3 plus its mirror's w1
    "reflect": ([3, 2, 1, 2, 3, 4, 3], [[2], [1, 3], [0, 4, 6], [5]]),
    # y = [a a | a b c d | d]
    "replicate": ([1, 1, 1, 2, 3, 4, 4], [[0, 1, 2], [3], [4], [5, 6]]),
    # y = [c d | a b c d | a]
    "circular": ([3, 4, 1, 2, 3, 4, 1], [[2, 6], [3], [0, 4], [1, 5]]),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", MODES)
def test_pad_by_hand(mode):
    x = np.arange(1.0, 5.0).reshape(1, 4, 1)
    w = (10.0 ** np.arange(7)).reshape(1, 7, 1)
    forward, sources = HAND[mode]
    for impl in IMPLS:
        y = jc.pad(x, ((2, 1),), mode=mode, impl=impl)
        np.testing.assert_array_equal(y[0, :, 0], forward, impl)
        dx = jax.grad(lambda x: jnp.sum(w * jc.pad(x, ((2, 1),), mode=mode, impl=impl)))(x)
        np.testing.assert_array_equal(dx[0, :, 0], [sum(10.0 ** q for q in qs) for qs in sources],
                                      impl)


@pytest.mark.usefixtures("x64")
def test_pad_2d_corner_folds_twice():
    # Reflect by 1 on both dims of a 3x3: padded row (column) q copies row src[q], so y[q, r]
    # is x[src[q], src[r]] and x[i, j] receives every w[q, r] with src[q] = i, src[r] = j:
    # x[1, 1] nine of them (itself, four edge mirrors, the four corners y[0, 0] .. y[4, 4]).
    x = np.arange(9.0).reshape(1, 3, 3, 1)
    w = np.random.default_rng(0).normal(size=(1, 5, 5, 1))
    src = np.array([1, 0, 1, 2, 1])                        # reflect source of each padded row
    want = np.zeros((3, 3))
    for q in range(5):
        for r in range(5):
            want[src[q], src[r]] += w[0, q, r, 0]
    for impl in IMPLS:
        dx = jax.grad(lambda x: jnp.sum(w * jc.pad(x, 1, mode="reflect", impl=impl)))(x)
        np.testing.assert_allclose(dx[0, :, :, 0], want, rtol=1e-12, err_msg=impl)


# --------------------------------------------------------------------------------------------
# The adjoint: <pad(x), y> = <x, padᵀ(y)>, finite differences.


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", MODES)
def test_pad_backward_is_the_adjoint(mode):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4, 5, 3))
    padding = ((3, 2), (4, 1))
    y = rng.normal(size=jc.pad(x, padding, mode=mode).shape)
    _, vjp = jax.vjp(lambda x: jc.pad(x, padding, mode=mode, impl="manual"), x)
    lhs = np.vdot(jc.pad(x, padding, mode=mode, impl="manual"), y)
    np.testing.assert_allclose(lhs, np.vdot(x, vjp(y)[0]), rtol=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode,order", [("reflect", 2), ("replicate", 1), ("circular", 1)])
def test_pad_check_grads(mode, order):
    x = np.random.default_rng(3).normal(size=(1, 4, 3, 2))
    check_grads(lambda x: jnp.sin(jc.pad(x, ((2, 3), (1, 2)), mode=mode, impl="manual")),
                (x,), order=order, modes=["rev"])


# --------------------------------------------------------------------------------------------
# conv's padding_mode: the same as jnp.pad(mode=...) followed by a VALID conv.


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode,padding,stride", [
    ("reflect", "SAME", 2), ("circular", ((2, 1), (0, 2)), 1)])
def test_conv_padding_mode_is_pad_then_valid(mode, padding, stride):
    rng = np.random.default_rng(4)
    x, k, b = rng.normal(size=(2, 5, 6, 2)), rng.normal(size=(3, 3, 2, 3)), rng.normal(size=3)
    # SAME for a 3x3 window at stride 2: 5 -> (1, 1), 6 -> (0, 1) (the odd unit at the end).
    pads = ((1, 1), (0, 1)) if padding == "SAME" else padding
    fs = {impl: lambda x, k, b, impl=impl: jc.conv(x, k, b, stride=stride, padding=padding,
                                                   padding_mode=mode, impl=impl)
          for impl in IMPLS}
    fs["reference"] = lambda x, k, b: jc.conv(
        jnp.pad(x, ((0, 0), *pads, (0, 0)), mode=NUMPY_MODES[mode]), k, b, stride=stride)
    out = jax.jit(lambda *a: {name: (f(*a), jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))),
                                                       argnums=(0, 1, 2))(*a))
                              for name, f in fs.items()})(x, k, b)
    for impl in IMPLS:
        assert_close(out[impl][0], out["reference"][0], "float64", f"{impl} forward")
        for g, r in zip(out[impl][1], out["reference"][1]):
            assert_close(g, r, "float64", f"{impl} gradient")


def test_conv_padding_mode_zeros_is_the_default():
    rng = np.random.default_rng(5)
    x, k = rng.normal(size=(1, 5, 5, 1)).astype(np.float32), np.ones((3, 3, 1, 1), np.float32)
    for impl in IMPLS:
        np.testing.assert_array_equal(jc.conv(x, k, padding=1, padding_mode="zeros", impl=impl),
                                      jc.conv(x, k, padding=1, impl=impl))


def test_conv_layer_padding_mode():
    x = np.random.default_rng(6).normal(size=(2, 5, 5, 2)).astype(np.float32)
    layer = Conv(3, 3, padding="SAME", padding_mode="circular")
    shape, params = layer.init(jax.random.key(0), x.shape)
    assert shape == (2, 5, 5, 3)
    want = jc.conv(x, params["kernel"], params["bias"], padding="SAME", padding_mode="circular")
    for impl in IMPLS:
        assert_close(layer.apply(params, x, impl=impl), want, "float32", impl)
    with pytest.raises(ValueError, match=r"Conv: padding_mode must be one of \('zeros', "
                                         r"'reflect', 'replicate', 'circular'\); got 'wrap'"):
        Conv(3, 3, padding_mode="wrap")


# --------------------------------------------------------------------------------------------
# Bad input: a clear ValueError / TypeError before any computation, the same for both impls.

ERROR_CASES = [
    (lambda i: jc.pad(X, 1, mode="edge", impl=i), ValueError,
     r"pad: padding_mode must be one of \('zeros', 'reflect', 'replicate', 'circular'\); "
     r"got 'edge'"),
    (lambda i: jc.pad(X, ((1, 4), (0, 0)), mode="reflect", impl=i), ValueError,
     r"pad: reflect padding must be smaller than the input size on each side; spatial dim 0 "
     r"\(x axis 1\) has size 4 and padding \(1, 4\); x has shape \(2, 4, 5, 3\)"),
    (lambda i: jc.pad(X, ((0, 0), (6, 0)), mode="circular", impl=i), ValueError,
     r"pad: circular padding must be at most the input size on each side; spatial dim 1 "
     r"\(x axis 2\) has size 5 and padding \(6, 0\)"),
    (lambda i: jc.pad(X, -1, impl=i), ValueError, r"pad: padding must be >= 0; got -1"),
    (lambda i: jc.pad(X, ((1, 1),), impl=i), ValueError,
     r"pad: padding must be an int or 2 \(low, high\) pairs \(one per spatial dimension\); "
     r"got \(\(1, 1\),\)"),
    (lambda i: jc.pad(X, "SAME", impl=i), ValueError,
     r"pad: padding must be an int or 2 \(low, high\) pairs; got str 'SAME'"),
    (lambda i: jc.pad(X, 1.5, impl=i), TypeError,
     r"pad: padding must be an int or 2 \(low, high\) pairs; got float 1.5"),
    (lambda i: jc.pad(np.zeros((2, 3)), 1, impl=i), ValueError,
     r"pad: x must have rank >= 3, \(N, \*spatial, C\); got x shape \(2, 3\)"),
    (lambda i: jc.conv(X, np.zeros((3, 3, 3, 2)), padding=4, padding_mode="reflect", impl=i),
     ValueError, r"conv: reflect padding must be smaller than the input size on each side; "
                 r"spatial dim 0 \(x axis 1\) has size 4 and padding \(4, 4\)"),
    (lambda i: jc.conv(X, np.zeros((3, 3, 3, 2)), padding_mode="same", impl=i), ValueError,
     r"conv: padding_mode must be one of"),
]


test_bad_input_message = bad_input_test(ERROR_CASES)


def test_pad_layer_applies_its_op():
    from jaxcnn.nn import Pad
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 3)).astype(np.float32)
    layer = Pad(((1, 2), (3, 0)), mode="reflect")
    shape, params = layer.init(jax.random.key(0), (-1, 4, 5, 3))
    assert shape == (-1, 7, 8, 3) and params == {}
    for impl in IMPLS:
        np.testing.assert_array_equal(layer.apply(params, x, impl=impl),
                                      jc.pad(x, ((1, 2), (3, 0)), mode="reflect", impl=impl))
    with pytest.raises(ValueError, match=r"Pad: mode must be one of"):
        Pad(1, mode="wrap")
