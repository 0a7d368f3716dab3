"""Training: a plain-data config, the train state, the loss, one jitted step, evaluation, ``fit``.

The pieces, each with one job::

    config = TrainConfig(model="lenet5", epochs=3)   # plain data, checked when made
    result = fit(config)                             # load data, train, evaluate, save

    loss_fn(params, batch, apply=..., impl=...)      # mean cross-entropy of one batch
    train_step(params, opt_state, batch, apply=..., optimizer=..., impl=...)
                                                     # -> (params, opt_state, loss), jitted
    evaluate(params, x, y, apply=..., impl=...)      # -> {"loss", "accuracy"} over all of x

``fit`` reads like flax's MNIST example: :func:`train_epoch` runs the steps of one epoch on a
:class:`TrainState`, :func:`evaluate` measures it, and the loop saves a checkpoint and a
metrics record after each epoch. The checkpoint format lives in :mod:`jaxcnn.checkpoint`, the
console lines, ``metrics.jsonl``, ``summary.json`` and plots in :mod:`jaxcnn._report`.

What a run leaves in ``config.out`` (default ``runs/<dataset>-<model>-<impl>-seed<seed>``):

- ``metrics.jsonl``: one JSON record per epoch (train loss, test loss and accuracy, images/s);
- ``summary.json``: final metrics, configuration, wall time, versions, backend;
- ``checkpoint.npz``: params, model state, optimizer state, step, epoch, seed and
  configuration, replaced atomically after every epoch (see :mod:`jaxcnn.checkpoint`);
- ``curves.png`` and ``filters.png`` when matplotlib is installed (the ``plot`` extra).

Randomness: the initial parameters come from ``jax.random.key(seed)`` and the batch order of
epoch ``e`` from ``numpy.random.default_rng([seed, e])`` (:func:`jaxcnn.data.batches`); there
is no other random draw. So (seed, epoch) is the whole RNG state, a checkpoint stores both, and
a resumed run on the same machine ends with exactly the parameters of an uninterrupted one.
"""

from __future__ import annotations

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

from . import __version__, _report, _shapes, checkpoint, data, parallel
from ._shapes import IMPLS
from .activations import log_softmax
from .checkpoint import load_everywhere, save_checkpoint
from .losses import cross_entropy
from .models import MODELS

OPTIMIZERS = ("adam", "sgd", "momentum")
DTYPES = ("float32", "bfloat16")  # the compute dtype; params and optimizer state stay float32
MOMENTUM = 0.9  # the "momentum" optimizer: SGD with heavy-ball momentum 0.9
EVAL_BATCH_SIZE = 1000  # evaluation batch (the last one is padded, so it compiles once)
SYNC_EVERY = 25  # training steps between two reads of the losses (progress bar, NaN check)
CHECKPOINT, METRICS, SUMMARY = checkpoint.FILENAME, _report.METRICS, _report.SUMMARY  # in out


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
      lr: learning rate, > 0.
      optimizer: one of :data:`OPTIMIZERS`.
      seed: seed of the initial parameters, the batch order and the synthetic data.
      out: output directory; None: ``runs/<dataset>-<model>-<impl>-seed<seed>``.
      resume: continue from the checkpoint in ``out``.
      eval_only: only evaluate the checkpoint in ``out`` on the test set.
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
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    optimizer: str = "adam"
    seed: int = 0
    out: str | None = None
    resume: bool = False
    eval_only: bool = False
    n_train: int | None = None
    n_test: int | None = None
    devices: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        fn = "TrainConfig"
        _shapes.check_choice(fn, "dataset", self.dataset, data.DATASETS)
        _shapes.check_choice(fn, "model", self.model, tuple(MODELS))
        _shapes.check_choice(fn, "impl", self.impl, IMPLS)
        _shapes.check_choice(fn, "optimizer", self.optimizer, OPTIMIZERS)
        _shapes.check_choice(fn, "dtype", self.dtype, DTYPES)
        _shapes.check_int(fn, "epochs", self.epochs, minimum=1)
        _shapes.check_int(fn, "batch_size", self.batch_size, minimum=1)
        _shapes.check_int(fn, "seed", self.seed, minimum=0)
        for name in ("n_train", "n_test", "devices"):
            if getattr(self, name) is not None:
                _shapes.check_int(fn, name, getattr(self, name), minimum=1)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)):
            raise TypeError(f"{fn}: lr must be a number; got {type(self.lr).__name__} {self.lr!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{fn}: lr must be a finite number > 0; got {self.lr!r}")
        for name in ("data_dir", "out"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{fn}: {name} must be a path or None; got {value!r}")
        if self.resume and self.eval_only:
            raise ValueError(f"{fn}: resume and eval_only exclude each other; got both True")

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

    def transform(self) -> optax.GradientTransformation:
        lr = self.lr
        if self.decay_steps is not None:
            lr = optax.cosine_decay_schedule(self.lr, self.decay_steps)
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
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f"{fn}: lr must be a number > 0; got {lr!r}")
    if decay_steps is not None:
        decay_steps = _shapes.check_int(fn, "decay_steps", decay_steps, minimum=1)
    return Optimizer(name, float(lr), decay_steps)


