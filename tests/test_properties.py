"""Property tests: over random valid configurations, manual == lax, forward and gradients.

The hypothesis profile (tests/conftest.py) is derandomized and bounded: the same examples on
every run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxcnn as jc

from conftest import assert_close

pytestmark = pytest.mark.usefixtures("x64")


@st.composite
def conv_configs(draw):
    nd = draw(st.integers(1, 3))
    window = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    eff = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    padding = draw(st.one_of(
        st.sampled_from(["VALID", "SAME"]), st.integers(0, 2),
        st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2)) for _ in range(nd)])))
    pads = ([(0, 0)] * nd if padding in ("VALID", "SAME") else
            [(padding, padding)] * nd if isinstance(padding, int) else list(padding))
    spatial = tuple(draw(st.integers(max(1, e - lo - hi), e + 4))
                    for e, (lo, hi) in zip(eff, pads))
    batch = draw(st.integers(1, 2))
    return dict(x=(batch, *spatial, c_in), k=(*window, c_in // groups, c_out), stride=stride,
                padding=padding, dilation=dilation, groups=groups)


def _grads_both(f, args):
    ct = np.random.default_rng(0).normal(size=jax.eval_shape(lambda *a: f(*a, "lax"), *args).shape)

    @jax.jit                                                   # one compilation per example
    def both(*args):
        out = {}
        for impl in ("lax", "manual"):
            loss = lambda *a: jnp.sum(f(*a, impl) * ct)      # noqa: E731
            out[impl] = (f(*args, impl), jax.grad(loss, argnums=tuple(range(len(args))))(*args))
        return out

    return both(*args)


@given(conv_configs())
def test_conv_manual_equals_lax(cfg):
    rng = np.random.default_rng(1)
    x, k = rng.normal(size=cfg["x"]), rng.normal(size=cfg["k"])
    b = rng.normal(size=cfg["k"][-1:])
    static = {key: cfg[key] for key in ("stride", "padding", "dilation", "groups")}
    out = _grads_both(lambda x, k, b, impl: jc.conv(x, k, b, impl=impl, **static), (x, k, b))
    assert_close(out["manual"][0], out["lax"][0], "float64", "forward")
    for name, gm, gl in zip("xkb", out["manual"][1], out["lax"][1]):
        assert_close(gm, gl, "float64", f"d{name}")


@st.composite
def pool_configs(draw):
    nd = draw(st.integers(1, 3))
    window = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = draw(st.one_of(st.none(), st.tuples(*[st.integers(1, 3) for _ in range(nd)])))
    padding = draw(st.one_of(
        st.sampled_from(["VALID", "SAME"]),
        st.tuples(*[st.tuples(st.integers(0, w - 1), st.integers(0, w - 1)) for w in window])))
    spatial = tuple(draw(st.integers(w, w + 4)) for w in window)
    return dict(x=(draw(st.integers(1, 2)), *spatial, 2), window=window, stride=stride,
                padding=padding, kind=draw(st.sampled_from(["max", "avg", "avg_exclude_pad"])))


@given(pool_configs())
def test_pool_manual_equals_lax(cfg):
    n = int(np.prod(cfg["x"]))
    x = np.random.default_rng(2).permutation(n).reshape(cfg["x"]) / 3.0   # distinct values
    static = dict(stride=cfg["stride"], padding=cfg["padding"])
    if cfg["kind"] == "max":
        f = lambda x, impl: jc.max_pool(x, cfg["window"], impl=impl, **static)   # noqa: E731
    else:
        f = lambda x, impl: jc.avg_pool(x, cfg["window"], impl=impl,              # noqa: E731
                                        count_include_pad=cfg["kind"] == "avg", **static)
    out = _grads_both(f, (x,))
    assert_close(out["manual"][0], out["lax"][0], "float64", "forward")
    assert_close(out["manual"][1][0], out["lax"][1][0], "float64", "dx")
