"""Transformations across ops: the manual path under jit, vmap and grad-of-grad agrees with lax.

Transformations of one op alone live in that op's file (e.g. vmap over conv kernels in
test_conv.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc

from conftest import IMPLS, assert_close


# --------------------------------------------------------------------------------------------
# jit, vmap, grad-of-grad.


def _conv_loss(x, k, impl):
    return jnp.sum(jnp.tanh(jc.conv(x, k, stride=2, padding="SAME", impl=impl)) ** 2)


@pytest.mark.usefixtures("x64")
def test_manual_ops_under_jit_vmap_and_grad_of_grad():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(3, 2, 7, 7, 2))                     # a leading ensemble axis for vmap
    k = rng.normal(size=(3, 3, 2, 3))
    results = {}
    for impl in IMPLS:
        f = jax.jit(jax.vmap(jax.grad(lambda x, k: _conv_loss(x, k, impl), argnums=1), (0, None)))
        hvp = jax.jit(jax.grad(lambda k: jnp.sum(jax.grad(lambda k: _conv_loss(xs[0], k, impl))(k) ** 2)))
        pool = jax.vmap(jax.grad(lambda x: jnp.sum(jc.max_pool(x, 2, impl=impl) ** 2)))
        results[impl] = (f(xs, k), hvp(k), pool(xs))
    for got, want in zip(results["manual"], results["lax"]):
        assert_close(got, want, "float64")
