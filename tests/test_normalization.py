"""batch_norm (train and eval mode) and layer_norm: both impls against lax (forward and
gradients), finite differences, cases by hand, edge cases, half precision, several devices,
errors.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc
from jaxcnn.check import BFLOAT16_TOLERANCES

from conftest import IMPLS, ROOT, assert_close, bad_input_test, compare_impls, sampled


def _params(c, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype))


def _train_flat(x, scale, offset, impl, eps=1e-5):
    """Train mode as one array (y, then the batch mean and variance), so that the gradient
    checks cover the paths through the returned statistics too."""
    y, (mean, var) = jc.batch_norm(x, scale, offset, train=True, eps=eps, impl=impl)
    return jnp.concatenate([y.ravel(), mean, var])


def _eval(x, scale, offset, mean, var, impl, eps=1e-5):
    return jc.batch_norm(x, scale, offset, mean=mean, var=var, train=False, eps=eps, impl=impl)


# --------------------------------------------------------------------------------------------
# batch_norm: the grid. Batch 1 and 2, features and 1-3 spatial dims, one element per channel.

BN_SHAPES = [
    (2, 5),            # features, batch 2: M = 2
    (1, 5),            # batch 1, no spatial dims: M = 1 (variance 0)
    (1, 1, 1, 3),      # batch 1, a 1x1 image: M = 1
    (1, 4, 3, 3),      # batch 1, an image: M = 12
    (2, 5, 4, 3),      # batch 2, an image
    (2, 7, 2),         # 1 spatial dim
    (2, 3, 2, 3, 2),   # 3 spatial dims
]
# Every shape in float64; float32 (the tolerance of its own table) on two of them.
BN_GRID = [(s, "float64") for s in BN_SHAPES] + [((1, 5), "float32"), ((2, 5, 4, 3), "float32")]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("shape, dtype", sampled(BN_GRID, 2, (0,)), ids=str)
def test_batch_norm_train_grid(shape, dtype):
    x = np.random.default_rng(0).normal(size=shape).astype(dtype)
    compare_impls(_train_flat, (x, *_params(shape[-1], dtype)), dtype)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("shape, dtype", sampled(BN_GRID, 2, (1,)), ids=str)
def test_batch_norm_eval_grid(shape, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(dtype)
    c = shape[-1]
    mean = rng.normal(size=c).astype(dtype)
    var = (0.5 + rng.random(c)).astype(dtype)
    compare_impls(_eval, (x, *_params(c, dtype), mean, var), dtype)


@pytest.mark.usefixtures("x64")
def test_batch_norm_check_grads_second_order():
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 2))
    scale, offset = _params(2, "float64")
    check_grads(lambda *a: _train_flat(*a, "manual"), (x, scale, offset), order=2,
                modes=["rev"])
    mean, var = np.array([0.3, -0.2]), np.array([0.8, 1.7])
    check_grads(lambda *a: _eval(*a, "manual"), (x, scale, offset, mean, var), order=2,
                modes=["rev"])


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", IMPLS)
def test_batch_norm_by_hand(impl):
    # One channel, x = [1, 3]: μ = 2, v = 1; eps = 3 makes σ = sqrt(1 + 3) = 2, x̂ = [-1/2, 1/2].
    # γ = 2, β = 1/2: y = γ x̂ + β = [-1/2, 3/2].
    # dY = [1, 0]: dβ = Σ dY = 1, dγ = Σ dY·x̂ = -1/2, and
    # dX = (γ/σ)(dY - dβ/M - x̂·dγ/M) = 1·([1, 0] - 1/2 - [-1/2, 1/2]·(-1/4)) = [3/8, -3/8].
    x, scale, offset = np.array([[1.0], [3.0]]), np.array([2.0]), np.array([0.5])

    def loss(x, scale, offset):
        y, _ = jc.batch_norm(x, scale, offset, train=True, eps=3.0, impl=impl)
        return y[0, 0]

    y, (mean, var) = jc.batch_norm(x, scale, offset, train=True, eps=3.0, impl=impl)
    np.testing.assert_allclose(y, [[-0.5], [1.5]], rtol=1e-15)
    np.testing.assert_allclose(mean, [2.0], rtol=1e-15)
    np.testing.assert_allclose(var, [1.0], rtol=1e-15)
    dx, dscale, doffset = jax.grad(loss, argnums=(0, 1, 2))(x, scale, offset)
    np.testing.assert_allclose(dx, [[0.375], [-0.375]], rtol=1e-14)
    np.testing.assert_allclose(dscale, [-0.5], rtol=1e-15)
    np.testing.assert_allclose(doffset, [1.0], rtol=1e-15)
    # Eval mode, μ = 1, v = 3, eps = 1 (σ = 2): x̂ = [0, 1], y = [1/2, 5/2]; dX = dY·γ/σ = [1, 0],
    # dμ = -(γ/σ)·Σ dY = -1, dv = -γ·Σ(dY·x̂)/(2σ²) = 0.
    mean, var = np.array([1.0]), np.array([3.0])
    y = jc.batch_norm(x, scale, offset, mean=mean, var=var, train=False, eps=1.0, impl=impl)
    np.testing.assert_allclose(y, [[0.5], [2.5]], rtol=1e-15)
    grads = jax.grad(lambda *a: jc.batch_norm(*a[:3], mean=a[3], var=a[4], train=False,
                                              eps=1.0, impl=impl)[0, 0],
                     argnums=(0, 1, 2, 3, 4))(x, scale, offset, mean, var)
    for got, want in zip(grads, [[[1.0], [0.0]], [0.0], [1.0], [-1.0], [0.0]]):
        np.testing.assert_allclose(got, want, rtol=1e-15, atol=1e-15)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", IMPLS)
def test_batch_norm_constant_channel_and_one_element(impl):
    # A constant channel and M = 1 both have variance 0: x̂ = 0, y = offset, dX = 0 (finite).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 3, 2))
    x[..., 0] = 4.0
    scale, offset = np.array([1.5, 1.0]), np.array([0.25, 0.0])
    y, (mean, var) = jc.batch_norm(x, scale, offset, train=True, impl=impl)
    np.testing.assert_array_equal(y[..., 0], 0.25)
    assert mean[0] == 4.0 and var[0] == 0.0
    dx = jax.grad(lambda x: jnp.sum(jnp.sin(_train_flat(x, scale, offset, impl))))(x)
    assert np.all(np.isfinite(dx))
    one = rng.normal(size=(1, 4))
    y, (mean, var) = jc.batch_norm(one, scale[:1].repeat(4), offset[:1].repeat(4), train=True,
                                   impl=impl)
    np.testing.assert_array_equal(y, np.full((1, 4), 0.25))
    np.testing.assert_array_equal(var, np.zeros(4))
    dx = jax.grad(lambda x: jnp.sum(jnp.sin(jc.batch_norm(x, np.ones(4), np.zeros(4),
                                                          train=True, impl=impl)[0])))(one)
    np.testing.assert_array_equal(dx, np.zeros((1, 4)))


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_norm_bfloat16_accumulates_in_float32(impl):
    # 8192 elements per channel around 3: a bfloat16 running sum would lose the small values
    # (8 bits of mantissa); the statistics come back float32, equal to float32's on the same
    # (bfloat16-exact) inputs, and y is float32's y rounded once.
    rng = np.random.default_rng(0)
    x = (3 + rng.normal(size=(32, 16, 16, 2))).astype(jnp.bfloat16)
    scale, offset = np.ones(2, jnp.bfloat16), np.zeros(2, jnp.bfloat16)
    y, (mean, var) = jc.batch_norm(x, scale, offset, train=True, impl=impl)
    y32, (mean32, var32) = jc.batch_norm(x.astype(np.float32), scale.astype(np.float32),
                                         offset.astype(np.float32), train=True, impl=impl)
    assert y.dtype == jnp.bfloat16 and mean.dtype == var.dtype == np.float32
    assert_close(mean, mean32, "float32", "batch mean")
    assert_close(var, var32, "float32", "batch variance")
    np.testing.assert_allclose(np.asarray(y, np.float32), y32,
                               **BFLOAT16_TOLERANCES["op"])
    grads = jax.grad(lambda x: jnp.sum(jc.batch_norm(x, scale, offset, train=True,
                                                     impl=impl)[0] ** 3), )(x)
    assert grads.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grads, np.float32)))


# --------------------------------------------------------------------------------------------
# layer_norm.

LN_CASES = [((3, 6), -1), ((2, 4, 3, 5), -1), ((2, 4, 3, 5), (1, 2, 3)), ((2, 4, 3, 5), (1, 3)),
            ((3, 1), -1), ((4, 5), 0)]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dtype", ["float64", pytest.param("float32", marks=pytest.mark.slow)])
@pytest.mark.parametrize("shape, axes", LN_CASES, ids=str)
def test_layer_norm_grid(shape, axes, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(dtype)
    norm = sorted(np.atleast_1d(axes) % len(shape))
    feature = tuple(shape[a] for a in norm)
    scale, offset = (rng.normal(size=feature).astype(dtype) for _ in range(2))
    compare_impls(lambda x, s, o, impl: jc.layer_norm(x, s, o, axes=axes, impl=impl),
                  (x, scale, offset), dtype)


@pytest.mark.usefixtures("x64")
def test_layer_norm_check_grads_second_order():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4))
    scale, offset = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    check_grads(lambda *a: jc.layer_norm(*a, axes=(1, 2), impl="manual"), (x, scale, offset),
                order=2, modes=["rev"])


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm_by_hand(impl):
    # Each row standardized on its own: [1, 3] and [4, 8] have μ = 2, 6 and v = 1, 4; with
    # eps = 0 they would give x̂ = [-1, 1] both. eps = 1e-12 changes nothing at 1e-11.
    x = np.array([[1.0, 3.0], [4.0, 8.0]])
    y = jc.layer_norm(x, np.array([1.0, 2.0]), np.array([0.0, 1.0]), eps=1e-12, impl=impl)
    np.testing.assert_allclose(y, [[-1.0, 3.0], [-1.0, 3.0]], rtol=1e-11)
    # dY = [[1, 0], [0, 0]]: row 0 only, dX̂ = γ·dY = [1, 0], σ = 1, mean(dX̂) = 1/2,
    # mean(dX̂·x̂) = -1/2: dX = [1 - 1/2 - (-1)(-1/2), 0 - 1/2 - (1)(-1/2)] = [0, 0]: shifting
    # one element of a 2-element row never changes its standardized value.
    dx = jax.grad(lambda x: jc.layer_norm(x, np.array([1.0, 2.0]), np.array([0.0, 1.0]),
                                          eps=1e-12, impl=impl)[0, 0])(x)
    np.testing.assert_allclose(dx, np.zeros((2, 2)), atol=1e-11)


@pytest.mark.usefixtures("x64")
def test_forward_over_reverse_hessians_equal_lax():
    # jax.hessian (forward mode over the hand-derived reverse rule) of each op equals lax's.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2))
    scale, offset = rng.normal(size=2), rng.normal(size=2)
    losses = [
        lambda x, i: jnp.sum(jnp.sin(_train_flat(x, scale, offset, i))),
        lambda x, i: jnp.sum(jnp.sin(_eval(x, scale, offset, offset, scale ** 2 + 1, i))),
        lambda x, i: jnp.sum(jnp.sin(jc.layer_norm(x, scale, offset, impl=i))),
    ]

    @jax.jit                                    # one compilation for the three ops
    def hessians(x):
        return [(jax.hessian(lambda x: loss(x, "lax"))(x),
                 jax.hessian(lambda x: loss(x, "manual"))(x),
                 jax.jacfwd(jax.grad(lambda x: loss(x, "manual")))(x)) for loss in losses]

    for want, hessian, jacfwd_of_grad in hessians(x):
        assert_close(hessian, want, "float64")
        assert_close(jacfwd_of_grad, want, "float64")


# --------------------------------------------------------------------------------------------
# Several devices: the batch statistics of a batch sharded over 4 devices are the global ones.

_DEVICES_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jaxcnn as jc
assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 5, 5, 3)).astype(np.float32) + np.arange(8)[:, None, None, None]
scale, offset = np.float32([1.0, 2.0, 0.5]), np.float32([0.0, 1.0, -1.0])
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
report = {"shards": len(xs.addressable_shards)}
for impl in ("lax", "manual"):
    def f(x, impl=impl):
        y, (m, v) = jc.batch_norm(x, scale, offset, train=True, impl=impl)
        return y, m, v, jax.grad(lambda x: jnp.sum(jc.batch_norm(x, scale, offset, train=True,
                                                                 impl=impl)[0] ** 3))(x)
    sharded, single = jax.jit(f)(xs), jax.jit(f)(x)
    report[impl] = [float(np.max(np.abs(a - b))) for a, b in zip(sharded, single)]
    report[impl + "_mean_err"] = float(np.max(np.abs(sharded[1] - x.mean(axis=(0, 1, 2)))))
json.dump(report, sys.stdout)
"""


