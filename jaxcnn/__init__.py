"""jaxcnn: CNN building blocks as pure JAX functions, each with a hand-derived gradient.

Every op takes ``impl="lax"`` (lax primitives, JAX's autodiff: the reference) or
``impl="manual"`` (explicit forward, the lecture's backward registered with ``jax.custom_vjp``).
"""

from . import models, nn
from .check import check_vjp
from .convolution import conv, conv_transpose
from .activations import gelu, leaky_relu, log_softmax, relu, sigmoid, softmax, tanh
from .linear import dense, flatten
from .losses import binary_cross_entropy_with_logits, cross_entropy, mse
from .normalization import batch_norm, layer_norm
from .adaptive_pooling import (adaptive_avg_pool, adaptive_max_pool, global_avg_pool,
                               global_max_pool)
from .padding import pad
from .pooling import avg_pool, max_pool
from .regularization import dropout
from ._xla_cpu import reuse_host_memory

__version__ = "0.1.0"

__all__ = [
    "conv",
    "conv_transpose",
    "max_pool",
    "avg_pool",
    "global_max_pool",
    "global_avg_pool",
    "adaptive_max_pool",
    "adaptive_avg_pool",
    "pad",
    "dense",
    "relu",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "gelu",
    "softmax",
    "flatten",
    "log_softmax",
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "mse",
    "batch_norm",
    "layer_norm",
    "dropout",
    "check_vjp",
    "nn",
    "models",
    "reuse_host_memory",
]

