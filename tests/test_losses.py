"""Losses (cross_entropy): both impls against lax (forward and gradients), finite differences, errors.

Sections: the grid, second-order finite differences, labels and bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc

from conftest import IMPLS, compare_impls


# --------------------------------------------------------------------------------------------
# The grid: forward manual == lax and jax.grad through manual == through lax.


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cross_entropy_grid(dtype):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, 5)) * 3).astype(dtype)
    labels = jnp.asarray([0, 4, 2, 2, 1, 3])
    compare_impls(lambda z, impl: jc.cross_entropy(z, labels, impl=impl), (logits,), dtype)


# --------------------------------------------------------------------------------------------
# Finite differences, second order, reverse mode (forward mode cannot go through a custom_vjp).


@pytest.mark.usefixtures("x64")
def test_cross_entropy_check_grads_second_order():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(4, 5)), rng.normal(size=(5, 3))
    labels = jnp.asarray([0, 2, 1, 2])
    check_grads(lambda z: jc.cross_entropy(z, labels, impl="manual"), (x @ w,), order=2, modes=["rev"])


# --------------------------------------------------------------------------------------------
# Labels and bad input: a clear ValueError / TypeError before any computation, the same for
# both impls; traced labels cannot be range-checked.

ERROR_CASES = [
    # (call, exception, message pattern)
    (lambda i: jc.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]), impl=i), ValueError,
     r"cross_entropy: labels must lie in \[0, 3\) for logits of shape \(2, 3\); got values from 0 to 3"),
    (lambda i: jc.cross_entropy(np.zeros((2, 3), np.float32), np.array([0.0, 1.0]), impl=i), TypeError,
     r"cross_entropy: labels must be integers"),
    (lambda i: jc.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1, 2]), impl=i), ValueError,
     r"cross_entropy: labels must have shape \(N,\) = \(2,\) to match logits \(2, 3\); got \(3,\)"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("call,exc,pattern", ERROR_CASES,
                         ids=[f"case{i}" for i in range(len(ERROR_CASES))])
def test_bad_input_message(call, exc, pattern, impl):
    with pytest.raises(exc, match=pattern):
        call(impl)


def test_traced_labels_are_not_range_checked_but_work():
    f = jax.jit(lambda z, y: jc.cross_entropy(z, y, impl="manual"))
    assert jnp.isfinite(f(jnp.zeros((2, 3)), jnp.array([0, 2])))
