"""Bad input across ops: an unknown impl for every op, and errors raised at trace time under jit.

Each op's own error messages are tested in its file (test_conv.py, test_pool.py, ...).
"""

import re

import jax
import numpy as np
import pytest

import jaxcnn as jc

X = np.zeros((2, 8, 8, 3), np.float32)
K = np.zeros((3, 3, 3, 4), np.float32)


# --------------------------------------------------------------------------------------------
# impl: one of "lax" / "manual" for every op.


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


# --------------------------------------------------------------------------------------------
# Under jit: the same clear message, raised while tracing.


def test_errors_raise_at_trace_time_under_jit():
    """Under jit the error is the same clear message, raised while tracing."""
    f = jax.jit(lambda x, k: jc.conv(x, k, stride=0, impl="manual"))
    with pytest.raises(ValueError, match=re.escape("conv: stride must be >= 1; got 0")):
        f(X, K)
    g = jax.jit(lambda x: jc.max_pool(x, (2, 2, 2)))
    with pytest.raises(ValueError, match=r"max_pool: x must have rank 5"):
        g(X)
