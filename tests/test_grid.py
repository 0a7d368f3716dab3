"""The deliberate grid: forward manual == lax and jax.grad through manual == through lax.

Not the full product (that would take hours): every (spatial dims, stride, padding form)
combination appears once per op, and dilation, groups, batch size and dtype rotate through
their values so that each is met with every stride and every padding form.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc

from conftest import assert_close

pytestmark = pytest.mark.usefixtures("x64")

NDS = (1, 2, 3)
STRIDES = (1, 2, 3)
PADDINGS = ("VALID", "SAME", 1, "uneven")
# Sizes that strides 2 and 3 do not divide, odd and even.
SPATIAL = {1: (9,), 2: (7, 8), 3: (5, 6, 4)}


def _padding(form, nd):
    return tuple(((1, 2), (0, 1), (2, 0))[:nd]) if form == "uneven" else form


def _conv_cases():
    cases = []
    for i, (nd, s, p) in enumerate(itertools.product(NDS, STRIDES, PADDINGS)):
        dilation = (1, 2)[i % 2]
        groups = ("1", "2", "depthwise")[i % 3]
        batch = (1, 3)[(i // 2) % 2]
        dtype = ("float64", "float32")[(i // 3) % 2]
        cases.append((nd, s, p, dilation, groups, batch, dtype))
    return cases


def _pool_cases():
    cases = []
    for i, (nd, s, p) in enumerate(itertools.product(NDS, (None, 1, 2, 3), PADDINGS)):
        kind = ("max", "avg", "avg_exclude_pad")[i % 3]
        window = (2, 3)[i % 2]
        batch = (1, 3)[(i // 2) % 2]
        dtype = ("float64", "float32")[(i // 3) % 2]
        cases.append((kind, nd, s, p, window, batch, dtype))
    return cases


def _compare(op, args, dtype):
    """Forward and the gradient of a random scalar function of the output, both impls."""
    ct = np.random.default_rng(1).normal(size=jax.eval_shape(lambda *a: op(*a, "lax"), *args).shape)

    @jax.jit
    def both(*a):
        out = {}
        for impl in ("lax", "manual"):
            loss = lambda *a: jnp.sum(jnp.sin(op(*a, impl)) * ct)    # noqa: E731
            out[impl] = (op(*a, impl), jax.grad(loss, argnums=tuple(range(len(a))))(*a))
        return out

    out = both(*args)
    assert out["manual"][0].dtype == args[0].dtype
    assert_close(out["manual"][0], out["lax"][0], dtype, "forward")
    for i, (gm, gl) in enumerate(zip(out["manual"][1], out["lax"][1])):
        assert gm.dtype == args[i].dtype, f"gradient {i} dtype"
        assert_close(gm, gl, dtype, f"gradient of argument {i}")


@pytest.mark.parametrize("nd,stride,padding,dilation,groups,batch,dtype", _conv_cases())
def test_conv_grid(nd, stride, padding, dilation, groups, batch, dtype):
    rng = np.random.default_rng(0)
    c_in = 4
    g = {"1": 1, "2": 2, "depthwise": c_in}[groups]
    c_out = 2 * c_in if groups == "depthwise" else 6
    window = (3, 2, 2)[:nd]
    x = rng.normal(size=(batch, *SPATIAL[nd], c_in)).astype(dtype)
    # He-scaled kernel, as a trained layer has: keeps activations and gradients O(1), which is
    # the scale at which float32's rtol/atol of 1e-5 are meaningful.
    fan_in = np.prod(window) * (c_in // g)
    k = (rng.normal(size=(*window, c_in // g, c_out)) / np.sqrt(fan_in)).astype(dtype)
    b = rng.normal(size=(c_out,)).astype(dtype)
    pad = _padding(padding, nd)

    def op(x, k, b, impl):
        return jc.conv(x, k, b, stride=stride, padding=pad, dilation=dilation, groups=g, impl=impl)

    _compare(op, (x, k, b), dtype)


@pytest.mark.parametrize("kind,nd,stride,padding,window,batch,dtype", _pool_cases())
def test_pool_grid(kind, nd, stride, padding, window, batch, dtype):
    rng = np.random.default_rng(0)
    # Unique values (a permutation) for max pooling: ties have their own tests.
    x = (rng.permutation(batch * np.prod(SPATIAL[nd]) * 3) / 7.0).reshape(batch, *SPATIAL[nd], 3)
    x = x.astype(dtype)
    pad = _padding(padding, nd)
    if isinstance(pad, tuple):
        pad = tuple((min(lo, window - 1), min(hi, window - 1)) for lo, hi in pad)

    def op(x, impl):
        if kind == "max":
            return jc.max_pool(x, window, stride=stride, padding=pad, impl=impl)
        return jc.avg_pool(x, window, stride=stride, padding=pad, impl=impl,
                           count_include_pad=(kind == "avg"))

    _compare(op, (x,), dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_dense_grid(lead, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(*lead, 5)).astype(dtype)
    w = rng.normal(size=(5, 4)).astype(dtype)
    b = rng.normal(size=(4,)).astype(dtype)
    _compare(lambda x, w, b, impl: jc.dense(x, w, b, impl=impl), (x, w, b), dtype)
    _compare(lambda x, w, impl: jc.dense(x, w, impl=impl), (x, w), dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["relu", "flatten", "log_softmax"])
def test_elementwise_grid(name, dtype):
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(dtype)
    op = getattr(jc, name)
    _compare(lambda x, impl: op(x, impl=impl), (x,), dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cross_entropy_grid(dtype):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, 5)) * 3).astype(dtype)
    labels = jnp.asarray([0, 4, 2, 2, 1, 3])
    _compare(lambda z, impl: jc.cross_entropy(z, labels, impl=impl), (logits,), dtype)