class TrainState(NamedTuple):
    """Everything that changes during training, as one value.

    Attributes:
      params: the trainable parameters (a pytree, float32 master copies).
      model_state: non-trainable layer state (a pytree, e.g. batch norm running statistics);
        ``{}`` for models without any, which is every model of :data:`jaxcnn.models.MODELS`
        today.
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


def loss_fn(params, batch, *, apply: Callable, impl: str, dtype: str = "float32"):
    """Mean softmax cross-entropy of the model on ``batch = (x, y)``:
    ``L = -(1/N) Σ_n log softmax(apply(params, x)_n)[y_n]``.

    With ``dtype="bfloat16"`` (mixed precision) the model runs on bfloat16 copies of ``x`` and
    of the float32 ``params``; its logits are cast back to float32 for the softmax and the
    loss. The gradient of each cast is the reverse cast, so ``jax.grad`` of this function with
    respect to float32 params is float32.
    """
    x, y = batch
    return cross_entropy(_logits(params, x, apply, impl, dtype), y, impl=impl)


def _logits(params, x, apply, impl, dtype):
    """The model's logits; with ``dtype="bfloat16"`` computed in bfloat16 and returned as
    float32 (``"float32"`` leaves every dtype as it is, so float64 params stay float64)."""
    if dtype == "float32":
        return apply(params, x, impl=impl)
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    return apply(params, x.astype(dtype), impl=impl).astype(jnp.float32)


@partial(jax.jit, static_argnames=("apply", "optimizer", "impl", "dtype"))
def train_step(params, opt_state, batch, *, apply: Callable, optimizer, impl: str,
               dtype: str = "float32"):
    """One optimizer step on ``batch = (x, y)``: ``(params, opt_state, loss)`` after it.

    ``loss`` is the loss of the batch *before* the update. ``optimizer`` is an
    :class:`Optimizer` or any optax ``GradientTransformation``. ``apply``, ``optimizer``,
    ``impl`` and ``dtype`` are static: one compilation per (apply, optimizer, impl, dtype,
    batch shape, shardings), where jit compares ``apply`` and ``optimizer`` with ``==``. An
    :class:`Optimizer` compares by its settings; a function, or an optax transformation you
    build yourself, compares by identity, so make it once and pass the same object to every
    step (``fit`` passes its model as a value too, see ``_Model``).

    Data parallelism needs nothing here: given a batch split over a mesh's ``"data"`` axis and
    replicated params (:mod:`jaxcnn.parallel`), XLA computes each device's share of the batch
    where it lies and sums the gradients across devices (the mean over the batch becomes an
    all-reduce); the updated params come back replicated.
    """
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, apply=apply, impl=impl,
                                              dtype=dtype)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@partial(jax.jit, static_argnames=("apply", "impl", "dtype"))
def _eval_step(params, x, y, mask, *, apply: Callable, impl: str, dtype: str):
    """Summed cross-entropy and number of correct predictions over the rows where ``mask``."""
    logp = log_softmax(_logits(params, x, apply, impl, dtype), impl=impl)
    losses = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    correct = jnp.argmax(logp, axis=-1) == y
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(correct & mask)


def evaluate(params, x, y, *, apply: Callable, impl: str, batch_size: int = EVAL_BATCH_SIZE,
             dtype: str = "float32", mesh=None):
    """Mean loss and accuracy over *every* example of ``(x, y)``.

    Batches of ``min(batch_size, len(x))`` rows, rounded up to a multiple of the device count;
    the last partial batch is padded to that size and its padding masked out, so the evaluation
    compiles once whatever ``len(x)`` is. With a ``mesh`` (:func:`jaxcnn.parallel.data_mesh`)
    every batch is split over its devices, each process supplying its own rows, and ``params``
    must be replicated on it. Sums stay on the devices until the end: one host transfer.

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
                                               dtype=dtype)
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

    def init(self, key, input_shape):
        return MODELS[self.name](self.num_classes).init(key, input_shape)

    def __call__(self, params, x, *, impl):
        return MODELS[self.name](self.num_classes).apply(params, x, impl=impl)


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


