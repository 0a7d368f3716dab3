"""The networks the benchmarks time, defined once: LeNet-5, the CIFAR stack, small_cnn (and
the ResNet of ``jaxcnn.models`` where it exists).

Each network is a list of plain layer specs (``("conv", C_out, window, padding)``,
``("relu",)``, ``("max_pool", window)``, ``("flatten",)``, ``("dense", D_out)``), so that
``benchmarks/vs_torch.py`` builds the very same layers in PyTorch and ``benchmarks/ops.py`` and
the per-layer profile build them with :mod:`jaxcnn.nn`. Where ``jaxcnn.models`` has the network
(LeNet-5, small_cnn), the model itself is what runs, and :func:`model` checks that the specs
here still describe it (same parameter shapes), so the two cannot drift apart silently.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxcnn as jc
from jaxcnn import models, nn


class Net(NamedTuple):
    name: str
    input_shape: tuple[int, ...]  # (H, W, C)
    spec: tuple[tuple, ...]
    library_model: Callable | None  # jaxcnn.models.<name>, or None (defined only here)


def _conv_relu(c_out, window, padding="SAME"):
    return (("conv", c_out, window, padding), ("relu",))


LENET5 = (*_conv_relu(6, 5), ("max_pool", 2), *_conv_relu(16, 5, "VALID"), ("max_pool", 2),
          ("flatten",), ("dense", 120), ("relu",), ("dense", 84), ("relu",), ("dense", 10))
"""LeNet-5 as in ``jaxcnn.models.lenet5``: 28×28×1, 61,706 parameters."""

CIFAR_STACK = (*_conv_relu(32, 3), ("max_pool", 2), *_conv_relu(64, 3), ("max_pool", 2),
               *_conv_relu(128, 3), ("max_pool", 2), ("flatten",), ("dense", 10))
"""The CIFAR stack: 32×32×3, 3×3 SAME convs 3→32→64→128, each followed by relu and a 2×2
max pool, then dense 2048→10."""

SMALL_CNN = (*_conv_relu(32, 3), *_conv_relu(32, 3), ("max_pool", 2), *_conv_relu(64, 3),
             *_conv_relu(64, 3), ("max_pool", 2), ("flatten",), ("dense", 256), ("relu",),
             ("dense", 10))
"""small_cnn as in ``jaxcnn.models.small_cnn``: 28×28×1, 870,634 parameters."""

NETS = (
    Net("LeNet-5", (28, 28, 1), LENET5, models.lenet5),
    Net("CIFAR stack", (32, 32, 3), CIFAR_STACK, None),
    Net("small_cnn", (28, 28, 1), SMALL_CNN, models.small_cnn),
)


def layer(spec) -> nn.Layer:
    """One :mod:`jaxcnn.nn` layer from its spec."""
    kind, *args = spec
    if kind == "conv":
        c_out, window, padding = args
        return nn.Conv(c_out, window, padding=padding)
    if kind == "max_pool":
        return nn.MaxPool(args[0])
    if kind == "dense":
        return nn.Dense(args[0])
    return {"relu": nn.Relu, "flatten": nn.Flatten}[kind]


def label(spec, in_shape) -> str:
    """A readable name of a layer at the input shape ``(N, *spatial, C)`` it sees."""
    kind, *args = spec
    size = "x".join(map(str, in_shape[1:]))
    if kind == "conv":
        c_out, k, padding = args
        return f"conv {k}x{k} {in_shape[-1]}->{c_out} {padding} {size}"
    if kind == "max_pool":
        return f"max_pool {args[0]}x{args[0]} /{args[0]} {size}"
    if kind == "dense":
        return f"dense {in_shape[-1]}->{args[0]}"
    return f"{kind} {size}"


def model(net: Net) -> nn.Layer:
    """The network as one ``(init, apply)`` pair: the library's model where there is one
    (checked against the spec), else ``serial`` of the spec's layers."""
    built = nn.serial(*map(layer, net.spec))
    if net.library_model is None:
        return built
    lib = net.library_model()
    shapes = [jax.tree_util.tree_map(jnp.shape, init(m, net)) for m in (lib, built)]
    if shapes[0] != shapes[1]:
        raise RuntimeError(f"benchmarks/_nets.py: the spec of {net.name} no longer matches "
                           f"jaxcnn.models ({shapes[0]} vs {shapes[1]}); update the spec")
    return lib


def init(layer_pair, net: Net, seed: int = 0):
    """Params of ``layer_pair`` for the network's input shape (any batch)."""
    _, params = layer_pair.init(jax.random.key(seed), (-1, *net.input_shape))
    return params


def batch(net: Net, size: int, seed: int = 0):
    """One fixed batch ``(x, y)`` of random images and labels 0..9, float32 and int32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, *net.input_shape)).astype(np.float32)
    y = rng.integers(0, 10, size).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def loss(apply, params, x, y, impl):
    """Mean cross-entropy of the network on ``(x, y)``, every layer on ``impl``."""
    return jc.cross_entropy(apply(params, x, impl=impl), y, impl=impl)


class Whole(NamedTuple):
    """A whole network's forward + backward: ``make(impl)`` builds a jitted function of
    ``args`` that returns the gradient of the loss with respect to every parameter."""

    name: str
    make: Callable
    args: tuple


def whole_networks(batch_size: int) -> list[Whole]:
    """LeNet-5, the CIFAR stack, small_cnn and (where ``jaxcnn.models`` has it) the ResNet."""
    out = []
    for net in NETS:
        pair = model(net)
        make = lambda impl, apply=pair.apply: jax.jit(jax.grad(  # noqa: E731
            lambda p, x, y: loss(apply, p, x, y, impl)))
        out.append(Whole(net.name, make, (init(pair, net), *batch(net, batch_size))))
    resnet = _resnet(batch_size)
    return out + ([resnet] if resnet else [])


def _resnet(batch_size: int) -> Whole | None:
    """``jaxcnn.models.resnet`` in train mode (batch norm on batch statistics), or None where
    this jaxcnn has no ResNet yet. Its running averages come back as an auxiliary output."""
    if not (hasattr(models, "resnet") and hasattr(nn, "apply_model")):
        return None
    init_fn, apply = models.resnet()
    _, params, state = init_fn(jax.random.key(0), (-1, 28, 28, 1), with_state=True)
    x, y = batch(Net("ResNet", (28, 28, 1), (), None), batch_size)

    def make(impl):
        def loss_with_state(p, state, x, y):
            logits, new_state = nn.apply_model(apply, p, state, x, train=True, impl=impl)
            return jc.cross_entropy(logits, y, impl=impl), new_state

        return jax.jit(jax.grad(loss_with_state, has_aux=True))

    return Whole("ResNet (jaxcnn.models.resnet)", make, (params, state, x, y))
