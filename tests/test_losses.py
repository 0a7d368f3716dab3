"""Losses (cross_entropy, binary_cross_entropy_with_logits, mse): both impls against lax and
optax (forward and gradients), finite differences, hand-computed cases, labels and errors.

Sections: the grid, second-order finite differences and forward-over-reverse, cases by hand
and optax, out-of-range labels, large logits and half precision, bad input.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jaxcnn as jc

from conftest import bad_input_test, IMPLS, assert_close, compare_impls

REDUCTIONS = ["mean", "sum", "none"]
BCE = jc.binary_cross_entropy_with_logits


def _logits(shape, seed=0, scale=3.0, dtype="float64"):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


def _probs(n, c, seed=1, dtype="float64"):
    return np.random.default_rng(seed).dirichlet(np.ones(c), n).astype(dtype)


# --------------------------------------------------------------------------------------------
# The grid: forward manual == lax and jax.grad through manual == through lax (the targets'
# gradients too, where they are floating).


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cross_entropy_grid(dtype):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, 5)) * 3).astype(dtype)
    labels = jnp.asarray([0, 4, 2, 2, 1, 3])
    compare_impls(lambda z, impl: jc.cross_entropy(z, labels, impl=impl), (logits,), dtype)


# Every reduction and smoothing in float64, two configurations in float32.
CE_GRID = [(0.0, "mean", "float64"), (0.1, "sum", "float64"), (0.1, "none", "float64"),
           (0.1, "mean", "float32"), (0.0, "none", "float32")]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("smoothing,reduction,dtype", CE_GRID)
def test_cross_entropy_labels_grid(smoothing, reduction, dtype):
    labels = jnp.asarray([0, 4, 2, 2, 1, 3])
    compare_impls(lambda z, impl: jc.cross_entropy(
        z, labels, label_smoothing=smoothing, reduction=reduction, impl=impl),
        (_logits((6, 5), dtype=dtype),), dtype)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("smoothing,reduction,dtype", CE_GRID)
def test_cross_entropy_probability_targets_grid(smoothing, reduction, dtype):
    """Both the logits' and the targets' gradients."""
    compare_impls(lambda z, t, impl: jc.cross_entropy(
        z, t, label_smoothing=smoothing, reduction=reduction, impl=impl),
        (_logits((4, 3), dtype=dtype), _probs(4, 3, dtype=dtype)), dtype)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("reduction,dtype", [(r, "float64") for r in REDUCTIONS]
                         + [("sum", "float32")])
@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_elementwise_loss_grid(loss, reduction, dtype):
    """Both arguments' gradients; a 4-D shape for the per-element reductions. (Few elements
    of moderate size: compare_impls differentiates sin(L), so float32's rounding of a large
    summed L, different between the log-sigmoid and the max/log1p forms, would be amplified
    by |x| in the targets' gradient -x·cos(L).)"""
    rng = np.random.default_rng(2)
    x = _logits((2, 2, 2, 2), scale=1.5, dtype=dtype)
    if loss == "bce":
        t = rng.uniform(size=x.shape).astype(dtype)
        op = lambda a, b, impl: BCE(a, b, reduction=reduction, impl=impl)   # noqa: E731
    else:
        t = rng.normal(size=x.shape).astype(dtype)
        op = lambda a, b, impl: jc.mse(a, b, reduction=reduction, impl=impl)  # noqa: E731
    compare_impls(op, (x, t), dtype)


# --------------------------------------------------------------------------------------------
# Finite differences, second order, reverse mode (forward mode cannot go through a custom_vjp),
# and forward-over-reverse (jax.jacfwd of jax.grad, through the custom VJP's rules).


@pytest.mark.usefixtures("x64")
def test_cross_entropy_check_grads_second_order():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(4, 5)), rng.normal(size=(5, 3))
    labels = jnp.asarray([0, 2, 1, 2])
    check_grads(lambda z: jc.cross_entropy(z, labels, impl="manual"), (x @ w,), order=2, modes=["rev"])


@pytest.mark.usefixtures("x64")
def test_new_losses_check_grads_second_order():
    z, t = _logits((3, 4)), _probs(3, 4)
    checks = [
        (lambda z, t: jc.cross_entropy(z, t, label_smoothing=0.2, reduction="none",
                                       impl="manual"), (z, t)),
        (lambda x, t: BCE(x, t, reduction="sum", impl="manual"), (z, t)),
    ]   # mse's backward is linear: checked exactly by hand, against optax and lax
    for f, args in checks:
        check_grads(jax.jit(f), args, order=2, modes=["rev"])


