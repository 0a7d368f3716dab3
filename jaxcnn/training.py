"""Training: a plain-data config, the train state, the loss, one jitted step, evaluation, ``fit``.

The pieces, each with one job::

    config = TrainConfig(model="lenet5", epochs=3)   # plain data, checked when made
    result = fit(config)                             # load data, train, evaluate, save

    loss_fn(params, batch, apply=..., impl=...)      # mean cross-entropy of one batch
    train_step(params, opt_state, batch, apply=..., optimizer=..., impl=...)
                                                     # -> (params, opt_state, loss), jitted
    train_step(params, opt_state, batch, apply=..., optimizer=..., impl=...,
               model_state=model_state, rng=key)     # train mode, models with state or dropout
                                                     # -> (params, opt_state, loss, model_state)
    evaluate(params, x, y, apply=..., impl=...,      # -> {"loss", "accuracy"} over all of x,
             model_state=model_state)                #    eval mode (running averages)

``fit`` reads like flax's MNIST example: :func:`train_epoch` runs the steps of one epoch on a
:class:`TrainState`, :func:`evaluate` measures it, and the loop saves a checkpoint and a
metrics record after each epoch. The checkpoint format lives in :mod:`jaxcnn.checkpoint`, the
console lines, ``metrics.jsonl``, ``summary.json`` and plots in :mod:`jaxcnn._report`.

Models with state (the ResNet's batch norms) follow the contract of :mod:`jaxcnn.nn`: ``fit``
initializes ``model_state`` with ``init(key, input_shape, with_state=True)``; every training
step runs the model in train mode (:func:`jaxcnn.nn.apply_model`: batch statistics, running
averages moved and returned in the new :class:`TrainState`), evaluation in eval mode (the
running averages, so nothing depends on the batch, not even the padded rows of the last eval
batch). A model without state (LeNet-5, ``small_cnn``: a state tree without leaves) runs the
stateless form of :func:`train_step` and :func:`evaluate`, exactly as before state existed.

Each model has a default recipe (epochs, batch size, peak learning rate) in :data:`RECIPES`,
which :class:`TrainConfig` and ``train.py --help`` read.

What a run leaves in ``config.out`` (default ``runs/<dataset>-<model>-<impl>-seed<seed>``):

- ``metrics.jsonl``: one JSON record per epoch (train loss, test loss and accuracy, images/s);
- ``summary.json``: final metrics, configuration, wall time, versions, backend;
- ``checkpoint.npz``: params, model state, optimizer state, step, epoch, seed and
  configuration, replaced atomically after every epoch (see :mod:`jaxcnn.checkpoint`);
- ``curves.png`` and ``filters.png`` when matplotlib is installed (the ``plot`` extra).

Randomness: the initial parameters come from ``jax.random.key(seed)``, the batch order of
epoch ``e`` from ``numpy.random.default_rng([seed, e])`` (:func:`jaxcnn.data.batches`), and
the key of training step ``t`` (0-based; dropout draws its masks from it) is
:func:`step_key` ``(seed, t)``; there is no other random draw. So (seed, epoch) is the whole
RNG state, a checkpoint stores both (and the step), and a resumed run on the same machine
draws the same batches and masks and ends with exactly the parameters and model state of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import sys
import time
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _io, _report, _rundir, _shapes, checkpoint, data, parallel
from ._shapes import IMPLS
from .activations import log_softmax
from .checkpoint import load_everywhere, save_checkpoint
from .losses import cross_entropy
from .models import MODELS
from .nn import apply_model

OPTIMIZERS = ("adam", "sgd", "momentum")
DTYPES = ("float32", "bfloat16")  # the compute dtype; params and optimizer state stay float32
MOMENTUM = 0.9  # the "momentum" optimizer: SGD with heavy-ball momentum 0.9
EVAL_BATCH_SIZE = 1000  # evaluation batch (the last one is padded, so it compiles once)
SYNC_EVERY = 25  # training steps between two reads of the losses (progress bar, NaN check)
CHECKPOINT, METRICS, SUMMARY = checkpoint.FILENAME, _report.METRICS, _report.SUMMARY  # in out
STEP_KEYS = 1  # step t's key is fold_in(fold_in(key(seed), STEP_KEYS), t): see step_key


class Recipe(NamedTuple):
    """A model's default training recipe: what :class:`TrainConfig` takes for the settings left
    None (the optimizer is ``"adam"`` for every model, its rate decayed to 0 by a cosine)."""

    epochs: int
    batch_size: int
    lr: float


RECIPES = {
    "lenet5": Recipe(epochs=3, batch_size=64, lr=2e-3),
    "small_cnn": Recipe(epochs=3, batch_size=64, lr=2e-3),
    # 2 epochs of 469 steps: the budget of 10 minutes on 2 CPU cores (README, "The ResNet").
    # Batch 128 halves the steps of batch 64 at 3/4 of the time per image; batch norm
    # tolerates the higher peak rate.
    "resnet": Recipe(epochs=2, batch_size=128, lr=3e-3),
}
"""Model name -> its default :class:`Recipe`: the one place ``TrainConfig``, ``train.py``'s
``--help`` and the README take the defaults of ``epochs``, ``batch_size`` and ``lr`` from."""


def recipe_of(model: str) -> Recipe:
    """The default recipe of ``model``: its entry of :data:`RECIPES`, or LeNet-5's for a model
    registered in :data:`jaxcnn.models.MODELS` without one."""
    return RECIPES.get(model, RECIPES["lenet5"])


# --------------------------------------------------------------------------------------------
# Configuration, optimizer, state.


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on, as plain data (JSON-serialisable, saved with each run).

    Attributes:
      dataset: one of :data:`jaxcnn.data.DATASETS`.
      data_dir: directory with the IDX files (mnist, fashion_mnist); None: the download cache.
      model: one of :data:`jaxcnn.models.MODELS`.
      impl: ``"manual"`` (the hand-derived gradients) or ``"lax"`` (JAX's autodiff).
      epochs: total number of epochs (a resumed run trains up to this many).
      batch_size: training batch size, >= 1 and <= the number of training examples.
      lr: peak learning rate, a finite number > 0 that float32 holds (the update's dtype).
        ``epochs``, ``batch_size`` and ``lr`` left None take the model's recipe
        (:data:`RECIPES`) when the config is made; the config then holds the numbers.
      optimizer: one of :data:`OPTIMIZERS`.
      seed: seed of the initial parameters, the batch order and the synthetic data.
      out: output directory; None: ``runs/<dataset>-<model>-<impl>-seed<seed>``. One run at a
        time holds it; a new run refuses one that holds another run's files.
      resume: continue the run whose checkpoint is in ``out``, with its own ``epochs`` (or
        more, once it has finished).
      eval_only: only evaluate the checkpoint in ``out`` on the test set.
      overwrite: start a new run in ``out`` even though it holds another run's files, which are
        removed first.
      n_train, n_test: use only this many examples (None: the whole split).
      devices: train data-parallel on this many devices (None: every device JAX sees, in every
        process); ``batch_size`` must be divisible by it. See :mod:`jaxcnn.parallel`.
      dtype: the compute dtype, one of :data:`DTYPES`. ``"bfloat16"``: the forward and backward
        passes run in bfloat16 (products accumulated in float32 by every op, both impls), on
        a bfloat16 copy of the float32 master params; the loss, the gradients and the optimizer
        update are float32.
    """

    dataset: str = "synthetic"
    data_dir: str | None = None
    model: str = "lenet5"
    impl: str = "manual"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str = "adam"
    seed: int = 0
    out: str | None = None
    resume: bool = False
    eval_only: bool = False
    overwrite: bool = False
    n_train: int | None = None
    n_test: int | None = None
    devices: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        fn = "TrainConfig"
        _shapes.check_choice(fn, "dataset", self.dataset, data.DATASETS)
        _shapes.check_choice(fn, "model", self.model, tuple(MODELS))
        recipe = recipe_of(self.model)
        for name, value in recipe._asdict().items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: set once, while being made
        _shapes.check_choice(fn, "impl", self.impl, IMPLS)
        _shapes.check_choice(fn, "optimizer", self.optimizer, OPTIMIZERS)
        _shapes.check_choice(fn, "dtype", self.dtype, DTYPES)
        _shapes.check_int(fn, "epochs", self.epochs, minimum=1)
        _shapes.check_int(fn, "batch_size", self.batch_size, minimum=1)
        _shapes.check_int(fn, "seed", self.seed, minimum=0)
        for name in ("n_train", "n_test", "devices"):
            if getattr(self, name) is not None:
                _shapes.check_int(fn, name, getattr(self, name), minimum=1)
        _check_lr(fn, self.lr)
        for name in ("data_dir", "out"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{fn}: {name} must be a path or None; got {value!r}")
        modes = [name for name in ("resume", "eval_only", "overwrite")
                 if _shapes.check_bool(fn, name, getattr(self, name))]
        if len(modes) > 1:
            raise ValueError(f"{fn}: {modes[0]} and {modes[1]} exclude each other; got both True")

    @property
    def out_dir(self) -> pathlib.Path:
        """``out``, or ``runs/<dataset>-<model>-<impl>-seed<seed>`` when ``out`` is None."""
        if self.out is not None:
            return pathlib.Path(self.out)
        return pathlib.Path("runs") / f"{self.dataset}-{self.model}-{self.impl}-seed{self.seed}"

    def to_json(self) -> dict:
        return {k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                for k, v in dataclasses.asdict(self).items()}


class Optimizer(NamedTuple):
    """An optimizer as plain data: :data:`OPTIMIZERS` name, peak learning rate and the length
    of its cosine decay (None: a constant rate). Made by :func:`make_optimizer`.

    ``init`` and ``update`` are those of the optax transformation it describes
    (:meth:`transform`), so it goes wherever an ``optax.GradientTransformation`` is called.
    Two optimizers with the same settings are equal and hash alike, so the jitted
    :func:`train_step`, which takes the optimizer as a static argument, compiles once per
    setting and reuses that compilation in every later run with the same settings; no cache
    of optimizer objects is needed.
    """

    name: str
    lr: float
    decay_steps: int | None = None

    def schedule(self):
        """The learning rate: a function of the step count, or the constant ``lr``."""
        if self.decay_steps is None:
            return self.lr
        return optax.cosine_decay_schedule(self.lr, self.decay_steps)

    def learning_rate(self, step: int) -> float:
        """The learning rate of the update at step count ``step``."""
        schedule = self.schedule()
        return float(schedule(step)) if callable(schedule) else schedule

    def transform(self) -> optax.GradientTransformation:
        lr = self.schedule()
        if self.name == "adam":
            return optax.adam(lr)
        if self.name == "sgd":
            return optax.sgd(lr)
        return optax.sgd(lr, momentum=MOMENTUM)

    def init(self, params):
        return self.transform().init(params)

    def update(self, updates, state, params=None):
        return self.transform().update(updates, state, params)


def make_optimizer(name: str, lr: float, decay_steps: int | None = None) -> Optimizer:
    """``"adam"`` (optax defaults), ``"sgd"`` or ``"momentum"`` (SGD, heavy ball 0.9).

    With ``decay_steps`` the learning rate follows a cosine from ``lr`` down to 0 over that many
    steps (``fit`` uses the whole run), so the last epoch settles instead of ending on a
    full-size step; its step count lives in the optimizer state, so a resumed run continues the
    same schedule. The result is an :class:`Optimizer`: plain data with optax's ``init`` and
    ``update``.
    """
    fn = "make_optimizer"
    _shapes.check_choice(fn, "name", name, OPTIMIZERS)
    lr = _check_lr(fn, lr)
    if decay_steps is not None:
        decay_steps = _shapes.check_int(fn, "decay_steps", decay_steps, minimum=1)
    return Optimizer(name, lr, decay_steps)


_FLOAT32 = np.finfo(np.float32)


def _check_lr(fn: str, lr) -> float:
    """``lr`` as a float, if it is a finite number > 0 that float32 (the dtype of the update)
    holds without overflowing to infinity or rounding to 0."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{fn}: lr must be a number; got {type(lr).__name__} {lr!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{fn}: lr must be a finite number > 0; got {lr!r}")
    if lr > float(_FLOAT32.max) or np.float32(lr) == 0:
        raise ValueError(f"{fn}: lr must lie in {float(_FLOAT32.smallest_subnormal)!r}.."
                         f"{float(_FLOAT32.max)!r}, the positive range of float32 (the dtype of "
                         f"the update); got {lr!r}")
    return float(lr)


class TrainState(NamedTuple):
    """Everything that changes during training, as one value.

    Attributes:
      params: the trainable parameters (a pytree, float32 master copies).
      model_state: non-trainable layer state, from ``init(..., with_state=True)`` (a pytree:
        the batch norms' running averages of ``resnet``, float32 whatever the compute dtype);
        a tree without leaves (``[{}, {}, ...]``, or ``{}``) for models without state.
      opt_state: the optimizer state (its step count drives the learning-rate schedule).
      step: optimizer steps taken.
      epoch: epochs finished.
    """

    params: Any
    model_state: Any
    opt_state: Any
    step: int = 0
    epoch: int = 0


# --------------------------------------------------------------------------------------------
# The loss, the step, evaluation.


def loss_fn(params, batch, *, apply: Callable, impl: str, dtype: str = "float32",
            model_state=None, rng=None):
    """Mean softmax cross-entropy of the model on ``batch = (x, y)``:
    ``L = -(1/N) Σ_n log softmax(apply(params, x)_n)[y_n]``.

    Without ``model_state`` and ``rng`` the model is called as ``apply(params, x, impl=impl)``
    (any function of that form) and the loss is returned. With either, it runs in train mode
    (:func:`_logits`); with ``model_state``, the result is ``(loss, new_model_state)``, ready
    for ``jax.value_and_grad(..., has_aux=True)``.

    With ``dtype="bfloat16"`` (mixed precision) the model runs on bfloat16 copies of ``x`` and
    of the float32 ``params``; its logits are cast back to float32 for the softmax and the
    loss. The gradient of each cast is the reverse cast, so ``jax.grad`` of this function with
    respect to float32 params is float32. ``model_state`` is not cast: batch norm's running
    averages stay float32.
    """
    x, y = batch
    train = model_state is not None or rng is not None
    logits, new_state = _logits(params, x, apply, impl, dtype, train=train,
                                model_state=model_state, rng=rng)
    loss = cross_entropy(logits, y, impl=impl)
    return loss if model_state is None else (loss, new_state)


def _logits(params, x, apply, impl, dtype, *, train=False, model_state=None, rng=None):
    """``(logits, new_model_state)``: the model's logits, and its new state (None without one).

    - neither ``train`` nor ``model_state``: ``apply(params, x, impl=impl)``, as it is;
    - ``model_state``: :func:`jaxcnn.nn.apply_model` in train or eval mode;
    - ``train`` without ``model_state``: ``apply(params, x, impl=impl, train=True, rng=rng)``
      (a model of :mod:`jaxcnn.nn` without state, dropout on).

    With ``dtype="bfloat16"`` the model runs in bfloat16 and the logits are returned as
    float32 (``"float32"`` leaves every dtype as it is, so float64 params stay float64).
    """
    half = dtype != "float32"
    if half:
        params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
        x = x.astype(dtype)
    new_state = None
    if model_state is not None:
        logits, new_state = apply_model(apply, params, model_state, x, train=train, rng=rng,
                                        impl=impl)
    elif train:
        logits = apply(params, x, impl=impl, train=True, rng=rng)
    else:
        logits = apply(params, x, impl=impl)
    return (logits.astype(jnp.float32) if half else logits), new_state


@partial(jax.jit, static_argnames=("apply", "optimizer", "impl", "dtype"))
def train_step(params, opt_state, batch, *, apply: Callable, optimizer, impl: str,
               dtype: str = "float32", model_state=None, rng=None):
    """One optimizer step on ``batch = (x, y)``: ``(params, opt_state, loss)`` after it, or
    ``(params, opt_state, loss, model_state)`` when given ``model_state``.

    Two forms:

    - **stateless** (no ``model_state``, no ``rng``): ``apply(params, x, impl=impl)`` is
      called as it is, so any function of that form works (your own, stax-style);
    - **train mode** (a model of :mod:`jaxcnn.nn`): pass ``model_state``, the model's state
      from ``init(key, input_shape, with_state=True)``, and ``rng``, the step's PRNG key
      (needed when the model has ``Dropout``; derive a new one per step, e.g.
      :func:`step_key`). The model runs through :func:`jaxcnn.nn.apply_model` with
      ``train=True``: batch norm normalizes with the batch statistics and returns its moved
      running averages, which come back as the fourth result (not differentiated). ``rng``
      alone runs a model without state in train mode (dropout on) and returns three results.

    ``loss`` is the loss of the batch *before* the update. ``optimizer`` is an
    :class:`Optimizer` or any optax ``GradientTransformation``. ``apply``, ``optimizer``,
    ``impl`` and ``dtype`` are static: one compilation per (apply, optimizer, impl, dtype,
    batch shape, shardings, form), where jit compares ``apply`` and ``optimizer`` with ``==``.
    An :class:`Optimizer` compares by its settings; a function, or an optax transformation you
    build yourself, compares by identity, so make it once and pass the same object to every
    step (``fit`` passes its model as a value too, see ``_Model``).

    Data parallelism needs nothing here: given a batch split over a mesh's ``"data"`` axis and
    replicated params and model state (:mod:`jaxcnn.parallel`), XLA computes each device's
    share of the batch where it lies and sums the gradients across devices (the mean over the
    batch becomes an all-reduce); batch norm's statistics, means over the batch in this one
    jitted step, are those of the global batch in the same way. The updated params and model
    state come back replicated.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=model_state is not None)
    value, grads = grad_fn(params, batch, apply=apply, impl=impl, dtype=dtype,
                           model_state=model_state, rng=rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if model_state is None:
        return params, opt_state, value
    loss, model_state = value
    return params, opt_state, loss, model_state


def step_key(seed: int, step: int):
    """The PRNG key of training step ``step`` (0-based) of a run with ``seed``, the key its
    dropout masks come from: ``fold_in(fold_in(key(seed), STEP_KEYS), step)``. A function of
    (seed, step) alone, so a resumed run draws the masks of an uninterrupted one; the stream
    ``STEP_KEYS`` keeps it apart from the initial parameters' ``split(key(seed))``."""
    return jax.random.fold_in(_step_keys(seed), step)


def _step_keys(seed: int, mesh=None):
    """``fold_in(key(seed), STEP_KEYS)``, replicated on ``mesh`` (every process the same)."""
    base = jax.random.fold_in(jax.random.key(seed), STEP_KEYS)
    if mesh is None:
        return base
    return jax.random.wrap_key_data(parallel.replicate(jax.random.key_data(base), mesh))


@partial(jax.jit, static_argnames=("apply", "impl", "dtype"))
def _eval_step(params, x, y, mask, *, apply: Callable, impl: str, dtype: str,
               model_state=None):
    """Summed cross-entropy and number of correct predictions over the rows where ``mask``;
    eval mode (running averages) when given ``model_state``."""
    logits, _ = _logits(params, x, apply, impl, dtype, model_state=model_state)
    logp = log_softmax(logits, impl=impl)
    losses = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    correct = jnp.argmax(logp, axis=-1) == y
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(correct & mask)


def evaluate(params, x, y, *, apply: Callable, impl: str, batch_size: int = EVAL_BATCH_SIZE,
             dtype: str = "float32", mesh=None, model_state=None):
    """Mean loss and accuracy over *every* example of ``(x, y)``.

    Batches of ``min(batch_size, len(x))`` rows, rounded up to a multiple of the device count;
    the last partial batch is padded to that size and its padding masked out, so the evaluation
    compiles once whatever ``len(x)`` is. With a ``mesh`` (:func:`jaxcnn.parallel.data_mesh`)
    every batch is split over its devices, each process supplying its own rows, and ``params``
    (and ``model_state``) must be replicated on it. Sums stay on the devices until the end: one
    host transfer.

    ``model_state``: a model of :mod:`jaxcnn.nn` with state runs in eval mode through
    :func:`jaxcnn.nn.apply_model`, batch norm normalizing with its running averages, so each
    row's prediction depends on that row alone (the padding rows change nothing). Without it
    the model is called as ``apply(params, x, impl=impl)``.

    Returns:
      ``{"loss": float, "accuracy": float in [0, 1], "correct": int, "n": int}``.
    """
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    devices = 1 if mesh is None else mesh.devices.size
    size = -(-min(batch_size, n) // devices) * devices
    rows = slice(None) if mesh is None else parallel.process_rows(mesh, size)
    loss_sum, correct = jnp.zeros(()), jnp.zeros((), jnp.int32)
    for idx in data.batch_indices(n, size, shuffle=False, drop_last=False):
        mask = np.arange(size) < len(idx)
        idx = _pad_to(idx, size)[rows]  # padding rows read example 0, masked out
        xb, yb, mb = _put(mesh, size, x[idx], y[idx], mask[rows])
        batch_loss, batch_correct = _eval_step(params, xb, yb, mb, apply=apply, impl=impl,
                                               dtype=dtype, model_state=model_state)
        loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
    loss_sum, correct = parallel.host((loss_sum, correct))
    return {"loss": float(loss_sum) / n, "accuracy": int(correct) / n, "correct": int(correct),
            "n": n}


def _put(mesh, size, *local):
    """This process's rows of a global batch of ``size``, as arrays split over ``mesh``
    (unchanged without a mesh)."""
    if mesh is None:
        return local
    return tuple(parallel.shard(mesh, a, size) for a in local)


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``size`` rows."""
    if len(a) == size:
        return a
    return np.concatenate([a, np.zeros((size - len(a), *a.shape[1:]), a.dtype)])


# --------------------------------------------------------------------------------------------
# The fit loop.


class Preempted(Exception):
    """A multi-process run stopped after a preemption notice (SIGTERM to one of its processes),
    every process at the same step; the checkpoint of the last finished epoch is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by a signal handler such as ``train.py``'s (in a
    single process; a multi-process run stops together through :class:`Preempted`)."""


class Interrupted(KeyboardInterrupt):
    """:func:`fit` stopped by Ctrl-C (SIGINT) or :class:`Terminated` (SIGTERM).

    ``str(err)`` says what is on disk and what to do next; ``exit_code`` is 130 or 143 (128 +
    the signal's number), what the process would have returned had the signal ended it.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns: the final train state and the per-epoch records."""

    state: TrainState
    history: list
    summary: dict
    losses: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    """The training loss of every step this call ran (float64 copies of the step losses)."""

    params = property(lambda self: self.state.params)
    model_state = property(lambda self: self.state.model_state)
    opt_state = property(lambda self: self.state.opt_state)
    step = property(lambda self: self.state.step)
    epoch = property(lambda self: self.state.epoch)


class _Model(NamedTuple):
    """A model of :data:`jaxcnn.models.MODELS` as plain data: its name and number of classes.

    Called, it is the model's ``apply``. ``fit`` passes it to the jitted step and evaluation
    as their static ``apply``: equal values hash alike, so every run of the same model reuses
    the compiled step, whatever object the model constructor returns.
    """

    name: str
    num_classes: int

    def init(self, key, input_shape, *, with_state=False):
        return MODELS[self.name](self.num_classes).init(key, input_shape,
                                                         with_state=with_state)

    def __call__(self, params, x, *, impl, **mode):
        """The model's ``apply``; ``mode``: ``train``, ``rng``, ``state`` (:mod:`jaxcnn.nn`)."""
        return MODELS[self.name](self.num_classes).apply(params, x, impl=impl, **mode)


class _Run(NamedTuple):
    """What stays fixed during one call of :func:`fit`."""

    config: TrainConfig
    ds: Any                  # a jaxcnn.data.Dataset, or anything with its attributes
    mesh: Any                # the devices (jax.sharding.Mesh)
    model: _Model
    optimizer: Optimizer     # its cosine spans config.epochs epochs: the schedule of the run
    steps_per_epoch: int
    out: pathlib.Path
    checkpoint: pathlib.Path


@dataclasses.dataclass
class _OnDisk:
    """What one call of :func:`fit` has on disk, for the message of an interrupt."""

    claimed: bool = False      # it holds the output directory and may have written there
    resuming: bool = False     # it continues the checkpoint there
    saved: int | None = None   # the epoch of that checkpoint (read or written); None: none yet
    training: int = 1          # the epoch being trained (1-based)


def fit(config: TrainConfig, *, dataset=None) -> FitResult:
    """Train ``config.model`` on ``config.dataset``, evaluating and checkpointing every epoch.

    Prints one line per epoch (train loss, test loss, test accuracy, images per second), shows
    a progress bar when stderr is a terminal, and leaves the files listed in the module
    docstring in ``config.out_dir``, which it holds alone while it runs (see
    :mod:`jaxcnn._rundir`). After each epoch the checkpoint is written first, then the epoch's
    line of ``metrics.jsonl``; ``summary.json`` is written last and removed by a run that trains
    on, so after a crash at any moment ``metrics.jsonl`` lists no epoch the checkpoint lacks
    and ``summary.json``, if there, describes the checkpoint beside it.

    Runs data-parallel on ``config.devices`` devices (default: all of them, in every process of
    a multi-process run started with :func:`jaxcnn.parallel.initialize`): params and optimizer
    state replicated, every batch split over the devices, each process loading only the rows
    its own devices take. Process 0 alone holds the directory, prints and writes files; every
    process reads the checkpoint when resuming.

    Resuming (``config.resume``) continues the checkpoint's run with its own learning-rate
    schedule, so ``config.epochs`` must be the run's; a finished run is reported as finished,
    or, with a larger ``epochs``, extended (the cosine then spans the new number of epochs, and
    a note says so).

    Args:
      config: a :class:`TrainConfig`.
      dataset: an already loaded :class:`jaxcnn.data.Dataset` (or any object with its
        attributes) to use instead of loading ``config.dataset``; for tests and notebooks.

    Raises:
      ValueError: a bad configuration, labels outside ``0..num_classes-1``, a batch size larger
        than the training set or not divisible by the number of devices, more devices than
        there are, a checkpoint that is damaged, holds non-finite values or does not match the
        model, or a resume that would change the run's schedule (and the errors of
        :func:`jaxcnn.data.load_dataset`).
      FileNotFoundError: data files missing, or ``resume`` / ``eval_only`` without a checkpoint.
      FileExistsError: ``out`` holds another run's files and neither ``resume`` nor
        ``overwrite`` is set.
      RuntimeError: another run holds ``out``.
      OSError: a file could not be written; the message names it and the epoch, and says what
        is still on disk.
      FloatingPointError: a training loss, the parameters or the test loss became non-finite;
        nothing of that epoch is written and the last checkpoint is left as it was.
      Interrupted: Ctrl-C or SIGTERM (:class:`Terminated`); the message says what is on disk.
    """
    fn = "fit"
    if not isinstance(config, TrainConfig):
        raise TypeError(f"{fn}: config must be a TrainConfig; got {type(config).__name__}")
    started = time.perf_counter()
    disk = _OnDisk()
    try:
        run = _prepare(fn, config, dataset)
        state = _initial_state(run)
        if config.eval_only:
            return _eval_only(run, state)
        with contextlib.ExitStack() as held:
            _on_main_process(
                lambda: held.enter_context(_rundir.claim(
                    fn, run.out, resume=config.resume, overwrite=config.overwrite)),
                f"{fn}: taking the output directory {run.out}")
            disk.claimed, disk.resuming = True, config.resume
            return _train(run, state, disk, started)
    except Interrupted:
        raise
    except KeyboardInterrupt as err:
        raise _interrupted(config, disk, err) from err


def _prepare(fn, config: TrainConfig, dataset) -> _Run:
    """Load and check the data, pick the devices, and resolve the model and the optimizer
    (with the one learning-rate schedule of the run: a cosine over ``config.epochs`` epochs)
    before anything is compiled or written."""
    out = config.out_dir
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{fn}: the output directory {out} is an existing file, not a "
                              f"directory; choose another --out (a directory, created if "
                              f"missing)")
    ds = _load(config) if dataset is None else dataset
    _check_dataset(fn, ds, config)
    mesh = parallel.data_mesh(config.devices)
    if not config.eval_only:
        parallel.check_divisible(fn, "batch_size", config.batch_size, mesh)
    steps = data.num_batches(len(ds.train_x), config.batch_size)
    optimizer = make_optimizer(config.optimizer, config.lr, decay_steps=config.epochs * steps)
    return _Run(config, ds, mesh, _Model(config.model, ds.num_classes), optimizer, steps, out,
                out / CHECKPOINT)


def _initial_state(run: _Run) -> TrainState:
    """Fresh params and model state from ``jax.random.key(seed)``, a fresh optimizer state."""
    _, params, model_state = run.model.init(jax.random.key(run.config.seed),
                                            (-1, *run.ds.train_x.shape[1:]), with_state=True)
    return TrainState(params, model_state, run.optimizer.init(params))


def _state_of(state: TrainState):
    """The ``model_state`` to pass to :func:`train_step` and :func:`evaluate`: the state's own,
    or None for a model without state (so it runs the stateless form, as before state
    existed)."""
    return state.model_state if jax.tree_util.tree_leaves(state.model_state) else None


def _replicate(state: TrainState, mesh) -> TrainState:
    params, model_state, opt_state = parallel.replicate(
        (state.params, state.model_state, state.opt_state), mesh)
    return state._replace(params=params, model_state=model_state, opt_state=opt_state)


def _train(run: _Run, state: TrainState, disk: _OnDisk, started: float) -> FitResult:
    """With the output directory held: start or resume, then train epoch by epoch, writing the
    checkpoint and the metrics after each, and the summary at the end."""
    fn = "fit"
    history = []
    if run.config.resume:
        state, history = _resume(run, state)
        disk.saved = state.epoch
        if state.epoch == run.config.epochs:
            return _finished(run, state, history, started)
    state = _replicate(state, run.mesh)
    _on_main_process(lambda: _start(run, state, history), f"{fn}: writing {run.out / METRICS}")
    losses = []
    for _ in range(state.epoch, run.config.epochs):
        disk.training = state.epoch + 1
        state, record, epoch_losses = _train_and_evaluate(run, state)
        history.append(record)
        losses.append(epoch_losses)
        with _io.signals_deferred():  # the files and `disk` change together
            _on_main_process(lambda: _save_epoch(run, state, history),
                             f"{fn}: writing epoch {state.epoch}'s metrics and checkpoint in "
                             f"{run.out}")
            disk.saved = state.epoch
    summary = _report.summary(run.config, history, state.params, state.step,
                              time.perf_counter() - started, run.mesh)
    _on_main_process(lambda: _finish(run, state, history, summary),
                     f"{fn}: writing {run.out / SUMMARY}")
    return FitResult(state, history, summary, np.concatenate(losses) if losses else np.zeros(0))


def _start(run: _Run, state: TrainState, history) -> None:
    """Process 0, before the first step: drop results that would describe an older checkpoint,
    make ``metrics.jsonl`` list exactly the checkpoint's epochs, print the header."""
    _rundir.remove_results(run.out)
    _report.write_metrics(run.out / METRICS, history)
    print(_report.header(run.config, run.ds, state.params, state.epoch, run.mesh), flush=True)


def train_epoch(run: _Run, state: TrainState):
    """The training steps of one epoch: ``(state, step losses as float64, seconds)``.

    Each process gathers only its own rows of every batch (:func:`jaxcnn.parallel.process_rows`)
    and hands them to its devices. Losses stay on the devices and are read every
    :data:`SYNC_EVERY` steps, in one transfer: for the progress bar and to stop at the first
    non-finite loss.
    """
    config, ds = run.config, run.ds
    rows = parallel.process_rows(run.mesh, config.batch_size)
    params, opt_state, model_state = state.params, state.opt_state, _state_of(state)
    keys = _step_keys(config.seed, run.mesh)
    done, pending = [], []
    started = time.perf_counter()
    with _progress_bar(run, state.epoch) as bar:
        for i, idx in enumerate(data.batch_indices(len(ds.train_x), config.batch_size,
                                                   seed=config.seed, epoch=state.epoch)):
            batch = _put(run.mesh, config.batch_size, ds.train_x[idx[rows]],
                         ds.train_y[idx[rows]])
            step_args = dict(apply=run.model, optimizer=run.optimizer, impl=config.impl,
                             dtype=config.dtype, rng=jax.random.fold_in(keys, state.step + i))
            if model_state is None:
                params, opt_state, loss = train_step(params, opt_state, batch, **step_args)
            else:
                params, opt_state, loss, model_state = train_step(
                    params, opt_state, batch, model_state=model_state, **step_args)
            pending.append(loss)
            step = state.step + i + 1
            if parallel.preempted(step):
                raise Preempted(_preempted(run, state, step))
            if len(pending) == SYNC_EVERY or i == run.steps_per_epoch - 1:
                losses = np.asarray(parallel.host(pending), np.float64)
                _check_losses(losses, step + 1 - len(pending), run, state.epoch)
                done.append(losses)
                bar.update(len(pending))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                pending = []
    seconds = time.perf_counter() - started
    state = state._replace(params=params, opt_state=opt_state,
                           model_state=state.model_state if model_state is None else model_state,
                           step=state.step + run.steps_per_epoch, epoch=state.epoch + 1)
    return state, np.concatenate(done), seconds


def _progress_bar(run: _Run, epoch: int):
    """tqdm's bar for one epoch, shown only on a terminal and by process 0."""
    from tqdm.auto import tqdm

    return tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{run.config.epochs}",
                unit="batch", leave=False,
                disable=not (sys.stderr.isatty() and parallel.is_main_process()))


def _preempted(run: _Run, state: TrainState, step: int) -> str:
    return (f"fit: preempted at step {step} (epoch {state.epoch + 1}, batch "
            f"{step - state.step} of {run.steps_per_epoch}): a process received SIGTERM and "
            f"every process stopped there together; the last checkpoint, {run.checkpoint} "
            f"(epoch {state.epoch}), is left as it was")


def _check_losses(losses, first_step, run: _Run, epoch: int):
    """Raise FloatingPointError naming the first step whose loss is not finite."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if not bad.size:
        return
    step = first_step + int(bad[0])
    batch = step - epoch * run.steps_per_epoch
    raise FloatingPointError(
        f"fit: the training loss is {losses[bad[0]]} at step {step} (epoch {epoch + 1}, batch "
        f"{batch} of {run.steps_per_epoch}); training stopped and {_kept(run, epoch)}. Check "
        f"the data for NaN or infinite values, or lower the learning rate (lr={run.config.lr})"
    )


def _kept(run: _Run, epoch: int) -> str:
    """What is on disk when epoch ``epoch + 1`` fails before its checkpoint is written."""
    if epoch > 0 and run.checkpoint.is_file():
        return f"the last good checkpoint, {run.checkpoint} (epoch {epoch}), is left as it was"
    return "no checkpoint had been written yet"


def _train_and_evaluate(run: _Run, state: TrainState):
    """One epoch of training, then the test set: ``(state, the epoch's record, losses)``."""
    state, losses, seconds = train_epoch(run, state)
    test = evaluate(state.params, run.ds.test_x, run.ds.test_y, apply=run.model,
                    impl=run.config.impl, dtype=run.config.dtype, mesh=run.mesh,
                    model_state=_state_of(state))
    _check_state(run, state, test)
    record = {
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": float(losses.mean()),
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "images_per_second": run.steps_per_epoch * run.config.batch_size / seconds,
        "train_seconds": seconds,
    }
    return state, record, losses


def _check_state(run: _Run, state: TrainState, test) -> None:
    """Raise FloatingPointError, before anything of the epoch is written, when its last steps
    left non-finite values in the state, or a non-finite test loss: the losses checked during
    the epoch are those *before* each update, so the last update is checked here."""
    named = checkpoint.named_leaves(state)
    finite, largest = parallel.host(_finite_leaves([leaf for _, leaf in named], state.params))
    epoch, kept, lr = state.epoch, _kept(run, state.epoch - 1), run.config.lr
    if not all(finite):
        name = named[list(finite).index(False)][0]
        raise FloatingPointError(
            f"fit: after epoch {epoch} (step {state.step}) {name} holds NaN or infinite values, "
            f"although every training loss of the epoch was finite: an update at the end of the "
            f"epoch blew up. Training stopped and {kept}. Lower the learning rate (lr={lr})")
    if not math.isfinite(test["loss"]):
        raise FloatingPointError(
            f"fit: after epoch {epoch} (step {state.step}) the test loss is {test['loss']} "
            f"although the parameters are finite (the largest |parameter| is {largest:.3g}): "
            f"either the last updates made them too large or the test data hold NaN or infinite "
            f"values. Training stopped and {kept}. Check the data, or lower the learning rate "
            f"(lr={lr})")


@jax.jit
def _finite_leaves(leaves, params):
    """Whether each leaf is free of NaN and infinities, and the largest |parameter|."""
    finite = [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]
    largest = jnp.max(jnp.stack([jnp.max(jnp.abs(p)).astype(jnp.float32)
                                 for p in jax.tree_util.tree_leaves(params)]))
    return finite, largest


def _save_epoch(run: _Run, state: TrainState, history) -> None:
    """Process 0, after each epoch: the checkpoint first, then the epoch's line of
    ``metrics.jsonl`` (so it never lists an epoch that no checkpoint has), then the console
    line. A failed write names the file, the epoch and what is still on disk."""
    epoch, metrics = state.epoch, run.out / METRICS
    meta = checkpoint.run_meta(run.config.to_json(), state, history)
    _write(run.checkpoint, epoch, _kept(run, epoch - 1),
           lambda: save_checkpoint(run.checkpoint, state, meta))
    _write(metrics, epoch, f"the checkpoint, {run.checkpoint} (epoch {epoch}), is complete; "
                           f"--resume rewrites {METRICS} from it",
           lambda: _report.append_metrics(metrics, history[-1]))
    print(_report.epoch_line(history[-1], run.config.epochs), flush=True)


def _write(what, epoch: int, kept: str, write: Callable[[], None]) -> None:
    """``write()``; an OSError is raised again naming ``what`` (a path), the epoch, and what
    is ``kept`` on disk."""
    try:
        write()
    except OSError as err:
        raise OSError(f"fit: could not write {what} after epoch {epoch}: {err}; training "
                      f"stopped and {kept}") from err


def _finish(run: _Run, state: TrainState, history, summary) -> None:
    """Process 0, at the end: summary.json, the plots, the final console line."""
    _write_results(run, state, history, summary)
    if history:
        print(_report.final_line(history[-1], summary["wall_time_seconds"], run.out),
              flush=True)


def _write_results(run: _Run, state: TrainState, history, summary) -> None:
    """Process 0, after the last epoch: summary.json, then the plots."""
    done = f"the checkpoint, {run.checkpoint} (epoch {state.epoch}),"
    _write(run.out / SUMMARY, state.epoch, f"{done} is complete; run again with --resume to "
                                           f"write the summary",
           lambda: _report.write_summary(run.out / SUMMARY, summary))
    _write(f"the plots in {run.out}", state.epoch, f"{done} and {SUMMARY} are complete; only "
                                                   f"the plots are missing",
           lambda: _report.save_plots(run.out, history, parallel.host(state.params)))


def _finished(run: _Run, state: TrainState, history, started: float) -> FitResult:
    """``resume`` of a run that has trained all its epochs: say so; and if its summary is
    missing (a kill or a failed write after the last checkpoint), write it and
    ``metrics.jsonl`` from the checkpoint."""
    summary = _report.summary(run.config, history, state.params, state.step,
                              time.perf_counter() - started, run.mesh)

    def report():
        wrote = ""
        if not (run.out / SUMMARY).is_file():
            _write(run.out / METRICS, state.epoch, f"the checkpoint, {run.checkpoint} (epoch "
                   f"{state.epoch}), is complete", lambda: _report.write_metrics(
                       run.out / METRICS, history))
            _write_results(run, state, history, summary)
            wrote = f"its {METRICS} and {SUMMARY} are written now"
        print(_report.finished_line(run.out, state, wrote), flush=True)

    _on_main_process(report, f"fit: writing {run.out / SUMMARY}")
    return FitResult(state, history, summary)


# --------------------------------------------------------------------------------------------
# Resuming and evaluating a checkpoint.


def _resume(run: _Run, state: TrainState):
    """The checkpoint's state and history, once its schedule allows this resume."""
    state, meta = load_everywhere(run.checkpoint, state)
    saved = _saved_config(run.checkpoint, state, meta)
    extension = _check_schedule(run, state, saved)
    if parallel.is_main_process():
        for note in (_report.settings_note(run.config.to_json(), meta["config"],
                                           TrainConfig().to_json()), extension):
            if note:
                print(note, flush=True)
    return state, meta["history"]


def _check_schedule(run: _Run, state: TrainState, saved: TrainConfig) -> str | None:
    """Refuse a resume that would change an unfinished run's learning-rate schedule or go past
    ``config.epochs``; for a finished run resumed to more epochs, the note that says so."""
    fn, epochs, done, planned = "fit", run.config.epochs, state.epoch, saved.epochs
    if done > epochs:
        raise ValueError(
            f"{fn}: the checkpoint {run.checkpoint} is at epoch {done}, past --epochs {epochs}; "
            f"resume it with --epochs {planned} (its own), or evaluate it with --eval-only")
    if done < planned and epochs != planned:
        raise ValueError(
            f"{fn}: the run in {run.out} was started for {planned} epochs and stopped after "
            f"epoch {done}; resuming it with --epochs {epochs} would change its cosine "
            f"learning-rate schedule, which spans all {planned} epochs, so the result would "
            f"match no uninterrupted run. Resume it with --epochs {planned}; to train longer on "
            f"purpose, let it finish, then resume the finished run with a larger --epochs")
    if done == planned < epochs:
        return _report.extension_note(planned, epochs, state.step,
                                      run.optimizer.learning_rate(state.step))
    return None


def _saved_config(path, state: TrainState, meta: dict) -> TrainConfig:
    """The configuration of the run that wrote a checkpoint, its run fields checked
    (:func:`jaxcnn.checkpoint.check_run`) and the configuration itself made a
    :class:`TrainConfig`; errors name the file."""
    fn, defaults = "fit", TrainConfig().to_json()
    fields = checkpoint.check_run(fn, path, state, meta)
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        raise checkpoint.malformed(fn, path, f"field 'config' has an unknown setting "
                                             f"{unknown[0]!r}")
    try:
        saved = TrainConfig(**{**defaults, **fields})  # a newer setting had its default
    except (TypeError, ValueError) as err:
        raise checkpoint.malformed(fn, path, f"field 'config' is not valid ({err})") from err
    if state.epoch > saved.epochs:
        raise checkpoint.malformed(fn, path, f"field 'epoch' ({state.epoch}) is past the run's "
                                             f"own epochs ({saved.epochs})")
    checkpoint.check_field(fn, path, meta["rng"], "seed", lambda v: v == saved.seed,
                           f"the config's seed ({saved.seed})", "rng")
    return saved


def _eval_only(run: _Run, state: TrainState) -> FitResult:
    """Evaluate the checkpoint in ``config.out`` on the test set and print the result."""
    state, meta = load_everywhere(run.checkpoint, state)
    saved = _saved_config(run.checkpoint, state, meta)
    params, model_state = parallel.replicate((state.params, state.model_state), run.mesh)
    state = state._replace(params=params, model_state=model_state)
    test = evaluate(state.params, run.ds.test_x, run.ds.test_y, apply=run.model,
                    impl=run.config.impl, dtype=run.config.dtype, mesh=run.mesh,
                    model_state=_state_of(state))
    if parallel.is_main_process():
        note = _report.test_set_note(run.config, saved)
        print(*([note] if note else []), _report.eval_line(run.checkpoint, state, test),
              sep="\n", flush=True)
    summary = {"test_loss": test["loss"], "test_accuracy": test["accuracy"],
               "checkpoint": str(run.checkpoint)}
    return FitResult(state, meta["history"], summary)


def _interrupted(config: TrainConfig, disk: _OnDisk, err: KeyboardInterrupt) -> Interrupted:
    """The :class:`Interrupted` error for Ctrl-C or SIGTERM, saying what is true on disk."""
    sigterm = isinstance(err, Terminated)
    what = "terminated (SIGTERM)" if sigterm else "interrupted (Ctrl-C)"
    path = config.out_dir / CHECKPOINT
    where = (f"after epoch {disk.saved} of {config.epochs}" if disk.saved == disk.training else
             f"in epoch {disk.training} of {config.epochs}")
    if not disk.claimed:
        text = f"{what} before anything was written"
    elif disk.saved is None and disk.resuming:
        text = (f"{what} before training resumed; the checkpoint {path} is left as it was: "
                f"continue with the same options and --resume")
    elif disk.saved is None:
        text = (f"{what} {where}, before any epoch finished: no checkpoint was written, so "
                f"there is nothing to resume; start the run again")
    elif disk.saved >= config.epochs:
        text = (f"{what} after the last epoch: training finished and the checkpoint, {path} "
                f"(epoch {disk.saved}), is complete; run again with --resume to write the "
                f"summary")
    else:
        redone = "" if disk.saved == disk.training else " (the steps since that epoch are redone)"
        text = (f"{what} {where}; the last checkpoint, {path} (epoch {disk.saved}), is left as "
                f"it was: continue with the same options and --resume{redone}")
    return Interrupted(f"fit: {text}", 143 if sigterm else 130)


# --------------------------------------------------------------------------------------------
# Helpers: multi-process writes, the dataset.


def _on_main_process(work: Callable[[], None], what: str) -> None:
    """Run ``work`` (printing, writing files) in process 0 only; then every process learns
    whether it worked (:func:`jaxcnn.parallel.agree`), so that when process 0 cannot write,
    every process stops instead of the others waiting for it in the next epoch's all-reduce."""
    error = None
    if parallel.is_main_process():
        try:
            work()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others know
            error = err
    parallel.agree(error is None, what)
    if error is not None:
        raise error


def _load(config: TrainConfig):
    """Load the configured dataset (its errors propagate unchanged)."""
    sizes = {k: v for k, v in (("n_train", config.n_train), ("n_test", config.n_test))
             if v is not None}
    return data.load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed, **sizes)


def _check_dataset(fn, ds, config: TrainConfig):
    """Labels in range and a batch size that fits, before anything is compiled."""
    num_classes = ds.num_classes
    for split in ("train", "test"):
        y = np.asarray(getattr(ds, f"{split}_y"))
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"{fn}: {split} labels must be integers; got dtype {y.dtype}")
        _shapes.check_label_values(fn, f"{split} labels", y, num_classes,
                                   context=f" (the dataset has {num_classes} classes)")
    n_train = len(ds.train_x)
    if config.batch_size > n_train:
        raise ValueError(
            f"{fn}: batch_size ({config.batch_size}) must be <= the number of training "
            f"examples ({n_train}) of {config.dataset}"
        )