def test_batch_statistics_are_global_over_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          " --xla_force_host_platform_device_count=4").strip())
    out = subprocess.run([sys.executable, "-c", _DEVICES_CHILD], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["shards"] == 4
    for impl in IMPLS:
        # The rows' means differ by up to 7 between shards: per-shard statistics would be off
        # by about 3.5 in the mean; the global ones agree with one device to float32 rounding.
        assert report[impl + "_mean_err"] < 1e-5, report
        assert max(report[impl]) < 1e-4, report


# --------------------------------------------------------------------------------------------
# Bad input: a clear ValueError / TypeError before any computation, the same for both impls.

X, C3 = np.zeros((2, 4, 4, 3), np.float32), np.ones(3, np.float32)

ERROR_CASES = [
    (lambda i: jc.batch_norm(np.zeros(3, np.float32), C3, C3, train=True, impl=i), ValueError,
     r"batch_norm: x must have rank >= 2, \(N, \*spatial, C\) with channels last; got x shape "
     r"\(3,\)"),
    (lambda i: jc.batch_norm(X, np.ones(4, np.float32), C3, train=True, impl=i), ValueError,
     r"batch_norm: scale must have shape \(C,\) = \(3,\), one entry per channel of x "
     r"\(2, 4, 4, 3\); got scale shape \(4,\)"),
    (lambda i: jc.batch_norm(X, C3, C3, train=1, impl=i), TypeError,
     r"batch_norm: train must be a bool; got 1"),
    (lambda i: jc.batch_norm(X, C3, C3, mean=C3, var=C3, train=True, impl=i), ValueError,
     r"batch_norm: mean and var are the statistics of eval mode; train mode \(train=True\) "
     r"computes the batch statistics and returns them; got mean and var"),
    (lambda i: jc.batch_norm(X, C3, C3, mean=C3, train=False, impl=i), ValueError,
     r"batch_norm: eval mode \(train=False\) needs mean and var, .*; got no var"),
    (lambda i: jc.batch_norm(X, C3, C3, mean=C3, var=np.ones(2, np.float32), train=False,
                             impl=i), ValueError, r"batch_norm: var must have shape \(C,\) = "),
    (lambda i: jc.batch_norm(np.zeros((0, 3), np.float32), C3, C3, train=True, impl=i),
     ValueError, r"batch_norm: train mode needs at least one element per channel over the "
                 r"batch and spatial axes \(the statistics of zero elements are undefined\); "
                 r"got x shape \(0, 3\)"),
    (lambda i: jc.batch_norm(X, C3, C3, train=True, eps=0.0, impl=i), ValueError,
     r"batch_norm: eps must be a finite number > 0; got 0.0"),
    (lambda i: jc.batch_norm(X, C3, C3, train=True, eps="1e-5", impl=i), TypeError,
     r"batch_norm: eps must be a Python number; got str '1e-5'"),
    (lambda i: jc.batch_norm(X.astype(np.int32), C3, C3, train=True, impl=i), TypeError,
     r"batch_norm: x must have a floating dtype"),
    (lambda i: jc.layer_norm(X, C3, C3, axes=4, impl=i), ValueError,
     r"layer_norm: axes must lie in \[-4, 3\] for x of shape \(2, 4, 4, 3\); got 4"),
    (lambda i: jc.layer_norm(X, C3, C3, axes=(3, -1), impl=i), ValueError,
     r"layer_norm: axes must not repeat an axis; got \(3, -1\)"),
    (lambda i: jc.layer_norm(X, C3, C3, axes=(), impl=i), TypeError,
     r"layer_norm: axes must be an int or a non-empty tuple of ints; got \(\)"),
    (lambda i: jc.layer_norm(X, C3, C3, axes=(1, 2), impl=i), ValueError,
     r"layer_norm: scale must have the shape of x on the normalized axes \(1, 2\), \(4, 4\); "
     r"got scale shape \(3,\)"),
    (lambda i: jc.layer_norm(np.zeros((2, 0), np.float32), np.ones(0, np.float32),
                             np.ones(0, np.float32), impl=i), ValueError,
     r"layer_norm: the normalized axes \(1,\) of x \(2, 0\) hold no element"),
    (lambda i: jc.layer_norm(X, C3, C3, eps=float("nan"), impl=i), ValueError,
     r"layer_norm: eps must be a finite number > 0; got nan"),
]


test_bad_input_message = bad_input_test(ERROR_CASES)