@pytest.mark.usefixtures("x64")
def test_forward_over_reverse_matches_lax():
    """jax.jacfwd(jax.grad(loss)) through the manual losses equals it through lax."""
    z, t = _logits((3, 4)), _probs(3, 4)
    labels = jnp.asarray([3, 0, 1])
    losses = {
        "ce labels": lambda z, t, impl: jc.cross_entropy(z, labels, label_smoothing=0.1,
                                                         impl=impl),
        "ce targets": lambda z, t, impl: jnp.sum(jnp.sin(jc.cross_entropy(
            z, t, reduction="none", impl=impl))),
        "bce": lambda z, t, impl: BCE(z, t, impl=impl),
        "mse": lambda z, t, impl: jc.mse(z, t, reduction="sum", impl=impl),
    }

    @jax.jit
    def hessians(z, t):
        return {(name, impl): jax.jacfwd(jax.grad(f, argnums=(0, 1)), argnums=(0, 1))(z, t, impl)
                for name, f in losses.items() for impl in IMPLS}

    out = hessians(z, t)
    for name in losses:
        for got, want in zip(jax.tree_util.tree_leaves(out[name, "manual"]),
                             jax.tree_util.tree_leaves(out[name, "lax"])):
            assert_close(got, want, "float64", name)


# --------------------------------------------------------------------------------------------
# Small cases by hand, and optax as an independent reference.


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_by_hand(impl):
    """logits (0, ln 2, ln 3): softmax p = (1/6, 1/3, 1/2). Label 2: ℓ = -ln(1/2) = ln 2,
    dℓ/dlogits = p - onehot = (1/6, 1/3, -1/2). With ε = 0.3 and C = 3:
    q = 0.7·(0, 0, 1) + 0.1 = (0.1, 0.1, 0.8), ℓ = 0.1·ln 6 + 0.1·ln 3 + 0.8·ln 2, p - q."""
    row = [0.0, math.log(2.0), math.log(3.0)]
    logits = np.array([row, row])                      # N = 2, both labelled 2
    labels = np.array([2, 2])
    p = np.array([1 / 6, 1 / 3, 1 / 2])
    q = np.array([0.1, 0.1, 0.8])
    t = np.stack([q, q])                               # the same q as probability targets
    ce = lambda z, y=labels, **kw: jc.cross_entropy(z, y, impl=impl, **kw)   # noqa: E731
    smoothed = dict(label_smoothing=0.3, reduction="sum")

    @jax.jit
    def run(z, t):
        return (ce(z), jax.grad(ce)(z), ce(z, **smoothed),
                jax.grad(lambda z: ce(z, **smoothed))(z),
                ce(z, label_smoothing=0.3, reduction="none"), ce(z, t),
                jax.grad(lambda t: ce(z, t, reduction="sum"))(t))

    got = run(logits, t)
    smooth = 0.1 * math.log(6.0) + 0.1 * math.log(3.0) + 0.8 * math.log(2.0)
    assert_close(got[0], math.log(2.0), "float64", "mean")
    assert_close(got[1], np.stack([p - [0, 0, 1]] * 2) / 2, "float64", "d mean")
    assert_close(got[2], 2 * smooth, "float64", "sum")
    assert_close(got[3], np.stack([p - q] * 2), "float64", "d sum")
    assert_close(got[4], [smooth, smooth], "float64", "none")
    # Probability targets q: the same loss; dℓ/dq = -(1 - 0)·log p.
    assert_close(got[5], smooth, "float64", "targets")
    assert_close(got[6], -np.log(np.stack([p, p])), "float64", "d targets")


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", IMPLS)
def test_bce_and_mse_by_hand(impl):
    """BCE: x = 0, t = 0.3: ℓ = ln 2, dx = σ(0) - t = 0.2, dt = -x = 0. x = ln 3, t = 1:
    σ = 3/4, ℓ = ln(4/3), dx = -1/4, dt = -ln 3. MSE: pred (1, 2, 4), target (1, 0, 1):
    ℓ = (0, 4, 9), mean 13/3, dpred = 2·(0, 2, 3)/3, dtarget = -dpred."""
    x, t = np.array([0.0, math.log(3.0)]), np.array([0.3, 1.0])
    p, y = np.array([1.0, 2.0, 4.0]), np.array([1.0, 0.0, 1.0])

    @jax.jit
    def run(x, t, p, y):
        return (BCE(x, t, reduction="none", impl=impl),
                jax.grad(lambda x, t: BCE(x, t, reduction="sum", impl=impl), argnums=(0, 1))(x, t),
                jc.mse(p, y, impl=impl), jc.mse(p, y, reduction="sum", impl=impl),
                jc.mse(p, y, reduction="none", impl=impl),
                jax.grad(lambda p, y: jc.mse(p, y, impl=impl), argnums=(0, 1))(p, y))

    bce, (dx, dt), mse_mean, mse_sum, mse_none, (dp, dy) = run(x, t, p, y)
    assert_close(bce, [math.log(2.0), math.log(4 / 3)], "float64", "bce")
    assert_close(dx, [0.2, -0.25], "float64", "bce dx")
    assert_close(dt, [0.0, -math.log(3.0)], "float64", "bce dt")
    assert_close(mse_mean, 13 / 3, "float64", "mse")
    assert_close(mse_sum, 13.0, "float64", "mse sum")
    assert_close(mse_none, [0.0, 4.0, 9.0], "float64", "none")
    assert_close(dp, [0.0, 4 / 3, 2.0], "float64", "mse dpred")
    assert_close(dy, [0.0, -4 / 3, -2.0], "float64", "mse dtarget")


