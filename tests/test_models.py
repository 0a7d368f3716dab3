"""Tests for jaxcnn.models: parameter counts, shapes, initialisation, the registry."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import models
from jaxcnn.nn import count_params

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
                                         ("small_cnn", SMALL_CNN_PARAMS)])
def test_num_classes_changes_only_the_last_layer(name, total):
    # The last dense layer has (D_in + 1) * num_classes parameters: 85 (lenet5), 257.
    d_in = {"lenet5": 84, "small_cnn": 256}[name]
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
    assert models.MODELS == {"lenet5": models.lenet5, "small_cnn": models.small_cnn}


@pytest.mark.parametrize("make, error, match", [
    (lambda: models.lenet5(1), ValueError, r"lenet5: num_classes must be >= 2; got 1"),
    (lambda: models.lenet5(10.0), TypeError, r"lenet5: num_classes must be an int; got float"),
    (lambda: models.small_cnn(True), TypeError, r"small_cnn: num_classes must be an int"),
])
def test_bad_num_classes(make, error, match):
    with pytest.raises(error, match=match):
        make()
