"""jaxcnn: CNN building blocks as pure JAX functions, each with a hand-derived gradient.

Every op takes ``impl="lax"`` (lax primitives, JAX's autodiff: the reference) or
``impl="manual"`` (explicit forward, the lecture's backward registered with ``jax.custom_vjp``).
"""

from . import models, nn
from .check import check_vjp
from .convolution import conv
from .activations import log_softmax, relu
from .linear import dense, flatten
from .losses import cross_entropy
from .adaptive_pooling import (adaptive_avg_pool, adaptive_max_pool, global_avg_pool,
                               global_max_pool)
from .padding import pad
from .pooling import avg_pool, max_pool

__version__ = "0.1.0"

__all__ = [
    "conv",
    "max_pool",
    "avg_pool",
    "global_max_pool",
    "global_avg_pool",
    "adaptive_max_pool",
    "adaptive_avg_pool",
    "pad",
    "dense",
    "relu",
    "flatten",
    "log_softmax",
    "cross_entropy",
    "check_vjp",
    "nn",
    "models",
]