def fit(config: TrainConfig, *, dataset=None) -> FitResult:
    """Train ``config.model`` on ``config.dataset``, evaluating and checkpointing every epoch.

    Prints one line per epoch (train loss, test loss, test accuracy, images per second), shows
    a progress bar when stderr is a terminal, and leaves the files listed in the module
    docstring in ``config.out_dir``.

    Runs data-parallel on ``config.devices`` devices (default: all of them, in every process of
    a multi-process run started with :func:`jaxcnn.parallel.initialize`): params and optimizer
    state replicated, every batch split over the devices, each process loading only the rows
    its own devices take. Process 0 alone prints and writes files; every process reads the
    checkpoint when resuming.

    Args:
      config: a :class:`TrainConfig`.
      dataset: an already loaded :class:`jaxcnn.data.Dataset` (or any object with its
        attributes) to use instead of loading ``config.dataset``; for tests and notebooks.

    Raises:
      ValueError: a bad configuration, labels outside ``0..num_classes-1``, a batch size larger
        than the training set or not divisible by the number of devices, more devices than
        there are, a checkpoint that does not match the model (and the errors of
        :func:`jaxcnn.data.load_dataset`).
      FileNotFoundError: data files missing, or ``resume`` / ``eval_only`` without a checkpoint.
      FloatingPointError: the training loss became non-finite; the message names the step, and
        the last checkpoint (from the epoch before) is left as it was.
    """
    fn = "fit"
    if not isinstance(config, TrainConfig):
        raise TypeError(f"{fn}: config must be a TrainConfig; got {type(config).__name__}")
    started = time.perf_counter()
    run = _prepare(fn, config, dataset)
    state = _initial_state(run)
    if config.eval_only:
        return _eval_only(run, state)
    history = []
    if config.resume:
        state, history = _resume(run, state)
    state = _replicate(state, run.mesh)
    _on_main_process(lambda: _start(run, state, history), f"{fn}: creating {run.out / METRICS}")
    losses = []
    for _ in range(state.epoch, config.epochs):
        state, record, epoch_losses = _train_and_evaluate(run, state)
        history.append(record)
        losses.append(epoch_losses)
        _on_main_process(lambda: _save_epoch(run, state, history),
                         f"{fn}: writing epoch {state.epoch}'s metrics and checkpoint in "
                         f"{run.out}")
    summary = _report.summary(config, history, state.params, state.step,
                              time.perf_counter() - started, run.mesh)
    _on_main_process(lambda: _finish(run, state, history, summary),
                     f"{fn}: writing {run.out / SUMMARY}")
    return FitResult(state, history, summary, np.concatenate(losses) if losses else np.zeros(0))


def _prepare(fn, config: TrainConfig, dataset) -> _Run:
    """Load and check the data, pick the devices, and resolve the model and the optimizer
    (with the one learning-rate schedule of the run) before anything is compiled or written."""
    ds = _load(config) if dataset is None else dataset
    _check_dataset(fn, ds, config)
    mesh = parallel.data_mesh(config.devices)
    if not config.eval_only:
        parallel.check_divisible(fn, "batch_size", config.batch_size, mesh)
    steps = data.num_batches(len(ds.train_x), config.batch_size)
    optimizer = make_optimizer(config.optimizer, float(config.lr),
                               decay_steps=config.epochs * steps)
    out = config.out_dir
    return _Run(config, ds, mesh, _Model(config.model, ds.num_classes), optimizer, steps, out,
                out / CHECKPOINT)


def _initial_state(run: _Run) -> TrainState:
    """Fresh params from ``jax.random.key(seed)``, no model state, a fresh optimizer state."""
    _, params = run.model.init(jax.random.key(run.config.seed),
                               (-1, *run.ds.train_x.shape[1:]))
    return TrainState(params, {}, run.optimizer.init(params))


def _replicate(state: TrainState, mesh) -> TrainState:
    params, model_state, opt_state = parallel.replicate(
        (state.params, state.model_state, state.opt_state), mesh)
    return state._replace(params=params, model_state=model_state, opt_state=opt_state)


def _resume(run: _Run, state: TrainState):
    """The checkpoint's state and history; say which settings differ from its."""
    state, meta = load_everywhere(run.checkpoint, state)
    if parallel.is_main_process():
        _note_config_changes(run.config, meta["config"])
    return state, meta["history"]


