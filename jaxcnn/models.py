"""Models built from :mod:`jaxcnn.nn`: LeNet-5, a wider CNN for harder data, and a small ResNet.

Each model is a function ``num_classes -> Layer`` (an ``(init, apply)`` pair) for 28×28×1
images, ``x: (N, 28, 28, 1) -> logits (N, num_classes)``. The functions are cached: the same
arguments give the very same ``(init, apply)`` objects, so a jitted training step that takes
``apply`` as a static argument compiles once per model and process, not once per call.
"""

from __future__ import annotations

import functools

from . import _shapes
from .nn import (BatchNorm, Conv, Dense, FanInSum, FanOut, Flatten, GlobalAvgPool,
                 Identity, MaxPool, Relu, parallel, serial)

INPUT_SHAPE = (28, 28, 1)
"""The image shape every model here expects: ``(height, width, channels)``."""


def lenet5(num_classes=10):
    """LeNet-5 (LeCun et al. 1998) in its modern 28×28 form: ReLU and max pooling.

    ``conv 5×5×6 SAME → relu → maxpool 2 → conv 5×5×16 VALID → relu → maxpool 2 → flatten →
    dense 120 → relu → dense 84 → relu → dense num_classes``; the feature maps go
    28×28×6 → 14×14×6 → 10×10×16 → 5×5×16 = 400 features. 61,706 parameters for 10 classes.
    """
    return _lenet5(_shapes.check_int("lenet5", "num_classes", num_classes, minimum=2))


@functools.cache
def _lenet5(num_classes):
    return serial(
        Conv(6, 5, padding="SAME"), Relu, MaxPool(2),
        Conv(16, 5, padding="VALID"), Relu, MaxPool(2),
        Flatten,
        Dense(120), Relu,
        Dense(84), Relu,
        Dense(num_classes),
    )


def small_cnn(num_classes=10):
    """A VGG-style CNN for Fashion-MNIST: two blocks of two 3×3 convolutions, then two dense.

    ``[conv 3×3×32 SAME → relu] ×2 → maxpool 2 → [conv 3×3×64 SAME → relu] ×2 → maxpool 2 →
    flatten → dense 256 → relu → dense num_classes``; the feature maps go 28×28×32 → 14×14×32
    → 14×14×64 → 7×7×64 = 3136 features. 870,634 parameters for 10 classes.
    """
    return _small_cnn(_shapes.check_int("small_cnn", "num_classes", num_classes, minimum=2))


@functools.cache
def _small_cnn(num_classes):
    return serial(
        Conv(32, 3, padding="SAME"), Relu,
        Conv(32, 3, padding="SAME"), Relu, MaxPool(2),
        Conv(64, 3, padding="SAME"), Relu,
        Conv(64, 3, padding="SAME"), Relu, MaxPool(2),
        Flatten,
        Dense(256), Relu,
        Dense(num_classes),
    )


def resnet(num_classes=10, *, widths=(16, 32, 64), blocks=1):
    """A small ResNet (He et al. 2016, the CIFAR family) for 28×28×1 images, with batch norm.

    ``conv 3×3×w₁ SAME → BN → relu`` (the stem), three stages of ``blocks`` basic residual
    blocks with ``widths = (w₁, w₂, w₃)`` channels at 28×28, 14×14 and 7×7 (the first block of
    stages 2 and 3 has stride 2), a global average pool over the 7×7 map, and ``dense
    num_classes``. A basic block is ``x → conv 3×3 → BN → relu → conv 3×3 → BN → (+ shortcut)
    → relu``, the shortcut being ``x`` itself, or a strided ``conv 1×1 → BN`` projection where
    the shape changes (:func:`residual_block`). Convolutions have no bias (each is followed
    by a batch norm, whose offset plays that role) and He initialisation.

    The model has state (the batch norms' running averages): use ``init(key, input_shape,
    with_state=True)`` and :func:`jaxcnn.nn.apply_model` with ``train=True`` in the training
    step and ``train=False`` for evaluation. 77,754 parameters for the defaults and 10 classes
    (the count is worked out in tests/test_models.py).
    """
    fn = "resnet"
    num_classes = _shapes.check_int(fn, "num_classes", num_classes, minimum=2)
    if not (isinstance(widths, (list, tuple)) and len(widths) == 3):
        raise ValueError(f"{fn}: widths must be a tuple of 3 channel counts, one per stage; "
                         f"got {widths!r}")
    widths = tuple(_shapes.check_int(fn, "widths", w, minimum=1) for w in widths)
    blocks = _shapes.check_int(fn, "blocks", blocks, minimum=1)
    return _resnet(num_classes, widths, blocks)


@functools.cache
def _resnet(num_classes, widths, blocks):
    layers = [Conv(widths[0], 3, padding="SAME", use_bias=False, init="he"), BatchNorm(), Relu]
    c_in = widths[0]
    for stage, width in enumerate(widths):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            layers.append(residual_block(width, stride=stride, project=stride != 1 or
                                         c_in != width))
            c_in = width
    layers += [GlobalAvgPool(), Dense(num_classes)]
    return serial(*layers)


def residual_block(channels, *, stride=1, project=None):
    """A basic residual block: ``relu(main(x) + shortcut(x))``, ``main = conv 3×3 (stride) →
    BN → relu → conv 3×3 → BN``, ``shortcut = x`` or, with ``project`` (default: when
    ``stride > 1``), ``conv 1×1 (stride) → BN`` to match the main branch's shape.
    ``(N, H, W, C) -> (N, ceil(H / stride), ceil(W / stride), channels)``."""
    project = stride != 1 if project is None else project
    conv = lambda c, k, s=1: Conv(c, k, stride=s, padding="SAME", use_bias=False,  # noqa: E731
                                  init="he")
    main = serial(conv(channels, 3, stride), BatchNorm(), Relu,
                  conv(channels, 3), BatchNorm())
    shortcut = serial(conv(channels, 1, stride), BatchNorm()) if project else Identity
    return serial(FanOut(2), parallel(main, shortcut), FanInSum, Relu)


MODELS = {"lenet5": lenet5, "small_cnn": small_cnn, "resnet": resnet}
"""Model name -> constructor ``(num_classes=10) -> (init, apply)``."""

