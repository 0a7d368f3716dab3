"""Linear (dense, flatten): both impls against lax (forward and gradients), finite differences, errors.

Sections: the grid, second-order finite differences, bad input.
"""

import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc

from conftest import bad_input_test, compare_impls, unique_values


# --------------------------------------------------------------------------------------------
# The grid: forward manual == lax and jax.grad through manual == through lax.


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_dense_grid(lead, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(*lead, 5)).astype(dtype)
    w = rng.normal(size=(5, 4)).astype(dtype)
    b = rng.normal(size=(4,)).astype(dtype)
    compare_impls(lambda x, w, b, impl: jc.dense(x, w, b, impl=impl), (x, w, b), dtype)
    compare_impls(lambda x, w, impl: jc.dense(x, w, impl=impl), (x, w), dtype)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_flatten_grid(dtype):
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(dtype)
    compare_impls(lambda x, impl: jc.flatten(x, impl=impl), (x,), dtype)


# --------------------------------------------------------------------------------------------
# Finite differences, second order, reverse mode (forward mode cannot go through a custom_vjp).


@pytest.mark.usefixtures("x64")
def test_dense_check_grads_second_order():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(4, 5)), rng.normal(size=(5, 3)), rng.normal(size=(3,))
    check_grads(lambda x, w, b: jc.dense(x, w, b, impl="manual"), (x, w, b), order=2, modes=["rev"])


@pytest.mark.usefixtures("x64")
def test_flatten_check_grads_second_order():
    x = unique_values((2, 6, 7, 2), step=0.1, centred=True) + 0.05
    check_grads(lambda x: jc.flatten(x, impl="manual"), (x,), order=2, modes=["rev"])


# --------------------------------------------------------------------------------------------
# Bad input: a clear ValueError / TypeError before any computation, the same for both impls.

ERROR_CASES = [
    # (call, exception, message pattern)
    (lambda i: jc.dense(np.zeros((2, 5), np.float32), np.zeros((4, 3), np.float32), impl=i), ValueError,
     r"dense: x features \(x.shape\[-1\]=5\) must equal w rows \(w.shape\[0\]=4\)"),
    (lambda i: jc.dense(np.zeros((2, 5), np.float32), np.zeros((5,), np.float32), impl=i), ValueError,
     r"dense: w must have rank 2, \(D_in, D_out\); got w shape \(5,\)"),
    (lambda i: jc.dense(np.zeros((2, 5), np.float32), np.zeros((5, 3), np.float32),
                        np.zeros((2,), np.float32), impl=i), ValueError,
     r"dense: b must have shape \(D_out,\) = \(3,\); got b shape \(2,\)"),
]


test_bad_input_message = bad_input_test(ERROR_CASES)