def _reduce(v, reduction):
    return {"mean": jnp.mean, "sum": jnp.sum, "none": lambda v: v}[reduction](v)


@pytest.mark.usefixtures("x64")
def test_losses_match_optax():
    """optax (its own formulas: log-softmax against smoothed one-hot targets, log-sigmoid,
    squared error), forward and jax.grad, against both impls, for every reduction."""
    z, t, labels = _logits((5, 4)), _probs(5, 4), np.array([0, 3, 1, 1, 2])
    onehot = jax.nn.one_hot(labels, 4, dtype=jnp.float64)
    u = np.random.default_rng(3).uniform(size=(5, 4))
    cases = {
        "ce labels": (lambda z, t, impl, r: jc.cross_entropy(
            z, labels, label_smoothing=0.1, reduction=r, impl=impl),
            lambda z, t: optax.softmax_cross_entropy(z, optax.smooth_labels(onehot, 0.1)), t),
        "ce targets": (lambda z, t, impl, r: jc.cross_entropy(
            z, t, label_smoothing=0.2, reduction=r, impl=impl),
            lambda z, t: optax.softmax_cross_entropy(z, optax.smooth_labels(t, 0.2)), t),
        "bce": (lambda z, t, impl, r: BCE(z, t, reduction=r, impl=impl),
                optax.sigmoid_binary_cross_entropy, u),
        "mse": (lambda z, t, impl, r: jc.mse(z, t, reduction=r, impl=impl),
                optax.squared_error, u),
    }
    scalar = lambda f: lambda z, t: jnp.sum(jnp.sin(f(z, t)))   # noqa: E731

    @jax.jit
    def run(z):
        out = {}
        for r in REDUCTIONS:
            for name, (ours, theirs, target) in cases.items():
                fs = {"optax": (lambda theirs: lambda z, t: _reduce(theirs(z, t), r))(theirs)}
                fs.update({impl: (lambda impl: lambda z, t: ours(z, t, impl, r))(impl)
                           for impl in IMPLS})
                for key, f in fs.items():
                    out[r, name, key] = (f(z, target),
                                         jax.grad(scalar(f), argnums=(0, 1))(z, target))
        return out

    out = run(z)
    for r in REDUCTIONS:
        for name in cases:
            want = out[r, name, "optax"]
            for impl in IMPLS:
                got, what = out[r, name, impl], f"{name} {impl} {r}"
                assert_close(got[0], want[0], "float64", f"{what} loss")
                assert_close(got[1][0], want[1][0], "float64", f"{what} d prediction")
                if name != "ce labels":
                    assert_close(got[1][1], want[1][1], "float64", f"{what} d targets")


