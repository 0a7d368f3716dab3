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


# ------------------------------------------------------------------------------------------
# The stateful contract: params for the optimizer, state beside them, train and eval modes.

from jax.example_libraries import stax  # noqa: E402

from jaxcnn.nn import (BatchNorm, Dropout, FanInConcat, FanInSum, FanOut,  # noqa: E402
                       Identity, LayerNorm, apply_model, parallel)


def test_init_with_state_and_apply_with_state():
    init, apply = serial(Conv(3, 3, use_bias=False), BatchNorm(), Relu, Flatten, Dense(2))
    out_shape, params = init(KEY, (-1, 6, 6, 1))
    out_shape2, params2, state = init(KEY, (-1, 6, 6, 1), with_state=True)
    assert out_shape == out_shape2 == (-1, 2)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(a, b)
    assert params[0] == {"kernel": params[0]["kernel"]}            # use_bias=False: no bias
    assert set(params[1]) == {"scale", "offset"} and len(state) == 5
    np.testing.assert_array_equal(state[1]["mean"], np.zeros(3))
    np.testing.assert_array_equal(state[1]["var"], np.ones(3))
    assert [s for i, s in enumerate(state) if i != 1] == [{}] * 4
    x = rand((4, 6, 6, 1))
    y = apply(params, x)                                            # no state: y alone
    y2, new_state = apply(params, x, state=state)                   # state: (y, new state)
    assert y.shape == y2.shape == (4, 2)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


