"""dropout: the mask's statistics, rate 0 and 1, determinism per key, both impls equal
(forward and gradient), finite differences, a case checked by hand, errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc

from conftest import bad_input_test, IMPLS, compare_impls

KEY = jax.random.key(0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_mask_statistics(rate, impl):
    # n = 200,000 kept-or-dropped draws: the kept fraction has standard deviation
    # sqrt(rate (1 - rate) / n) <= 0.0011; a bound of 5 standard deviations fails a correct
    # dropout with probability < 1e-6, and catches a swapped rate (0.1 <-> 0.9) by far.
    n = 200_000
    y = jc.dropout(jnp.ones((4, n // 4)), rate, KEY, impl=impl)
    kept = np.asarray(y) != 0
    sd = np.sqrt(rate * (1 - rate) / n)
    assert abs(kept.mean() - (1 - rate)) < 5 * sd
    # Inverted scaling: kept elements are 1 / (1 - rate), so E[y] = x.
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / (1 - rate), rtol=1e-6)
    assert abs(np.asarray(y).mean() - 1) < 5 * sd / (1 - rate)


@pytest.mark.parametrize("impl", IMPLS)
def test_by_hand_each_element_doubled_or_zeroed(impl):
    # rate 1/2: y_i is 0 or 2 x_i, and dL/dx_i for L = Σ y is 0 or 2 accordingly.
    x = jnp.arange(1.0, 41.0).reshape(5, 8)
    y = jc.dropout(x, 0.5, KEY, impl=impl)
    doubled = np.asarray(y) == 2 * np.asarray(x)
    assert np.all(doubled | (np.asarray(y) == 0)) and 0 < doubled.sum() < x.size
    dx = jax.grad(lambda x: jnp.sum(jc.dropout(x, 0.5, KEY, impl=impl)))(x)
    np.testing.assert_array_equal(dx, np.where(doubled, 2.0, 0.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_rate_zero_one_and_deterministic(impl):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7)), jnp.float32)
    grad = lambda rate, **kw: jax.grad(  # noqa: E731
        lambda x: jnp.sum(jc.dropout(x, rate, KEY, impl=impl, **kw) * 3))(x)
    np.testing.assert_array_equal(jc.dropout(x, 0.0, None, impl=impl), x)   # no key needed
    np.testing.assert_array_equal(grad(0.0), np.full(x.shape, 3.0))
    np.testing.assert_array_equal(jc.dropout(x, 0.5, None, deterministic=True, impl=impl), x)
    np.testing.assert_array_equal(grad(0.5, deterministic=True), np.full(x.shape, 3.0))
    y1 = jc.dropout(x, 1.0, KEY, impl=impl)
    np.testing.assert_array_equal(y1, np.zeros(x.shape))                    # no 0 · inf = NaN
    np.testing.assert_array_equal(grad(1.0), np.zeros(x.shape))


def test_deterministic_per_key_same_mask_in_both_impls():
    x = jnp.ones((64, 32))
    a = jc.dropout(x, 0.3, KEY, impl="manual")
    np.testing.assert_array_equal(a, jc.dropout(x, 0.3, KEY, impl="manual"))
    np.testing.assert_array_equal(a != 0, jc.dropout(x, 0.3, KEY, impl="lax") != 0)
    assert not np.array_equal(a, jc.dropout(x, 0.3, jax.random.key(1), impl="manual"))
    raw = jax.random.PRNGKey(0)                     # a raw uint32 key works too, under jit
    b = jax.jit(lambda x, k: jc.dropout(x, 0.3, k, impl="manual"))(x, raw)
    np.testing.assert_array_equal(b, jc.dropout(x, 0.3, raw, impl="lax"))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_impls_agree(dtype):
    x = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(dtype)
    compare_impls(lambda x, impl: jc.dropout(x, 0.3, KEY, impl=impl), (x,), dtype)


@pytest.mark.usefixtures("x64")
def test_check_grads_second_order():
    x = np.random.default_rng(0).normal(size=(4, 6))
    check_grads(lambda x: jc.dropout(x, 0.4, KEY, impl="manual"), (x,), order=2,
                modes=["rev"])


@pytest.mark.usefixtures("x64")
def test_forward_over_reverse_hessian_equals_lax():
    x = np.random.default_rng(0).normal(size=(3, 4))
    loss = lambda x, impl: jnp.sum(jnp.sin(jc.dropout(x, 0.5, KEY, impl=impl)))  # noqa: E731
    want, got = jax.jit(lambda x: [jax.hessian(lambda x: loss(x, i))(x) for i in IMPLS])(x)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_keeps_its_dtype(impl):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.bfloat16)
    y = jc.dropout(x, 0.25, KEY, impl=impl)
    assert y.dtype == jnp.bfloat16
    dx = jax.grad(lambda x: jnp.sum(jc.dropout(x, 0.25, KEY, impl=impl)).astype(jnp.float32))(x)
    assert dx.dtype == jnp.bfloat16


X = np.ones((2, 3), np.float32)

ERROR_CASES = [
    (lambda i: jc.dropout(X, 1.5, KEY, impl=i), ValueError,
     r"dropout: rate must be a finite number in \[0, 1\] \(the probability of dropping an "
     r"element\); got 1.5"),
    (lambda i: jc.dropout(X, -0.1, KEY, impl=i), ValueError, r"dropout: rate must be .*-0.1"),
    (lambda i: jc.dropout(X, float("nan"), KEY, impl=i), ValueError,
     r"dropout: rate must be .*; got nan"),
    (lambda i: jc.dropout(X, "0.5", KEY, impl=i), TypeError,
     r"dropout: rate must be a Python number \(the probability of dropping an element\); "
     r"got str '0.5'"),
    (lambda i: jc.dropout(X, True, KEY, impl=i), TypeError, r"dropout: rate must be a Python "
                                                            r"number .*got bool True"),
    (lambda i: jc.dropout(X, 0.5, None, impl=i), ValueError,
     r"dropout: key is required when rate > 0 and deterministic=False; got None \(rate=0.5\)"),
    (lambda i: jc.dropout(X, 0.5, 7, impl=i), TypeError,
     r"dropout: key must be a PRNG key \(jax.random.key\(seed\) or jax.random.PRNGKey\(seed\)\);"
     r" got int"),
    (lambda i: jc.dropout(X, 0.5, jax.random.split(KEY, 2), impl=i), ValueError,
     r"dropout: key must be a single PRNG key; got a key array of shape \(2,\)"),
    (lambda i: jc.dropout(X, 0.5, KEY, deterministic=0, impl=i), TypeError,
     r"dropout: deterministic must be a bool; got 0"),
    (lambda i: jc.dropout(X.astype(np.int32), 0.5, KEY, impl=i), TypeError,
     r"dropout: x must have a floating dtype"),
]


test_bad_input_message = bad_input_test(ERROR_CASES)