@pytest.mark.usefixtures("x64")
def test_bce_gradient_at_zero_logit():
    """At x = 0 exactly: dℓ/dx = σ(0) - t = 0.5 - t under both impls. (Autodiff of the stable
    form max(x, 0) - x·t + log1p(exp(-|x|)) itself would give -t there: JAX's max and abs
    split their derivative at 0 differently; lax uses log-sigmoid, manual its own backward.)"""
    x, t = jnp.zeros(3), jnp.array([0.0, 0.3, 1.0])
    for impl in IMPLS:
        dx = jax.grad(lambda x: BCE(x, t, reduction="sum", impl=impl))(x)
        assert_close(dx, 0.5 - t, "float64", impl)


# --------------------------------------------------------------------------------------------
# Out-of-range integer labels under jit (where they cannot be checked): the same defined
# behaviour for both impls. Concrete labels raise (see ERROR_CASES).


@pytest.mark.usefixtures("x64")
def test_out_of_range_labels_under_jit_give_nan_rows():
    """A label outside [0, C) gives that example a NaN loss (a NaN mean or sum) and a NaN row
    in the logits' gradient under both impls; the other rows' gradients are those of the summed
    loss over the valid examples (for the mean, divided by N, bad rows included). Every
    reduction, with and without smoothing."""
    z = _logits((5, 3))
    labels = jnp.asarray([0, 3, 2, -1, 1])              # rows 1 and 3 out of range, C = 3
    bad = np.array([False, True, False, True, False])
    configs = [("mean", 0.0), ("sum", 0.1), ("none", 0.1), ("mean", 0.2)]

    @jax.jit
    def run(z, labels, z_valid, labels_valid):
        out = {}
        for reduction, smoothing in configs:
            for impl in IMPLS:
                f = (lambda impl, s: lambda z, y, r: jc.cross_entropy(
                    z, y, label_smoothing=s, reduction=r, impl=impl))(impl, smoothing)
                out[reduction, smoothing, impl] = (
                    f(z, labels, reduction),
                    jax.grad(lambda z: jnp.sum(f(z, labels, reduction)))(z),
                    jax.grad(lambda z: f(z, labels_valid, "sum"))(z_valid))
        return out

    out = run(z, labels, z[~bad], labels[~bad])
    for reduction, smoothing in configs:
        scale = 1 / 5 if reduction == "mean" else 1.0
        for impl in IMPLS:
            what = f"{reduction} {smoothing} {impl}"
            loss, grad, grad_valid = out[reduction, smoothing, impl]
            if reduction == "none":
                np.testing.assert_array_equal(np.isnan(loss), bad, err_msg=what)
            else:
                assert np.isnan(loss), what
            assert np.all(np.isnan(grad[bad])), what
            assert_close(grad[~bad], scale * np.asarray(grad_valid), "float64", what)
        for a, b in zip(out[reduction, smoothing, "manual"], out[reduction, smoothing, "lax"]):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_traced_labels_are_not_range_checked_but_work():
    f = jax.jit(lambda z, y: jc.cross_entropy(z, y, impl="manual"))
    assert jnp.isfinite(f(jnp.zeros((2, 3)), jnp.array([0, 2])))


# --------------------------------------------------------------------------------------------
# Large logits (float32, no overflow) and half precision.


