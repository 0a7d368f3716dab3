"""Bad input: a clear ValueError / TypeError before any computation, the same for both impls."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc

X = np.zeros((2, 8, 8, 3), np.float32)
K = np.zeros((3, 3, 3, 4), np.float32)

CASES = [
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
    (lambda i: jc.dense(np.zeros((2, 5), np.float32), np.zeros((4, 3), np.float32), impl=i), ValueError,
     r"dense: x features \(x.shape\[-1\]=5\) must equal w rows \(w.shape\[0\]=4\)"),
    (lambda i: jc.dense(np.zeros((2, 5), np.float32), np.zeros((5,), np.float32), impl=i), ValueError,
     r"dense: w must have rank 2, \(D_in, D_out\); got w shape \(5,\)"),
    (lambda i: jc.dense(np.zeros((2, 5), np.float32), np.zeros((5, 3), np.float32),
                        np.zeros((2,), np.float32), impl=i), ValueError,
     r"dense: b must have shape \(D_out,\) = \(3,\); got b shape \(2,\)"),
    (lambda i: jc.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]), impl=i), ValueError,
     r"cross_entropy: labels must lie in \[0, 3\) for logits of shape \(2, 3\); got values from 0 to 3"),
    (lambda i: jc.cross_entropy(np.zeros((2, 3), np.float32), np.array([0.0, 1.0]), impl=i), TypeError,
     r"cross_entropy: labels must be integers"),
    (lambda i: jc.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1, 2]), impl=i), ValueError,
     r"cross_entropy: labels must have shape \(N,\) = \(2,\) to match logits \(2, 3\); got \(3,\)"),
    (lambda i: jc.relu(np.zeros(3, np.int32), impl=i), TypeError, r"relu: x must have a floating dtype"),
]


@pytest.mark.parametrize("impl", ["lax", "manual"])
@pytest.mark.parametrize("call,exc,pattern", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_message(call, exc, pattern, impl):
    with pytest.raises(exc, match=pattern):
        call(impl)


@pytest.mark.parametrize("op", [
    lambda impl: jc.conv(X, K, impl=impl), lambda impl: jc.max_pool(X, 2, impl=impl),
    lambda impl: jc.avg_pool(X, 2, impl=impl), lambda impl: jc.relu(X, impl=impl),
    lambda impl: jc.dense(X, K[0, 0], impl=impl), lambda impl: jc.flatten(X, impl=impl),
    lambda impl: jc.log_softmax(X, impl=impl),
    lambda impl: jc.cross_entropy(X[:, 0, 0], np.array([0, 1]), impl=impl)])
def test_unknown_impl(op):
    with pytest.raises(ValueError, match=r"\w+: impl must be one of \('lax', 'manual'\); got 'fast'"):
        op("fast")
    with pytest.raises(TypeError, match=r"\w+: impl must be a string"):
        op(None)


def test_errors_raise_at_trace_time_under_jit():
    """Under jit the error is the same clear message, raised while tracing."""
    f = jax.jit(lambda x, k: jc.conv(x, k, stride=0, impl="manual"))
    with pytest.raises(ValueError, match=re.escape("conv: stride must be >= 1; got 0")):
        f(X, K)
    g = jax.jit(lambda x: jc.max_pool(x, (2, 2, 2)))
    with pytest.raises(ValueError, match=r"max_pool: x must have rank 5"):
        g(X)


def test_traced_labels_are_not_range_checked_but_work():
    f = jax.jit(lambda z, y: jc.cross_entropy(z, y, impl="manual"))
    assert jnp.isfinite(f(jnp.zeros((2, 3)), jnp.array([0, 2])))
