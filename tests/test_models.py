"""Tests for jaxcnn.models: parameter counts, shapes, initialisation, the registry, and a short
ResNet training run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcnn as jc
from jaxcnn import data, models
from jaxcnn.nn import apply_model, count_params

KEY = jax.random.key(0)


def shapes(params):
    return [{k: tuple(v.shape) for k, v in p.items()} for p in params]


# LeNet-5, 28x28x1 input, counted by hand (weights + biases):
#   conv 5x5x1 -> 6, SAME:   5*5*1*6 + 6    =    156   (28x28x6, pool -> 14x14x6)
#   conv 5x5x6 -> 16, VALID: 5*5*6*16 + 16  =  2,416   (10x10x16, pool -> 5x5x16 = 400)
#   dense 400 -> 120:        400*120 + 120  = 48,120
#   dense 120 -> 84:         120*84 + 84    = 10,164
#   dense 84 -> 10:          84*10 + 10     =    850
#   total                                    = 61,706
LENET5_PARAMS = 61_706
LENET5_SHAPES = [
    {"kernel": (5, 5, 1, 6), "bias": (6,)}, {}, {},
    {"kernel": (5, 5, 6, 16), "bias": (16,)}, {}, {},
    {},
    {"w": (400, 120), "b": (120,)}, {},
    {"w": (120, 84), "b": (84,)}, {},
    {"w": (84, 10), "b": (10,)},
]

# small_cnn, 28x28x1 input, all convolutions SAME:
#   conv 3x3x1 -> 32:    3*3*1*32 + 32   =     320   (28x28x32)
#   conv 3x3x32 -> 32:   3*3*32*32 + 32  =   9,248   (28x28x32, pool -> 14x14x32)
#   conv 3x3x32 -> 64:   3*3*32*64 + 64  =  18,496   (14x14x64)
#   conv 3x3x64 -> 64:   3*3*64*64 + 64  =  36,928   (14x14x64, pool -> 7x7x64 = 3136)
#   dense 3136 -> 256:   3136*256 + 256  = 803,072
#   dense 256 -> 10:     256*10 + 10     =   2,570
#   total                                 = 870,634
SMALL_CNN_PARAMS = 870_634

# resnet (widths 16/32/64, one block per stage), 28x28x1 input; convolutions have no bias, each
# batch norm has scale + offset (2 C params) and running mean + var (2 C state values):
#   stem conv 3x3x1 -> 16 + BN:                         144 + 32          =    176
#   stage 1 (16, 28x28): conv 3x3x16x16 twice + 2 BN:   2*2,304 + 2*32    =  4,672
#   stage 2 (32, 14x14, stride 2): conv 3x3x16x32, conv 3x3x32x32, 2 BN,
#       projection conv 1x1x16x32 + BN:                 4,608 + 9,216 + 128 + 512 + 64 = 14,528
#   stage 3 (64, 7x7, stride 2): conv 3x3x32x64, conv 3x3x64x64, 2 BN,
#       projection conv 1x1x32x64 + BN:                 18,432 + 36,864 + 256 + 2,048 + 128
#                                                                         = 57,728
#   average pool 7x7 -> 64 features; dense 64 -> 10:   640 + 10          =    650
#   total                                                                 = 77,754
# State: batch norms over 16 + 2*16 + 3*32 + 3*64 = 336 channels, 2 values each = 672.
RESNET_PARAMS = 77_754
RESNET_STATE = 672


def test_lenet5_parameter_count_and_shapes():
    out_shape, params = models.lenet5().init(KEY, (-1, 28, 28, 1))
    assert out_shape == (-1, 10)
    assert count_params(params) == LENET5_PARAMS
    assert shapes(params) == LENET5_SHAPES


def test_small_cnn_parameter_count_and_shape():
    out_shape, params = models.small_cnn().init(KEY, (-1, 28, 28, 1))
    assert out_shape == (-1, 10)
    assert count_params(params) == SMALL_CNN_PARAMS
    kernels = [p["kernel"].shape for p in params if "kernel" in p]
    assert kernels == [(3, 3, 1, 32), (3, 3, 32, 32), (3, 3, 32, 64), (3, 3, 64, 64)]


@pytest.mark.parametrize("name, total", [("lenet5", LENET5_PARAMS),
                                         ("small_cnn", SMALL_CNN_PARAMS),
                                         ("resnet", RESNET_PARAMS)])
def test_num_classes_changes_only_the_last_layer(name, total):
    # The last dense layer has (D_in + 1) * num_classes parameters: 85 (lenet5), 257, 65.
    d_in = {"lenet5": 84, "small_cnn": 256, "resnet": 64}[name]
    out_shape, params = models.MODELS[name](3).init(KEY, (2, 28, 28, 1))
    assert out_shape == (2, 3)
    assert count_params(params) == total - (d_in + 1) * 10 + (d_in + 1) * 3


def test_forward_gives_logits_of_the_stated_shape():
    init, apply = models.lenet5()
    _, params = init(KEY, (-1, 28, 28, 1))
    x = jnp.asarray(np.random.default_rng(0).random((3, 28, 28, 1)), jnp.float32)
    logits = jax.jit(apply, static_argnames="impl")(params, x, impl="lax")
    assert logits.shape == (3, 10) and np.all(np.isfinite(logits))
    init, apply = models.small_cnn()
    _, params = init(KEY, (-1, 28, 28, 1))
    spec = jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32)
    assert jax.eval_shape(apply, params, spec).shape == (3, 10)


def test_initialisation_he_before_relu_lecun_for_the_output_layer():
    # Each weight's sample std over sqrt(1/fan_in): ~sqrt(2) = 1.41 (He) or ~1 (LeCun).
    # Thresholding at 1.19 (between the two) is robust even for conv1's 150 samples.
    _, params = models.lenet5().init(KEY, (-1, 28, 28, 1))
    ratios = []
    for p in params:
        if p:
            w = np.asarray(p.get("kernel", p.get("w")))
            ratios.append(float(np.std(w)) * math.sqrt(math.prod(w.shape[:-1])))
    assert [r > 1.19 for r in ratios] == [True, True, True, True, False]


def test_models_are_cached_so_jit_compiles_once():
    assert models.lenet5() is models.lenet5(10) is models.lenet5(num_classes=10)
    assert models.lenet5(3) is not models.lenet5()
    assert models.small_cnn() is models.small_cnn(10)


def test_registry():
    assert models.MODELS == {"lenet5": models.lenet5, "small_cnn": models.small_cnn,
                             "resnet": models.resnet}


@pytest.mark.parametrize("make, error, match", [
    (lambda: models.lenet5(1), ValueError, r"lenet5: num_classes must be >= 2; got 1"),
    (lambda: models.lenet5(10.0), TypeError, r"lenet5: num_classes must be an int; got float"),
    (lambda: models.small_cnn(True), TypeError, r"small_cnn: num_classes must be an int"),
    (lambda: models.resnet(1), ValueError, r"resnet: num_classes must be >= 2; got 1"),
    (lambda: models.resnet(widths=(16, 32)), ValueError,
     r"resnet: widths must be a tuple of 3 channel counts, one per stage; got \(16, 32\)"),
    (lambda: models.resnet(widths=(16, 0, 64)), ValueError, r"resnet: widths must be >= 1"),
    (lambda: models.resnet(blocks=0), ValueError, r"resnet: blocks must be >= 1; got 0"),
])
def test_bad_num_classes(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --------------------------------------------------------------------------------------------
# The ResNet.


def test_resnet_shapes_parameter_and_state_counts():
    init, apply = models.resnet()
    out_shape, params, state = init(KEY, (-1, 28, 28, 1), with_state=True)
    assert out_shape == (-1, 10)
    assert count_params(params) == RESNET_PARAMS
    assert count_params(state) == RESNET_STATE
    assert params[0] == {"kernel": params[0]["kernel"]}             # no bias before BN
    assert params[0]["kernel"].shape == (3, 3, 1, 16)
    assert params[-1]["w"].shape == (64, 10)
    # Feature maps 28x28x16 -> 14x14x32 -> 7x7x64: each block's output shape from init.
    shape = (2, 28, 28, 1)
    assert init(KEY, shape)[0] == (2, 10)
    blocks = [models.residual_block(16), models.residual_block(32, stride=2)]
    assert blocks[0].init(KEY, (2, 28, 28, 16))[0] == (2, 28, 28, 16)
    assert blocks[1].init(KEY, (2, 28, 28, 16))[0] == (2, 14, 14, 32)
    x = jnp.asarray(np.random.default_rng(0).random((3, 28, 28, 1)), jnp.float32)
    spec = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    for train in (True, False):
        y, new_state = jax.eval_shape(
            lambda p, s, x: apply_model(apply, p, s, x, train=train), params, state, spec)
        assert y.shape == (3, 10)
        assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert models.resnet() is models.resnet(10)
    assert count_params(models.resnet(widths=(8, 8, 8), blocks=2).init(KEY, shape)[1]) > 0


# Under -m slow (the default suite must stay under 5 minutes): the ResNet's training is also run
# by test_training's resume test and by `python -m jaxcnn.check`'s end-to-end section.
@pytest.mark.slow
def test_resnet_trains_on_a_small_subset():
    # 64 steps (1,024 embedded digits, batch 32, 2 epochs, Adam 1e-2 with cosine decay,
    # impl="manual"), then eval mode (running averages) on 500 test digits. Measured: 94.6%;
    # chance is 10%. Train mode's batch statistics must have become running averages that
    # work in eval mode for this to pass.
    ds = data.load_dataset("synthetic", n_train=1024, n_test=500)
    init, apply = models.resnet()
    _, params, state = init(KEY, (-1, 28, 28, 1), with_state=True)
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, 64))

    @jax.jit
    def step(params, state, opt_state, x, y):
        def loss(p):
            logits, new_state = apply_model(apply, p, state, x, train=True)
            return jc.cross_entropy(logits, y, impl="manual"), new_state

        (_, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state

    opt_state = optimizer.init(params)
    for epoch in range(2):
        for x, y in data.batches(ds.train_x, ds.train_y, 32, epoch=epoch):
            params, state, opt_state = step(params, state, opt_state, x, y)
    logits, _ = jax.jit(lambda p, s, x: apply_model(apply, p, s, x, train=False))(
        params, state, ds.test_x)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == ds.test_y))
    assert accuracy >= 0.90, accuracy