def test_large_logits_float32():
    """Logits ±100 in float32: finite losses and gradients, and the values by hand."""
    z = np.array([[-100.0, 100.0, 0.0], [100.0, -100.0, 50.0]], np.float32)
    t = np.array([[0.0, 1.0, 0.5], [0.2, 0.0, 1.0]], np.float32)
    calls = {
        "ce smoothed": lambda z, t, impl: jc.cross_entropy(z, np.array([0, 2]),
                                                           label_smoothing=0.1, impl=impl),
        "ce targets": lambda z, t, impl: jc.cross_entropy(z, t / t.sum(axis=1, keepdims=True),
                                                          impl=impl),
        "bce": lambda z, t, impl: BCE(z, t, impl=impl),
        # BCE by hand: ℓ(-100, 0) = 0 (to float32), ℓ(100, 1) = 0, ℓ(0, .5) = ln 2,
        # ℓ(100, .2) = 100 - 20 = 80, ℓ(-100, 0) ≈ 0, ℓ(50, 1) ≈ 0.
        "bce none": lambda z, t, impl: BCE(z, t, reduction="none", impl=impl),
        # CE with label 0: -log_softmax = 200 in row 0 (logit -100 against 100), 0 in row 1
        # (100 against 50: e^-50 is below float32's resolution at 1).
        "ce none": lambda z, t, impl: jc.cross_entropy(z, np.array([0, 0]), reduction="none",
                                                       impl=impl),
    }
    by_hand = {"bce none": [[0.0, 0.0, math.log(2.0)], [80.0, 0.0, 0.0]], "ce none": [200.0, 0.0]}

    @jax.jit
    def run(z, t):
        return {(name, impl): (f(z, t, impl), jax.grad(lambda z: jnp.sum(f(z, t, impl)))(z))
                for name, f in calls.items() for impl in IMPLS}

    out = run(z, t)
    for name in calls:
        for impl in IMPLS:
            loss, grad = out[name, impl]
            assert loss.dtype == np.float32 and grad.dtype == np.float32, (name, impl)
            assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad)), (name, impl)
            if name in by_hand:
                assert_close(loss, by_hand[name], "float32", f"{name} {impl}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16])   # float16 takes the same path (_acc)
def test_half_precision_losses_compute_in_float32(dtype):
    """Half-precision logits: the loss keeps their dtype and is the float32 loss (of the same
    values) rounded once; the targets' gradient keeps the targets' dtype (float32 here)."""
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.normal(size=(8, 5)) * 3, dtype)
    t32 = jnp.asarray(_probs(8, 5, dtype="float32"))
    labels = jnp.asarray(rng.integers(0, 5, 8))
    calls = {
        "ce": lambda z, t, impl: jc.cross_entropy(z, labels, label_smoothing=0.1, impl=impl),
        "ce targets": lambda z, t, impl: jc.cross_entropy(z, t, impl=impl),
        "bce": lambda z, t, impl: BCE(z, jnp.abs(t), impl=impl),
        "mse": lambda z, t, impl: jc.mse(z, t, reduction="sum", impl=impl),
    }
    @jax.jit
    def run(z, t32):
        return {(name, impl): jax.value_and_grad(f, argnums=(0, 1))(z, t32, impl)
                for name, f in calls.items() for impl in IMPLS} | {
                    (name, "float32"): f(z.astype(jnp.float32), t32, "lax")
                    for name, f in calls.items()}

    out = run(z, t32)
    eps = float(jnp.finfo(dtype).eps)
    for name in calls:
        want = np.float64(out[name, "float32"])
        for impl in IMPLS:
            loss, (dz, dt) = out[name, impl]
            assert (loss.dtype, dz.dtype, dt.dtype) == (dtype, dtype, jnp.float32), (name, impl)
            np.testing.assert_allclose(np.float64(loss), want, rtol=eps, err_msg=f"{name} {impl}")


# --------------------------------------------------------------------------------------------
# Labels and bad input: a clear ValueError / TypeError before any computation, the same for
# both impls; traced labels cannot be range-checked.

Z = np.zeros((2, 3), np.float32)