def test_batch_norm_layer_train_eval_and_no_state():
    init, apply = BatchNorm()
    x = rand((8, 3, 3, 2)) * 3 + 5
    _, params, state = init(KEY, x.shape, with_state=True)
    y_train, moved = apply(params, x, train=True, state=state)
    np.testing.assert_allclose(np.mean(y_train, axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(np.std(y_train, axis=(0, 1, 2)), 1, rtol=1e-3)
    y_eval, same = apply(params, x, train=False, state=state)
    assert same is state                                            # eval: state unchanged
    # Fresh running statistics (mean 0, var 1): eval mode is x / sqrt(1 + eps).
    np.testing.assert_allclose(y_eval, x / np.sqrt(1 + 1e-5), rtol=1e-6)
    # Without state (stax style), both modes use the batch statistics.
    for train in (True, False):
        np.testing.assert_allclose(apply(params, x, train=train), y_train, rtol=1e-6)
    assert not np.allclose(moved["mean"], state["mean"])


def test_running_averages_follow_the_hand_computation():
    # new = momentum · old + (1 - momentum) · batch, batch variance biased (divided by M).
    momentum = 0.8
    init, apply = BatchNorm(momentum=momentum)
    _, params, state = init(KEY, (-1, 4, 3), with_state=True)
    mean, var = np.zeros(3), np.ones(3)
    step = jax.jit(lambda p, s, x: apply(p, x, train=True, state=s))
    for i in range(4):
        x = np.random.default_rng(i).normal(i, 1 + i, size=(5, 4, 3)).astype(np.float32)
        _, state = step(params, state, x)
        mean = momentum * mean + (1 - momentum) * x.mean(axis=(0, 1))
        var = momentum * var + (1 - momentum) * x.var(axis=(0, 1))
        np.testing.assert_allclose(state["mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["var"], var, rtol=1e-5)
        assert state["mean"].dtype == np.float32
    # Eval mode then normalizes with exactly these running averages.
    x = rand((2, 4, 3))
    want = (np.asarray(x) - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(apply(params, x, state=state)[0], want, rtol=1e-4, atol=1e-5)


def test_params_and_state_round_trip_through_savez(tmp_path):
    init, apply = serial(Conv(3, 3, padding="SAME"), BatchNorm(), Relu, Flatten, Dense(2))
    _, params, state = init(KEY, (-1, 5, 5, 1), with_state=True)
    x = rand((4, 5, 5, 1))
    _, state = apply(params, x, train=True, state=state)            # non-trivial statistics
    trees = {"params": params, "state": state}
    flat = {name + jax.tree_util.keystr(k): np.asarray(v) for name, tree in trees.items()
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    np.savez(tmp_path / "model.npz", **flat)
    with np.load(tmp_path / "model.npz") as f:
        loaded = {name: jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(tree),
            [f[name + jax.tree_util.keystr(k)]
             for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]])
            for name, tree in trees.items()}
    assert "state[1]['mean']" in flat and "state[1]['var']" in flat
    want, _ = apply(params, x, state=state)
    got, _ = apply(loaded["params"], x, state=loaded["state"])
    np.testing.assert_array_equal(got, want)


def test_apply_model_for_stateless_and_stateful_models():
    x = rand((3, 6, 6, 1))
    init, apply = _tiny_net()
    _, params, state = init(KEY, x.shape, with_state=True)
    y, same = apply_model(apply, params, state, x, train=True)
    np.testing.assert_array_equal(y, apply(params, x))
    assert same == state == [{}] * 7
    init, apply = serial(Conv(2, 3), BatchNorm(), Relu, Flatten, Dropout(0.5), Dense(2))
    _, params, state = init(KEY, x.shape, with_state=True)
    y_eval, s_eval = apply_model(apply, params, state, x, train=False)
    y_train, s_train = apply_model(apply, params, state, x, train=True, rng=KEY, impl="lax")
    assert not np.allclose(y_eval, y_train)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(s_eval),   # eval: unchanged
                                      jax.tree_util.tree_leaves(state)))
    assert not np.allclose(s_train[1]["mean"], state[1]["mean"])
    with pytest.raises(ValueError, match=r"Dropout: train=True needs rng, the PRNG key the "
                                         r"dropout mask is drawn from"):
        apply_model(apply, params, state, x, train=True)
    with pytest.raises(ValueError, match=r"apply_model: state is required \(the model's "
                                         r"non-trainable state, from init\(key, input_shape, "
                                         r"with_state=True\)\); got None"):
        apply_model(apply, params, None, x, train=True)
    with pytest.raises(TypeError, match=r"apply_model: train must be a bool; got 'yes'"):
        apply_model(apply, params, state, x, train="yes")


def test_gradient_in_train_mode_manual_equals_lax():
    init, apply = serial(Conv(3, 3, padding="SAME", use_bias=False), BatchNorm(), Relu,
                         Flatten, LayerNorm(), Dropout(0.3), Dense(2))
    x = rand((4, 5, 5, 2))
    _, params, state = init(KEY, x.shape, with_state=True)

    @jax.jit
    def grads(params):
        out = {}
        for impl in ("manual", "lax"):
            loss = lambda p: (lambda y, s: (jnp.sum(y ** 2), s))(  # noqa: E731
                *apply_model(apply, p, state, x, train=True, rng=KEY, impl=impl))
            out[impl] = jax.grad(loss, has_aux=True)(params)
        return out

    out = grads(params)
    for a, b in zip(jax.tree_util.tree_leaves(out["manual"]), jax.tree_util.tree_leaves(out["lax"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dropout_layer_modes_and_keys_per_layer():
    init, apply = serial(Dropout(0.5), Dropout(0.5))
    x = jnp.ones((4, 256))
    _, params = init(KEY, x.shape)
    np.testing.assert_array_equal(apply(params, x), x)              # eval (default): identity
    y = apply(params, x, train=True, rng=KEY)
    np.testing.assert_array_equal(y, apply(params, x, train=True, rng=KEY))
    assert set(np.unique(y)) <= {0.0, 4.0}                          # kept twice: 1 / 0.5²
    # serial gives layer i fold_in(rng, i): two layers, two different masks.
    first = Dropout(0.5).apply({}, x, train=True, rng=jax.random.fold_in(KEY, 0))
    second = Dropout(0.5).apply({}, first, train=True, rng=jax.random.fold_in(KEY, 1))
    np.testing.assert_array_equal(y, second)
    assert not np.array_equal(first != 0, (second != 0) | (first == 0))


def test_layer_norm_layer():
    init, apply = LayerNorm(axes=(1, 2))
    x = rand((3, 4, 5, 2))
    _, params = init(KEY, x.shape)
    assert params["scale"].shape == params["offset"].shape == (4, 5)
    np.testing.assert_allclose(apply(params, x), jc.layer_norm(
        x, params["scale"], params["offset"], axes=(1, 2)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Combinators: branches for residual blocks.


def test_residual_block_adds_the_shortcut():
    main = serial(Conv(2, 3, padding="SAME"), Relu, Conv(2, 3, padding="SAME"))
    init, apply = serial(FanOut(2), parallel(main, Identity), FanInSum, Relu)
    x = rand((2, 5, 5, 2))
    shape, params = init(KEY, x.shape)
    assert shape == x.shape and params[0] == {} and params[1][1] == {}
    want = jnp.maximum(main.apply(params[1][0], x, impl="lax") + x, 0)
    np.testing.assert_allclose(apply(params, x, impl="lax"), want, rtol=1e-6)


def test_fan_in_concat_and_parallel_shapes():
    init, apply = serial(FanOut(3), parallel(Conv(2, 1), Identity, Conv(4, 3, padding="SAME")),
                         FanInConcat())
    x = rand((2, 4, 4, 3))
    shape, params = init(KEY, (-1, 4, 4, 3))
    assert shape == (-1, 4, 4, 9)
    y = apply(params, x)
    assert y.shape == (2, 4, 4, 9)
    np.testing.assert_array_equal(y[..., 2:5], x)
    init, _ = FanInConcat(axis=1)
    assert init(KEY, [(2, 3, 5), (2, 4, 5)])[0] == (2, 7, 5)


def test_stateful_layers_inside_parallel_thread_their_state():
    init, apply = serial(FanOut(2), parallel(BatchNorm(), serial(Relu, BatchNorm())), FanInSum)
    x = rand((6, 3))
    _, params, state = init(KEY, x.shape, with_state=True)
    _, new = apply(params, x, train=True, state=state)
    np.testing.assert_allclose(new[1][0]["mean"], 0.1 * np.mean(x, axis=0), rtol=1e-5)
    np.testing.assert_allclose(new[1][1][1]["mean"], 0.1 * np.mean(np.maximum(x, 0), axis=0),
                               rtol=1e-5)


# ------------------------------------------------------------------------------------------
# stax interoperability: jaxcnn layers in stax.serial, stax layers in jaxcnn's serial.


def test_jaxcnn_layers_inside_stax_serial():
    init, apply = stax.serial(Conv(4, 3, padding="SAME"), stax.Relu, BatchNorm(), Dropout(0.5),
                              stax.Flatten, Dense(3))
    out_shape, params = init(KEY, (-1, 6, 6, 1))
    assert out_shape == (-1, 3)
    x = rand((2, 6, 6, 1))
    y = apply(params, x, rng=KEY)                    # stax passes rng=...: no TypeError now
    assert y.shape == (2, 3)
    y_train = apply(params, x, rng=KEY, train=True)  # dropout only when asked for by name
    assert not np.allclose(y, y_train)
    # Without dropout, the same params give what jaxcnn's serial gives (BatchNorm without
    # state: batch statistics, in both).
    layers = (Conv(4, 3, padding="SAME"), Relu, BatchNorm(), Flatten, Dense(3))
    p = [params[0], (), params[2], (), params[5]]
    ours = serial(*layers).apply([params[0], {}, params[2], {}, params[5]], x, impl="lax")
    theirs = stax.serial(layers[0], stax.Relu, layers[2], stax.Flatten, layers[4])[1](
        p, x, rng=KEY, impl="lax")
    np.testing.assert_allclose(theirs, ours, rtol=1e-6)


def test_stax_layers_inside_jaxcnn_serial_with_state():
    init, apply = serial(Conv(2, 3), stax.Relu, BatchNorm(), stax.Flatten, Dense(2))
    _, params, state = init(KEY, (-1, 5, 5, 1), with_state=True)
    assert state[1] == {} and state[3] == {}
    x = rand((3, 5, 5, 1))
    y, new_state = apply(params, x, train=True, state=state)
    assert y.shape == (3, 2) and new_state[1] == {}
    assert not np.allclose(new_state[2]["mean"], state[2]["mean"])


# ------------------------------------------------------------------------------------------
# Errors of the new layers and of the wrong-rank init.


def test_wrong_rank_init_names_the_expected_rank():
    with pytest.raises(ValueError, match=r"Conv: input_shape must have rank 4, \(N, \*spatial, "
                                         r"C_in\) with 2 spatial dims for window 3 .*got "
                                         r"\(28, 28, 1\) \(rank 3\); is the batch axis missing\? "
                                         r"\(-1, 28, 28, 1\) means any batch size"):
        Conv(6, 3).init(KEY, (28, 28, 1))
    with pytest.raises(ValueError, match=r"Conv: input_shape must have rank 3, .* with 1 "
                                         r"spatial dims for window \(3,\)"):
        Conv(6, (3,)).init(KEY, (1, 28, 28, 1))
    with pytest.raises(ValueError, match=r"Conv: input_shape must have rank 5"):
        Conv(6, (3, 3, 3)).init(KEY, (1, 8, 8, 1))
    assert Conv(6, (3, 3, 3)).init(KEY, (1, 8, 8, 8, 1))[0] == (1, 6, 6, 6, 6)


@pytest.mark.parametrize("make, error, match", [
    (lambda: Conv(4, 3, stride=(2, 2, 2)), ValueError,
     r"Conv: stride \(2, 2, 2\) has 3 entries \(one per spatial dim\), but window 3 means 2 "
     r"spatial dims; give window as a tuple of 3 ints for a 3-D layer"),
    (lambda: Conv(4, 3, use_bias=1), TypeError, r"Conv: use_bias must be a bool; got 1"),
    (lambda: BatchNorm(momentum=1.5), ValueError,
     r"BatchNorm: momentum must be a finite number in \[0, 1\]; got 1.5"),
    (lambda: BatchNorm(eps=0), ValueError, r"BatchNorm: eps must be a finite number > 0; got 0"),
    (lambda: LayerNorm(axes="last"), TypeError,
     r"LayerNorm: axes must be an int or a non-empty tuple of ints; got 'last'"),
    (lambda: Dropout(1.2), ValueError, r"Dropout: rate must be a finite number in \[0, 1\] "
                                       r"\(the probability of dropping an element\); got 1.2"),
    (lambda: Dropout("0.5"), TypeError, r"Dropout: rate must be a Python number"),
    (lambda: FanOut(0), ValueError, r"FanOut: n must be >= 1; got 0"),
    (lambda: FanInConcat(axis=1.0), TypeError, r"FanInConcat: axis must be an int"),
    (lambda: parallel(), ValueError, r"parallel: needs at least one layer; got none"),
    (lambda: parallel(Relu, "x"), TypeError, r"parallel: layer 1 must be an \(init, apply\) pair"),
])
def test_bad_new_layer_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_shapes_and_state_of_new_layers():
    with pytest.raises(ValueError, match=r"FanInSum: the branches must have equal shapes to be "
                                         r"added; got \[\(2, 3\), \(2, 4\)\]"):
        FanInSum.init(KEY, [(2, 3), (2, 4)])
    with pytest.raises(ValueError, match=r"FanInSum: input_shape must be a list with one entry "
                                         r"per branch \(at least one branch\), as FanOut or "
                                         r"parallel gives; got tuple \(2, 3\)"):
        FanInSum.init(KEY, (2, 3))
    with pytest.raises(ValueError, match=r"parallel: x must be a list with one entry per branch "
                                         r"\(2 branches\)"):
        parallel(Relu, Relu).apply([{}, {}], [jnp.ones(2)])
    with pytest.raises(ValueError, match=r"FanInConcat: the branches must agree on every dim "
                                         r"but axis -1; got shapes \[\(2, 3\), \(3, 3\)\]"):
        FanInConcat().init(KEY, [(2, 3), (3, 3)])
    with pytest.raises(ValueError, match=r"FanInConcat: .*axis \(0\) must be one of their "
                                         r"non-batch axes"):
        FanInConcat(axis=0).init(KEY, [(2, 3), (2, 3)])
    with pytest.raises(ValueError, match=r"LayerNorm: axes must not include the batch axis 0"):
        LayerNorm(axes=(0, 1)).init(KEY, (2, 3))
    _, params, state = BatchNorm().init(KEY, (2, 3), with_state=True)
    with pytest.raises(ValueError, match=r"BatchNorm: state must be a dict with the keys "
                                         r"\['mean', 'var'\], as init\(key, input_shape, "
                                         r"with_state=True\) gives; got dict"):
        BatchNorm().apply(params, jnp.ones((2, 3)), state={"mean": state["mean"]})
    with pytest.raises(ValueError, match=r"serial: state must be a list with one entry per "
                                         r"layer \(2\); got dict"):
        serial(BatchNorm(), Relu).apply([params, {}], jnp.ones((2, 3)), state={})
    with pytest.raises(TypeError, match=r"BatchNorm: train must be a bool; got 'eval'"):
        BatchNorm().apply(params, jnp.ones((2, 3)), train="eval")
