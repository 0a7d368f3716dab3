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


# --------------------------------------------------------------------------------------------
# Forward-over-reverse: jax.hessian, jacfwd of grad and Hessian-vector products run through the
# manual ops' custom VJPs (their fwd and bwd rules are plain differentiable code) and equal
# lax's. Direct forward mode (jax.jvp / jacfwd / linearize of a manual op) is not supported: see
# test_direct_forward_mode_is_refused_and_double_vjp_gives_the_jvp.

def _second_order_ops():
    rng = np.random.default_rng(7)
    x4 = rng.normal(size=(1, 4, 4, 2))
    k = rng.normal(size=(3, 3, 2, 2)) / 3
    y = rng.normal(size=(1, 2, 2, 2))
    return {
        "conv": (lambda x, impl: jc.conv(x, k, stride=2, padding="SAME", impl=impl), x4),
        "conv kernel": (lambda k_, impl: jc.conv(x4, k_, padding=1, impl=impl), k),
        "conv_transpose": (lambda y_, impl: jc.conv_transpose(y_, k, stride=2, impl=impl), y),
        "dense": (lambda w, impl: jc.dense(x4.reshape(4, 8), w, impl=impl),
                  rng.normal(size=(8, 3))),
        "flatten": (lambda x, impl: jc.flatten(x, impl=impl), x4),
        "max_pool": (lambda x, impl: jc.max_pool(x, 2, stride=1, padding=1, impl=impl), x4),
        "max_pool dilated split": (lambda x, impl: jc.max_pool(x, 2, stride=1, dilation=2,
                                                               ties="split", impl=impl), x4),
        "avg_pool ceil": (lambda x, impl: jc.avg_pool(x, 3, stride=2, padding=1, ceil_mode=True,
                                                      count_include_pad=False, impl=impl), x4),
        "avg_pool reflect": (lambda x, impl: jc.avg_pool(x, 2, stride=1, padding=1,
                                                         padding_mode="reflect", impl=impl), x4),
        "global pools": (lambda x, impl: jc.global_max_pool(x, impl=impl)
                         + jc.global_avg_pool(x, impl=impl), x4),
        "adaptive pools": (lambda x, impl: jc.adaptive_max_pool(x, 3, impl=impl)
                           + jc.adaptive_avg_pool(x, 3, impl=impl), x4),
        "pad circular": (lambda x, impl: jc.pad(x, 2, mode="circular", impl=impl), x4),
        "pad replicate": (lambda x, impl: jc.pad(x, ((1, 2), (0, 3)), mode="replicate",
                                                 impl=impl), x4),
    }


# The default run takes one op of each module (conv's input and kernel, conv_transpose, dense,
# flatten, the hardest pooling cases, padding); the others run under -m slow.
_SLOW = {"max_pool", "avg_pool reflect", "pad replicate", "global pools"}
SECOND_ORDER_OPS = [pytest.param(name, marks=pytest.mark.slow) if name in _SLOW else name
                    for name in sorted(_second_order_ops())]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", SECOND_ORDER_OPS)
def test_hessian_and_forward_over_reverse_through_manual_ops(name):
    op, arg = _second_order_ops()[name]
    out = {}
    for impl in IMPLS:
        loss = lambda a: jnp.sum(jnp.sin(op(a, impl)) ** 2)          # noqa: E731
        v = np.random.default_rng(1).normal(size=arg.shape)
        out[impl] = jax.jit(lambda a, v: (jax.hessian(loss)(a),                # = jacfwd(grad)
                                          jax.jvp(jax.grad(loss), (a,), (v,))[1]))(arg, v)
    for got, want in zip(out["manual"], out["lax"]):
        assert_close(got, want, "float64")


@pytest.mark.usefixtures("x64")
def test_direct_forward_mode_is_refused_and_double_vjp_gives_the_jvp():
    """jax.jvp of a manual op raises JAX's own TypeError (a custom_vjp function has no forward
    mode); the README's recipe, the JVP as the transpose of the VJP (two reverse passes through
    the hand-derived rule), equals lax's jax.jvp."""
    op, arg = _second_order_ops()["conv"]
    v = np.random.default_rng(3).normal(size=arg.shape)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(lambda a: op(a, "manual"), (arg,), (v,))

    def jvp_by_two_vjps(f, x, t):                       # the README's recipe
        y, vjp = jax.vjp(f, x)
        return y, jax.vjp(vjp, jnp.zeros_like(y))[1]((t,))[0]

    y, t_out = jvp_by_two_vjps(lambda a: op(a, "manual"), arg, v)
    y_ref, t_ref = jax.jvp(lambda a: op(a, "lax"), (arg,), (v,))
    assert_close(y, y_ref, "float64")
    assert_close(t_out, t_ref, "float64")


# Under -m slow (5 s; the default suite had reached 295 s of its 300): the default run checks
# forward-over-reverse and the Hessian of every manual op on its own
# (test_hessian_and_forward_over_reverse_through_manual_ops); this composes them.
@pytest.mark.slow
@pytest.mark.usefixtures("x64")
def test_hessian_vector_products_through_a_whole_manual_network():
    """Forward-over-reverse through a network that holds every kind of layer the models use
    (conv, batch norm in train mode, relu, max and global pooling, a residual sum, dense,
    cross-entropy): the HVP of the loss w.r.t. all parameters, every layer manual, equals the
    HVP with every layer lax."""
    from jaxcnn import nn
    init, apply = nn.serial(
        nn.Conv(3, 3, padding="SAME"), nn.BatchNorm(), nn.Relu, nn.MaxPool(2),
        nn.FanOut(2), nn.parallel(nn.Conv(3, 3, padding="SAME"), nn.Identity), nn.FanInSum,
        nn.GlobalAvgPool(), nn.Dense(4))
    _, params, state = init(jax.random.key(0), (2, 6, 6, 2), with_state=True)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 6, 6, 2))
    labels = np.array([1, 3])
    v = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)

    def hvp(impl):
        def loss(p):
            logits, _ = nn.apply_model(apply, p, state, x, train=True, impl=impl)
            return jc.cross_entropy(logits, labels, impl=impl)
        return jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params, v)

    got, want = hvp("manual"), hvp("lax")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(g, w, "float64")
    assert any(float(jnp.max(jnp.abs(w))) > 1e-3 for w in jax.tree.leaves(want))
