"""Tests for jaxcnn.nn: (init, apply) layers, output shapes, initialisation, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcnn as jc
from jaxcnn import nn
from jaxcnn.nn import AvgPool, Conv, Dense, Flatten, MaxPool, Relu, serial

KEY = jax.random.key(0)


def rand(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ------------------------------------------------------------------------------------------
# Output shapes: init's shape is the shape apply produces, with the op's own size rule.

SHAPE_CASES = [
    # (layer, input shape, expected output shape by the rule out = floor((n+lo+hi-k_eff)/s)+1)
    (Conv(4, 3), (2, 7, 7, 1), (2, 5, 5, 4)),
    (Conv(4, 3, stride=2, padding="SAME"), (2, 7, 7, 1), (2, 4, 4, 4)),      # ceil(7/2)
    (Conv(4, (3, 2), stride=(2, 1), padding=((1, 0), (0, 2))), (2, 7, 6, 2), (2, 3, 7, 4)),
    (Conv(6, 3, dilation=2), (1, 9, 9, 3), (1, 5, 5, 6)),                    # k_eff = 5
    (Conv(4, 3, groups=2, padding=1), (1, 5, 5, 2), (1, 5, 5, 4)),
    (Conv(3, (3,)), (2, 8, 2), (2, 6, 3)),                                   # 1 spatial dim
    (MaxPool(2), (2, 7, 7, 3), (2, 3, 3, 3)),                                # stride = window
    (MaxPool(3, stride=2), (2, 7, 7, 3), (2, 3, 3, 3)),
    (AvgPool(2, stride=1, padding="SAME"), (2, 5, 5, 3), (2, 5, 5, 3)),
    (Dense(5), (3, 7), (3, 5)),
    (Relu, (2, 4, 4, 3), (2, 4, 4, 3)),
    (Flatten, (2, 4, 3, 5), (2, 60)),
]


@pytest.mark.parametrize("layer, in_shape, out_shape", SHAPE_CASES)
def test_init_shape_is_apply_shape(layer, in_shape, out_shape):
    init, apply = layer
    shape, params = init(KEY, in_shape)
    assert shape == out_shape
    for impl in ("lax", "manual"):  # traced, not run: the shapes the ops really produce
        y = jax.eval_shape(lambda p, x: apply(p, x, impl=impl), params,
                           jax.ShapeDtypeStruct(in_shape, jnp.float32))
        assert y.shape == out_shape


def test_any_batch_size_is_kept_as_minus_one():
    init, _ = serial(Conv(4, 3), Relu, Flatten, Dense(2))
    shape, _ = init(KEY, (-1, 6, 6, 1))
    assert shape == (-1, 2)


def test_params_shapes_and_zero_biases():
    (_, conv_params) = Conv(8, 3, groups=2).init(KEY, (1, 5, 5, 4))
    assert conv_params["kernel"].shape == (3, 3, 2, 8)
    assert conv_params["bias"].shape == (8,)
    assert not np.any(conv_params["bias"])
    (_, dense_params) = Dense(5).init(KEY, (1, 7))
    assert dense_params["w"].shape == (7, 5) and dense_params["b"].shape == (5,)
    assert not np.any(dense_params["b"])
    for layer in (Relu, Flatten, MaxPool(2), AvgPool(2)):
        assert layer.init(KEY, (1, 4, 4, 2))[1] == {}


def test_layer_unpacks_like_stax():
    init, apply = Conv(2, 3)
    assert callable(init) and callable(apply)
    assert isinstance(Relu, tuple) and len(Relu) == 2


# ------------------------------------------------------------------------------------------
# apply: each layer computes its op; serial chains them; impl reaches every op.


def test_layers_apply_their_op():
    x = rand((2, 6, 6, 2))
    _, p = Conv(3, 3, stride=2, padding="SAME").init(KEY, x.shape)
    want = jc.conv(x, p["kernel"], p["bias"], stride=2, padding="SAME", impl="lax")
    np.testing.assert_array_equal(Conv(3, 3, stride=2, padding="SAME").apply(p, x, impl="lax"),
                                  want)
    np.testing.assert_array_equal(MaxPool(2).apply({}, x, impl="lax"), jc.max_pool(x, 2))
    np.testing.assert_array_equal(AvgPool(3, stride=1, padding="SAME").apply({}, x, impl="lax"),
                                  jc.avg_pool(x, 3, stride=1, padding="SAME"))
    np.testing.assert_array_equal(Relu.apply({}, x), np.maximum(x, 0))
    np.testing.assert_array_equal(Flatten.apply({}, x), np.reshape(x, (2, -1)))
    h = rand((4, 5))
    _, p = Dense(3).init(KEY, h.shape)
    np.testing.assert_allclose(Dense(3).apply(p, h), h @ p["w"] + p["b"], rtol=1e-6)


def _tiny_net():
    return serial(Conv(3, 3, padding="SAME"), Relu, MaxPool(2), Flatten, Dense(4), Relu,
                  Dense(2))


def test_serial_applies_layers_in_order():
    init, apply = _tiny_net()
    x = rand((3, 6, 6, 1))
    shape, params = init(KEY, x.shape)
    assert shape == (3, 2) and len(params) == 7
    h = jc.conv(x, params[0]["kernel"], params[0]["bias"], padding="SAME")
    h = jc.max_pool(jnp.maximum(h, 0), 2).reshape(3, -1)
    h = jnp.maximum(h @ params[4]["w"] + params[4]["b"], 0)
    want = h @ params[6]["w"] + params[6]["b"]
    np.testing.assert_allclose(apply(params, x, impl="lax"), want, rtol=1e-5, atol=1e-6)


def test_manual_and_lax_agree_in_value_and_gradient():
    init, apply = _tiny_net()
    x = rand((3, 6, 6, 1))
    _, params = init(KEY, x.shape)

    def loss(p, impl):
        return jnp.sum(apply(p, x, impl=impl) ** 2)

    np.testing.assert_allclose(apply(params, x, impl="manual"), apply(params, x, impl="lax"),
                               rtol=1e-5, atol=1e-6)
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_manual, g_lax = grad(params, "manual"), grad(params, "lax")
    for a, b in zip(jax.tree_util.tree_leaves(g_manual), jax.tree_util.tree_leaves(g_lax)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_default_impl_is_manual(monkeypatch):
    seen = []
    real = jc.relu

    def spy(x, *, impl):
        seen.append(impl)
        return real(x, impl=impl)

    monkeypatch.setattr(nn, "relu", spy)
    Relu.apply({}, rand((2, 3)))
    Relu.apply({}, rand((2, 3)), impl="lax")
    assert seen == ["manual", "lax"]


def test_params_are_plain_pytrees(tmp_path):
    init, apply = _tiny_net()
    _, params = init(KEY, (2, 6, 6, 1))
    assert isinstance(params, list) and all(type(p) is dict for p in params)
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, params)
    np.testing.assert_array_equal(doubled[0]["kernel"], 2 * params[0]["kernel"])
    opt = optax.adam(1e-3)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(tmp_path / "p.npz", **flat)
    with np.load(tmp_path / "p.npz") as f:
        np.testing.assert_array_equal(f["[0]['kernel']"], params[0]["kernel"])
    assert nn.count_params(params) == (9 * 3 + 3) + (27 * 4 + 4) + (4 * 2 + 2)


def test_init_is_deterministic_and_keyed():
    init, _ = _tiny_net()
    a = init(KEY, (1, 6, 6, 1))[1]
    b = init(KEY, (1, 6, 6, 1))[1]
    c = init(jax.random.key(1), (1, 6, 6, 1))[1]
    np.testing.assert_array_equal(a[0]["kernel"], b[0]["kernel"])
    assert not np.array_equal(a[0]["kernel"], c[0]["kernel"])
    # The layers get different keys: two identical layers in a row start differently.
    _, p = serial(Dense(4), Dense(4)).init(KEY, (1, 4))
    assert not np.array_equal(p[0]["w"], p[1]["w"])


# ------------------------------------------------------------------------------------------
# Initialisation: He before Relu, LeCun otherwise (std sqrt(gain / fan_in)).


def _std_ratio(w, fan_in):
    """Sample std over the LeCun std sqrt(1/fan_in): ~1 for LeCun, ~sqrt(2) for He."""
    return float(np.std(np.asarray(w))) / math.sqrt(1 / fan_in)


def test_he_before_relu_lecun_otherwise():
    # 256 inputs -> 512 outputs: 131072 samples, the std is estimated to ~0.2%.
    _, p = serial(Dense(512), Relu, Dense(512)).init(KEY, (1, 256))
    assert _std_ratio(p[0]["w"], 256) == pytest.approx(math.sqrt(2), rel=0.02)
    assert _std_ratio(p[2]["w"], 512) == pytest.approx(1.0, rel=0.02)


def test_conv_fan_in_counts_window_and_channels():
    # fan_in = 3 * 3 * (64 / groups): He std sqrt(2 / 288) with groups=2.
    _, p = serial(Conv(128, 3, groups=2), Relu).init(KEY, (1, 5, 5, 64))
    assert _std_ratio(p[0]["kernel"], 3 * 3 * 32) == pytest.approx(math.sqrt(2), rel=0.02)


def test_standalone_layer_gets_lecun_and_init_overrides():
    _, p = Dense(512).init(KEY, (1, 256))
    assert _std_ratio(p["w"], 256) == pytest.approx(1.0, rel=0.02)
    _, p = Dense(512, init="he").init(KEY, (1, 256))
    assert _std_ratio(p["w"], 256) == pytest.approx(math.sqrt(2), rel=0.02)
    _, p = serial(Dense(512, init="lecun"), Relu).init(KEY, (1, 256))
    assert _std_ratio(p[0]["w"], 256) == pytest.approx(1.0, rel=0.02)


def test_nested_serial_passes_before_relu_to_its_last_layer():
    _, p = serial(serial(Dense(512), Relu, Dense(512)), Relu).init(KEY, (1, 256))
    assert _std_ratio(p[0][0]["w"], 256) == pytest.approx(math.sqrt(2), rel=0.02)
    assert _std_ratio(p[0][2]["w"], 512) == pytest.approx(math.sqrt(2), rel=0.02)


def test_foreign_stax_style_layer_works_in_serial():
    def init(key, shape):
        return shape, {"scale": jnp.ones(())}

    def apply(params, x, **kwargs):
        return params["scale"] * 3 * x

    shape, params = serial((init, apply), Relu).init(KEY, (2, 3))
    assert shape == (2, 3)
    out = serial((init, apply), Relu).apply(params, jnp.array([[-1.0, 0.0, 2.0]] * 2))
    np.testing.assert_array_equal(out, [[0.0, 0.0, 6.0]] * 2)


# ------------------------------------------------------------------------------------------
# Errors: named function, argument, rule and value.


@pytest.mark.parametrize("make, error, match", [
    (lambda: Conv(0, 3), ValueError, r"Conv: out_channels must be >= 1; got 0"),
    (lambda: Conv(4.0, 3), TypeError, r"Conv: out_channels must be an int; got float 4.0"),
    (lambda: Conv(4, 0), ValueError, r"Conv: window must be >= 1; got 0"),
    (lambda: Conv(4, 2.5), TypeError, r"Conv: window must be an int or a tuple of ints"),
    (lambda: Conv(4, (3, 3, 3, 3)), ValueError, r"Conv: window must be an int or a tuple of 1 to 3"),
    (lambda: Conv(4, 3, stride=0), ValueError, r"Conv: stride must be >= 1; got 0"),
    (lambda: Conv(4, 3, dilation=(1, 0)), ValueError, r"Conv: dilation must be >= 1"),
    (lambda: Conv(4, 3, padding="FULL"), ValueError, r"Conv: padding must be 'VALID', 'SAME'.*'FULL'"),
    (lambda: Conv(4, 3, padding=-1), ValueError, r"Conv: padding must be >= 0; got -1"),
    (lambda: Conv(4, 3, padding=1.5), TypeError, r"Conv: padding must be .*float 1.5"),
    (lambda: Conv(6, 3, groups=4), ValueError, r"Conv: groups \(4\) must divide out_channels \(6\)"),
    (lambda: Conv(6, 3, init="xavier"), ValueError, r"Conv: init must be one of \('he', 'lecun'\)"),
    (lambda: Dense(0), ValueError, r"Dense: out_features must be >= 1; got 0"),
    (lambda: Dense("10"), TypeError, r"Dense: out_features must be an int; got str '10'"),
    (lambda: MaxPool(0), ValueError, r"MaxPool: window must be >= 1; got 0"),
    (lambda: MaxPool(2, stride=0), ValueError, r"MaxPool: stride must be >= 1; got 0"),
    (lambda: AvgPool(2, padding="same_ish"), ValueError, r"AvgPool: padding must be"),
    (lambda: AvgPool(2, count_include_pad=1), TypeError, r"AvgPool: count_include_pad must be a bool"),
    (lambda: serial(), ValueError, r"serial: needs at least one layer"),
    (lambda: serial(Conv(4, 3), 5), TypeError, r"serial: layer 1 must be an \(init, apply\) pair.*int 5"),
])
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_init_errors_name_the_layer_or_op():
    with pytest.raises(ValueError, match=r"Conv: groups \(2\) must divide the input channels "
                                         r"\(input_shape\[-1\]=3\)"):
        Conv(4, 3, groups=2).init(KEY, (1, 5, 5, 3))
    with pytest.raises(TypeError, match=r"Dense: input_shape must be a tuple of ints"):
        Dense(3).init(KEY, "28x28")
    with pytest.raises(ValueError, match=r"Conv: input_shape must have rank >= 3"):
        Conv(4, 3).init(KEY, (5, 5))
    with pytest.raises(ValueError, match=r"Dense: input_shape entries must be >= 1"):
        Dense(3).init(KEY, (2, 0))
    # The op's own shape rule: a 5x5 kernel does not fit a 3x3 input.
    with pytest.raises(ValueError, match=r"conv: the dilated kernel window \(5, 5\)"):
        Conv(4, 5).init(KEY, (1, 3, 3, 1))
    with pytest.raises(ValueError, match=r"serial: params must be a list with one entry per "
                                         r"layer \(2\); got list of length 1"):
        serial(Dense(2), Relu).apply([{}], jnp.ones((1, 2)))