ERROR_CASES = [
    # (call, exception, message pattern)
    (lambda i: jc.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]), impl=i), ValueError,
     r"cross_entropy: labels must lie in 0\.\.2 for logits of shape \(2, 3\); got values from 0 to 3"),
    (lambda i: jc.cross_entropy(np.zeros((2, 3), np.float32), np.array([0.0, 1.0]), impl=i), TypeError,
     r"cross_entropy: labels must be integers"),
    (lambda i: jc.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1, 2]), impl=i), ValueError,
     r"cross_entropy: labels must have shape \(N,\) = \(2,\) to match logits \(2, 3\); got \(3,\)"),
    # New arguments.
    (lambda i: jc.cross_entropy(Z, np.array([0, -1]), label_smoothing=0.1, impl=i), ValueError,
     r"cross_entropy: labels must lie in 0\.\.2 for logits of shape \(2, 3\); got values from -1 to 0"),
    (lambda i: jc.cross_entropy(Z, np.array([0.0, 1.0]), impl=i), TypeError,
     r"cross_entropy: labels must be integers \(N,\) or floating probability targets of the "
     r"logits' shape \(N, C\) = \(2, 3\); got float64 labels of shape \(2,\)"),
    (lambda i: jc.cross_entropy(Z, np.zeros((2, 4), np.float32), impl=i), ValueError,
     r"cross_entropy: probability targets \(floating labels\) must have the logits' shape "
     r"\(N, C\) = \(2, 3\); got \(2, 4\)"),
    (lambda i: jc.cross_entropy(Z, np.zeros((2, 3), np.int32), impl=i), ValueError,
     r"cross_entropy: labels must have shape \(N,\) = \(2,\) to match logits \(2, 3\); got \(2, 3\)"),
    (lambda i: jc.cross_entropy(Z, np.array([True, False]), impl=i), TypeError,
     r"cross_entropy: labels must be integers \(N,\); got dtype bool"),
    (lambda i: jc.cross_entropy(Z[0], np.zeros(3, np.float32), impl=i), ValueError,
     r"cross_entropy: logits must have rank 2, \(N, num_classes\); got shape \(3,\)"),
    (lambda i: jc.cross_entropy(Z, np.array([0, 1]), label_smoothing=1.0, impl=i), ValueError,
     r"cross_entropy: label_smoothing must be a finite number in \[0, 1\); got 1.0"),
    (lambda i: jc.cross_entropy(Z, np.array([0, 1]), label_smoothing=-0.1, impl=i), ValueError,
     r"cross_entropy: label_smoothing must be a finite number in \[0, 1\); got -0.1"),
    (lambda i: jc.cross_entropy(Z, np.array([0, 1]), label_smoothing=float("nan"), impl=i),
     ValueError, r"cross_entropy: label_smoothing must be a finite number in \[0, 1\); got nan"),
    (lambda i: jc.cross_entropy(Z, np.array([0, 1]), label_smoothing="0.1", impl=i), TypeError,
     r"cross_entropy: label_smoothing must be a Python number; got str '0.1'"),
    (lambda i: jc.cross_entropy(Z, np.array([0, 1]), label_smoothing=None, impl=i), TypeError,
     r"cross_entropy: label_smoothing must be a Python number; got NoneType None"),
    (lambda i: jc.cross_entropy(Z, np.array([0, 1]), reduction="avg", impl=i), ValueError,
     r"cross_entropy: reduction must be one of \('mean', 'sum', 'none'\); got 'avg'"),
    (lambda i: jc.cross_entropy(Z, np.array([0, 1]), reduction=None, impl=i), ValueError,
     r"cross_entropy: reduction must be one of \('mean', 'sum', 'none'\); got None"),
    (lambda i: BCE(Z, Z, reduction="Mean", impl=i), ValueError,
     r"binary_cross_entropy_with_logits: reduction must be one of \('mean', 'sum', 'none'\); got 'Mean'"),
    (lambda i: BCE(Z, np.zeros((2, 3), np.int32), impl=i), TypeError,
     r"binary_cross_entropy_with_logits: targets must have a floating dtype \(float16, bfloat16, "
     r"float32 or float64\); got int32"),
    (lambda i: BCE(Z, np.zeros((3, 2), np.float32), impl=i), ValueError,
     r"binary_cross_entropy_with_logits: targets must have the shape of logits \(2, 3\); got \(3, 2\)"),
    (lambda i: BCE(np.zeros((2, 3), np.int32), Z, impl=i), TypeError,
     r"binary_cross_entropy_with_logits: logits must have a floating dtype"),
    (lambda i: BCE(Z, "t", impl=i), TypeError, r"binary_cross_entropy_with_logits: targets must be an array; got str"),
    (lambda i: jc.mse(Z, Z, reduction="mean ", impl=i), ValueError,
     r"mse: reduction must be one of \('mean', 'sum', 'none'\); got 'mean '"),
    (lambda i: jc.mse(Z, np.zeros(3, np.float32), impl=i), ValueError,
     r"mse: target must have the shape of pred \(2, 3\); got \(3,\)"),
    (lambda i: jc.mse(Z, np.zeros((2, 3), np.bool_), impl=i), TypeError,
     r"mse: target must have a floating dtype \(float16, bfloat16, float32 or float64\); got bool"),
    (lambda i: jc.mse(np.zeros((2, 3), np.int64), Z, impl=i), TypeError, r"mse: pred must have a floating dtype"),
]


test_bad_input_message = bad_input_test(ERROR_CASES)


@pytest.mark.parametrize("op", [lambda impl: BCE(Z, Z, impl=impl),
                                lambda impl: jc.mse(Z, Z, impl=impl)])
def test_unknown_impl(op):
    with pytest.raises(ValueError, match=r"\w+: impl must be one of \('lax', 'manual'\); got 'fast'"):
        op("fast")
