"""End-to-end checks: a whole model's loss gradient, every layer manual vs every layer lax.

For each model of :data:`MODELS`, the gradient of the cross-entropy loss on a batch of the
embedded digits is computed twice, every layer (and the loss) on ``impl="manual"`` and every
layer on ``impl="lax"``, and compared parameter by parameter; the loss values are compared too
(the ``fwd`` column). ``python -m jaxcnn.check`` runs every model here after the grid.

How to add a model: add one entry to :data:`MODELS`, e.g. ``"lenet5": Model("lenet5", "the
LeNet-5 loss", models.lenet5)``, where the third field builds the ``(init, apply)`` pair. The
logits come from :func:`jaxcnn.nn.apply_model` with the state ``init(..., with_state=True)``
gives and the mode ``train`` (default False); a model with batch norm sets ``train=True`` to
check the training-mode gradient (batch statistics, the derivation that matters). A model that
needs another input than 16 embedded digits gives its own ``batch`` function.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import models
from ..data import synthetic_digits
from ..losses import cross_entropy
from ..nn import apply_model
from ._engine import jit_once
from .results import ArgCheck, CheckResult, Comparison
from .tolerances import TOLERANCES


class Batch(NamedTuple):
    """The input of an end-to-end check, and where it comes from (printed in the report)."""

    images: np.ndarray    # (N, 28, 28, 1) float64 in [0, 1]
    labels: np.ndarray    # (N,) int32
    source: str


def digits_batch(n: int = 16) -> Batch:
    """A real batch: ``n`` of the embedded synthetic digits (:mod:`jaxcnn.data`)."""
    images, labels = synthetic_digits(n, seed=0)
    return Batch(np.asarray(images, np.float64)[..., None] / 255.0,
                 np.asarray(labels, np.int32), f"jaxcnn.data.synthetic_digits({n}, seed=0)")


@dataclasses.dataclass(frozen=True)
class Model:
    """One end-to-end section: a model of :mod:`jaxcnn.models` and the batch it is checked on."""

    name: str                          # the row label in the report, "op" in the JSON
    loss_name: str                     # the section heading: "gradient of <loss_name>"
    layer: Callable[[], tuple]         # () -> (init, apply), as in jaxcnn.models
    seed: int = 5                      # jax.random.PRNGKey(seed) initializes the parameters
    batch: Callable[[], Batch] = digits_batch
    train: bool = False                # the mode of the loss (True: batch norm's batch stats)


# The end-to-end sections, in report order.
MODELS = {
    "lenet5": Model("lenet5", "the LeNet-5 loss", models.lenet5),
    "resnet": Model("resnet", "the ResNet loss in train mode", models.resnet, train=True),
}


def model_loss(model: Model, params, state, x, labels, impl: str):
    """The model's cross-entropy loss, every layer and the loss on ``impl``, in the model's
    mode with its state (the new state is not part of the loss)."""
    _, apply = model.layer()
    logits, _ = apply_model(apply, params, state, x, train=model.train, impl=impl)
    return cross_entropy(logits, labels, impl=impl)


def run_model(model: Model, dtype: str = "float64") -> tuple[list, Batch]:
    """One :class:`CheckResult` per parameter comparing the two gradients of the model's loss,
    and the batch they were taken on."""
    tol = TOLERANCES[dtype]
    batch = model.batch()
    init, _ = model.layer()
    _, params, state = init(jax.random.PRNGKey(model.seed), batch.images.shape,
                            with_state=True)
    params, state = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), (params, state))
    x = jnp.asarray(batch.images.astype(dtype))
    y = jnp.asarray(batch.labels)
    grads = {}
    for impl in ("manual", "lax"):
        loss = jax.value_and_grad(
            lambda p, s, x, y, impl=impl: model_loss(model, p, s, x, y, impl))
        grads[impl] = jax.device_get(jit_once(loss, params, state, x, y))
    fwd = Comparison.between(grads["manual"][0], grads["lax"][0], tol)
    results = []
    manual = jax.tree_util.tree_flatten_with_path(grads["manual"][1])[0]
    for (path, gm), gl in zip(manual, jax.tree_util.tree_leaves(grads["lax"][1])):
        name = jax.tree_util.keystr(path)
        c = Comparison.between(gm, gl, tol)
        results.append(CheckResult(f"{model.name}: {name} {gm.shape}", dtype, fwd,
                                   [ArgCheck(name, gm.shape, {"reference_grad": c})]))
    return results, batch
