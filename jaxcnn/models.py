"""Models built from :mod:`jaxcnn.nn`: LeNet-5 and a wider CNN for harder data.

Each model is a function ``num_classes -> Layer`` (an ``(init, apply)`` pair) for 28×28×1
images, ``x: (N, 28, 28, 1) -> logits (N, num_classes)``. The functions are cached: the same
arguments give the very same ``(init, apply)`` objects, so a jitted training step that takes
``apply`` as a static argument compiles once per model and process, not once per call.
"""

from __future__ import annotations

import functools

from . import _shapes
from .nn import Conv, Dense, Flatten, MaxPool, Relu, serial

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


MODELS = {"lenet5": lenet5, "small_cnn": small_cnn}
"""Model name -> constructor ``(num_classes=10) -> (init, apply)``."""

