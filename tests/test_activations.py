"""Activations (relu, log_softmax): both impls against lax (forward and gradients), finite differences, errors.

Sections: the grid, second-order finite differences, bad input. Each new activation adds its
name to the lists below and its own cases where it needs them.
"""

import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn as jc

from conftest import IMPLS, compare_impls, unique_values

ACTIVATIONS = ["relu", "log_softmax"]


# --------------------------------------------------------------------------------------------
# The grid: forward manual == lax and jax.grad through manual == through lax.


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_grid(name, dtype):
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(dtype)
    op = getattr(jc, name)
    compare_impls(lambda x, impl: op(x, impl=impl), (x,), dtype)


# --------------------------------------------------------------------------------------------
# Finite differences, second order, reverse mode (forward mode cannot go through a custom_vjp).


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_check_grads_second_order(name):
    op = getattr(jc, name)
    # Distinct values 0.1 apart, offset from 0: no relu kink within the finite-difference step.
    x = unique_values((2, 6, 7, 2), step=0.1, centred=True) + 0.05
    check_grads(lambda x: op(x, impl="manual"), (x,), order=2, modes=["rev"])


# --------------------------------------------------------------------------------------------
# Bad input: a clear ValueError / TypeError before any computation, the same for both impls.

ERROR_CASES = [
    # (call, exception, message pattern)
    (lambda i: jc.relu(np.zeros(3, np.int32), impl=i), TypeError, r"relu: x must have a floating dtype"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("call,exc,pattern", ERROR_CASES,
                         ids=[f"case{i}" for i in range(len(ERROR_CASES))])
def test_bad_input_message(call, exc, pattern, impl):
    with pytest.raises(exc, match=pattern):
        call(impl)