def _start(run: _Run, state: TrainState, history) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
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
    params, opt_state = state.params, state.opt_state
    done, pending = [], []
    started = time.perf_counter()
    with _progress_bar(run, state.epoch) as bar:
        for i, idx in enumerate(data.batch_indices(len(ds.train_x), config.batch_size,
                                                   seed=config.seed, epoch=state.epoch)):
            batch = _put(run.mesh, config.batch_size, ds.train_x[idx[rows]],
                         ds.train_y[idx[rows]])
            params, opt_state, loss = train_step(params, opt_state, batch, apply=run.model,
                                                 optimizer=run.optimizer, impl=config.impl,
                                                 dtype=config.dtype)
            pending.append(loss)
            step = state.step + i + 1
            if parallel.preempted(step):
                raise Preempted(_preempted(run, state, step))
            if len(pending) == SYNC_EVERY or i == run.steps_per_epoch - 1:
                losses = np.asarray(parallel.host(pending), np.float64)
                _check_finite(losses, step + 1 - len(pending), run, state.epoch)
                done.append(losses)
                bar.update(len(pending))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                pending = []
    seconds = time.perf_counter() - started
    state = state._replace(params=params, opt_state=opt_state,
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


def _check_finite(losses, first_step, run: _Run, epoch: int):
    """Raise FloatingPointError naming the first step whose loss is not finite."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if not bad.size:
        return
    step = first_step + int(bad[0])
    batch = step - epoch * run.steps_per_epoch
    kept = (f"the last good checkpoint, {run.checkpoint} (epoch {epoch}), is left as it was"
            if epoch > 0 and run.checkpoint.exists() else "no checkpoint had been written yet")
    raise FloatingPointError(
        f"fit: the training loss is {losses[bad[0]]} at step {step} (epoch {epoch + 1}, batch "
        f"{batch} of {run.steps_per_epoch}); training stopped and {kept}. Check the data for "
        f"NaN or infinite values, or lower the learning rate (lr={run.config.lr})"
    )


def _train_and_evaluate(run: _Run, state: TrainState):
    """One epoch of training, then the test set: ``(state, the epoch's record, losses)``."""
    state, losses, seconds = train_epoch(run, state)
    test = evaluate(state.params, run.ds.test_x, run.ds.test_y, apply=run.model,
                    impl=run.config.impl, dtype=run.config.dtype, mesh=run.mesh)
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


def _save_epoch(run: _Run, state: TrainState, history) -> None:
    """Process 0, after each epoch: the metrics record, the checkpoint, the console line."""
    _report.append_metrics(run.out / METRICS, history[-1])
    save_checkpoint(run.checkpoint, state, _run_meta(run.config, state, history))
    print(_report.epoch_line(history[-1], run.config.epochs), flush=True)


def _run_meta(config: TrainConfig, state: TrainState, history) -> dict:
    """What a checkpoint of ``fit`` holds besides the state: how to continue the run."""
    return {
        "rng": {"seed": config.seed, "next_epoch": state.epoch,
                "note": "params from jax.random.key(seed); batch order of epoch e from "
                        "numpy.random.default_rng([seed, e])"},
        "config": config.to_json(),
        "history": history,
        "jaxcnn_version": __version__,
    }


def _finish(run: _Run, state: TrainState, history, summary) -> None:
    """Process 0, at the end: summary.json, the plots, the final console line."""
    _report.write_summary(run.out / SUMMARY, summary)
    _report.save_plots(run.out, history, parallel.host(state.params))
    if history:
        print(_report.final_line(history[-1], summary["wall_time_seconds"], run.out),
              flush=True)


def _eval_only(run: _Run, state: TrainState) -> FitResult:
    """Evaluate the checkpoint in ``config.out`` on the test set and print the result."""
    state, meta = load_everywhere(run.checkpoint, state)
    state = state._replace(params=parallel.replicate(state.params, run.mesh))
    test = evaluate(state.params, run.ds.test_x, run.ds.test_y, apply=run.model,
                    impl=run.config.impl, dtype=run.config.dtype, mesh=run.mesh)
    if parallel.is_main_process():
        print(_report.eval_line(run.checkpoint, state, test), flush=True)
    summary = {"test_loss": test["loss"], "test_accuracy": test["accuracy"],
               "checkpoint": str(run.checkpoint)}
    return FitResult(state, meta["history"], summary)


def _note_config_changes(config: TrainConfig, saved: dict):
    """Say which settings differ from the checkpoint's (a changed seed, batch size or learning
    rate makes the resumed run differ from an uninterrupted one)."""
    ignored = {"epochs", "resume", "eval_only", "out", "devices"}  # devices: rounding only
    current, defaults = config.to_json(), TrainConfig().to_json()
    saved = {**defaults, **saved}  # a setting newer than the checkpoint had its default
    changed = [f"{k} {saved[k]!r} -> {current[k]!r}" for k in current
               if k not in ignored and saved[k] != current[k]]
    if changed:
        print(f"note: resuming with settings that differ from the checkpoint's: "
              f"{', '.join(changed)}", flush=True)


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
        bad = np.flatnonzero((y < 0) | (y >= num_classes))
        if bad.size:
            raise ValueError(
                f"{fn}: {split} labels must lie in 0..{num_classes - 1} (the dataset has "
                f"{num_classes} classes); got {y[bad[0]]} at index {bad[0]} ({bad.size} such "
                f"labels)"
            )
    n_train = len(ds.train_x)
    if config.batch_size > n_train:
        raise ValueError(
            f"{fn}: batch_size ({config.batch_size}) must be <= the number of training "
            f"examples ({n_train}) of {config.dataset}"
        )
