"""jaxcnn: CNN building blocks as pure JAX functions, each with a hand-derived gradient.

Every op takes ``impl="lax"`` (lax primitives, JAX's autodiff: the reference) or
``impl="manual"`` (explicit forward, the lecture's backward registered with ``jax.custom_vjp``).
"""

from . import models, nn
from .convolution import conv
from .activations import log_softmax, relu
from .linear import dense, flatten
from .losses import cross_entropy
from .pooling import avg_pool, max_pool

__version__ = "0.1.0"

__all__ = [
    "conv",
    "max_pool",
    "avg_pool",
    "dense",
    "relu",
    "flatten",
    "log_softmax",
    "cross_entropy",
    "check_vjp",
    "nn",
    "models",
]


def __getattr__(name):
    # jc.check_vjp lives in jaxcnn.check and is imported on first use, so that the tool
    # `python -m jaxcnn.check` does not find its own module already imported (runpy warns).
    if name == "check_vjp":
        from .check import check_vjp

        return check_vjp
    raise AttributeError(f"module 'jaxcnn' has no attribute {name!r}")
