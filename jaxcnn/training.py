"""Training: a plain-data config, the loss, one jitted step, evaluation, checkpoints, ``fit``.

The pieces, each with one job::

    config = TrainConfig(model="lenet5", epochs=3)   # plain data, checked when made
    result = fit(config)                             # load data, train, evaluate, save

    loss_fn(params, batch, apply=..., impl=...)      # mean cross-entropy of one batch
    train_step(params, opt_state, batch, apply=..., optimizer=..., impl=...)
                                                     # -> (params, opt_state, loss), jitted
    evaluate(params, x, y, apply=..., impl=...)      # -> {"loss", "accuracy"} over all of x

What a run leaves in ``config.out`` (default ``runs/<dataset>-<model>-<impl>-seed<seed>``):

- ``metrics.jsonl``: one JSON record per epoch (train loss, test loss and accuracy, images/s);
- ``summary.json``: final metrics, configuration, wall time, versions, backend;
- ``checkpoint.npz``: params, optimizer state, step, epoch, seed and configuration, replaced
  atomically after every epoch (see :func:`save_checkpoint`);
- ``curves.png`` and ``filters.png`` when matplotlib is installed (the ``plot`` extra).

Randomness: the initial parameters come from ``jax.random.key(seed)`` and the batch order of
epoch ``e`` from ``numpy.random.default_rng([seed, e])`` (:func:`jaxcnn.data.batches`); there
is no other random draw. So (seed, epoch) is the whole RNG state, a checkpoint stores both, and
a resumed run on the same machine ends with exactly the parameters of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import sys
import time
import zipfile
import zlib
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import __version__, _io, _shapes, data, parallel
from ._shapes import IMPLS
from .activations import log_softmax
from .losses import cross_entropy
from .models import MODELS
from .nn import count_params

OPTIMIZERS = ("adam", "sgd", "momentum")
DTYPES = ("float32", "bfloat16")  # the compute dtype; params and optimizer state stay float32
MOMENTUM = 0.9  # the "momentum" optimizer: SGD with heavy-ball momentum 0.9
CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVAL_BATCH_SIZE = 1000  # evaluation batch (the last one is padded, so it compiles once)
SYNC_EVERY = 25  # training steps between two reads of the losses (progress bar, NaN check)
_META_KEY = "__meta__"  # the checkpoint entry holding the JSON metadata
_FORMAT = "jaxcnn-checkpoint-v1"
PLOTS_SKIPPED = "plots skipped: matplotlib not installed (pip install jaxcnn[plot])"


# --------------------------------------------------------------------------------------------
# Configuration.


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


@functools.cache
def make_optimizer(name: str, lr: float, decay_steps: int | None = None
                   ) -> optax.GradientTransformation:
    """``"adam"`` (optax defaults), ``"sgd"`` or ``"momentum"`` (SGD, heavy ball 0.9).

    With ``decay_steps`` the learning rate follows a cosine from ``lr`` down to 0 over that many
    steps (``fit`` uses the whole run), so the last epoch settles instead of ending on a
    full-size step; its step count lives in the optimizer state, so a resumed run continues the
    same schedule. Cached: the same arguments give the same object, so the jitted step (which
    takes the optimizer as a static argument) compiles once per process.
    """
    fn = "make_optimizer"
    _shapes.check_choice(fn, "name", name, OPTIMIZERS)
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f"{fn}: lr must be a number > 0; got {lr!r}")
    if decay_steps is not None:
        _shapes.check_int(fn, "decay_steps", decay_steps, minimum=1)
        lr = optax.cosine_decay_schedule(lr, decay_steps)
    if name == "adam":
        return optax.adam(lr)
    if name == "sgd":
        return optax.sgd(lr)
    return optax.sgd(lr, momentum=MOMENTUM)


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
def train_step(params, opt_state, batch, *, apply: Callable,
               optimizer: optax.GradientTransformation, impl: str, dtype: str = "float32"):
    """One optimizer step on ``batch = (x, y)``: ``(params, opt_state, loss)`` after it.

    ``loss`` is the loss of the batch *before* the update. ``apply``, ``optimizer``, ``impl``
    and ``dtype`` are static: one compilation per (model, optimizer, impl, dtype, batch shape,
    shardings).

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
# Checkpoints.


def save_checkpoint(path, params, opt_state, meta: dict) -> None:
    """Write ``params``, ``opt_state`` and the JSON ``meta`` to ``path``, atomically.

    Format: ``numpy.savez`` with one entry per leaf of ``{"params": params, "opt_state":
    opt_state}``, named by its ``jax.tree_util.keystr`` path (``['params'][0]['kernel']``),
    plus ``__meta__``, a JSON string. The file is written to a temporary file in the same
    directory, flushed and fsynced, renamed over ``path`` with ``os.replace``, and the directory
    is fsynced: a kill at any moment leaves either the old or the new checkpoint, complete.
    """
    named = _named_leaves(params, opt_state)
    values = parallel.host([leaf for _, leaf in named])  # one transfer, this process's copies
    arrays = {name: np.asarray(value) for (name, _), value in zip(named, values)}
    arrays[_META_KEY] = np.array(json.dumps({"format": _FORMAT, **meta}))
    _io.atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path, params, opt_state):
    """Read a checkpoint into the tree structure of ``params`` and ``opt_state``.

    ``params`` and ``opt_state`` are templates (a freshly initialised model and optimizer
    state): the result has their structure, with every leaf read from the file.

    Returns:
      ``(params, opt_state, meta)``.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: not a jaxcnn checkpoint, or one that does not match the templates; the
        message names the first mismatching parameter and both shapes (or dtypes).
    """
    fn = "load_checkpoint"
    path = pathlib.Path(path)
    stored, meta = _read_npz(fn, path)
    restored = []
    named, (params_def, opt_def) = _named_leaves(params, opt_state, with_treedefs=True)
    for name, leaf in named:
        if name not in stored:
            raise ValueError(
                f"{fn}: {path} does not match the model: it has no entry {name} (shape "
                f"{tuple(leaf.shape)} in the model); was it written for another model or "
                f"optimizer?"
            )
        value = stored.pop(name)
        if value.shape != tuple(leaf.shape):
            raise ValueError(
                f"{fn}: {path} does not match the model: {name} has shape {value.shape} in the "
                f"checkpoint but {tuple(leaf.shape)} in the model"
            )
        if value.dtype != leaf.dtype:
            raise ValueError(
                f"{fn}: {path} does not match the model: {name} has dtype {value.dtype} in the "
                f"checkpoint but {leaf.dtype} in the model"
            )
        restored.append(jnp.asarray(value))
    if stored:
        extra = sorted(stored)
        raise ValueError(
            f"{fn}: {path} does not match the model: the checkpoint has {len(extra)} entries "
            f"the model has not, the first {extra[0]} (shape {stored[extra[0]].shape})"
        )
    n_params = params_def.num_leaves
    return (jax.tree_util.tree_unflatten(params_def, restored[:n_params]),
            jax.tree_util.tree_unflatten(opt_def, restored[n_params:]), meta)


def _named_leaves(params, opt_state, *, with_treedefs=False):
    """``[(name, leaf)]``, params first, each named ``['params']`` or ``['opt_state']``
    followed by its ``keystr`` path; with the two tree definitions if asked."""
    named, treedefs = [], []
    for prefix, tree in (("params", params), ("opt_state", opt_state)):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        named += [(f"['{prefix}']" + jax.tree_util.keystr(p), leaf) for p, leaf in leaves]
        treedefs.append(treedef)
    return (named, treedefs) if with_treedefs else named


def _read_npz(fn, path: pathlib.Path):
    """The arrays (without the metadata) and the metadata of a checkpoint file."""
    if not path.is_file():
        raise FileNotFoundError(f"{fn}: no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = {name: f[name] for name in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{fn}: {path} is not a readable checkpoint: {err}") from err
    meta_entry = stored.pop(_META_KEY, None)
    meta = json.loads(str(meta_entry)) if meta_entry is not None else {}
    if meta.get("format") != _FORMAT:
        raise ValueError(
            f"{fn}: {path} is not a jaxcnn checkpoint: expected format {_FORMAT!r} in its "
            f"{_META_KEY} entry; got {meta.get('format')!r}"
        )
    return stored, meta


# --------------------------------------------------------------------------------------------
# The fit loop.


class Preempted(Exception):
    """A multi-process run stopped after a preemption notice (SIGTERM to one of its processes),
    every process at the same step; the checkpoint of the last finished epoch is kept."""


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns: the final state and the per-epoch records."""

    params: Any
    opt_state: Any
    step: int
    epoch: int
    history: list
    summary: dict
    losses: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    """The training loss of every step this call ran (float64 copies of the step losses)."""


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
    ds = _load(config) if dataset is None else dataset
    _check_dataset(fn, ds, config)
    mesh = parallel.data_mesh(config.devices)
    if not config.eval_only:
        parallel.check_divisible(fn, "batch_size", config.batch_size, mesh)
    main = parallel.is_main_process()
    apply, params, opt_state, optimizer = _init(config, ds)
    out = config.out_dir
    checkpoint = out / CHECKPOINT
    if config.eval_only:
        return _eval_only(config, ds, apply, params, opt_state, checkpoint, mesh)
    step, start_epoch, history = 0, 0, []
    if config.resume:
        params, opt_state, meta = _load_everywhere(checkpoint, params, opt_state)
        step, start_epoch, history = meta["step"], meta["epoch"], meta["history"]
        if main:
            _note_config_changes(config, meta["config"])
    params, opt_state = parallel.replicate((params, opt_state), mesh)

    def start():
        out.mkdir(parents=True, exist_ok=True)
        _io.atomic_write(out / METRICS, lambda f: f.write(_jsonl(history).encode()))
        print(_header(config, ds, params, start_epoch, mesh), flush=True)

    _on_main_process(start, f"{fn}: creating {out / METRICS}")
    losses = []
    for epoch in range(start_epoch, config.epochs):
        params, opt_state, step, record, epoch_losses = _run_epoch(
            config, ds, apply, optimizer, params, opt_state, step, epoch, checkpoint, mesh)
        history.append(record)
        losses.append(epoch_losses)

        def end_of_epoch():
            _append_line(out / METRICS, json.dumps(record))
            save_checkpoint(checkpoint, params, opt_state,
                            _checkpoint_meta(config, step, epoch + 1, history))
            print(_epoch_line(record, config.epochs), flush=True)

        _on_main_process(end_of_epoch, f"{fn}: writing epoch {epoch + 1}'s metrics and "
                                       f"checkpoint in {out}")
    summary = _summary(config, history, params, step, time.perf_counter() - started, mesh)
    final = history[-1] if history else {}

    def finish():
        _io.atomic_write(out / SUMMARY,
                         lambda f: f.write(json.dumps(summary, indent=2).encode()))
        save_plots(out, history, parallel.host(params))
        if final:
            print(f"test accuracy {100 * final['test_accuracy']:.2f}% after "
                  f"{_plural(final['epoch'], 'epoch')} ({summary['wall_time_seconds']:.1f} s); "
                  f"results in {out}", flush=True)

    _on_main_process(finish, f"{fn}: writing {out / SUMMARY}")
    return FitResult(params, opt_state, step, len(history), history, summary,
                     np.concatenate(losses) if losses else np.zeros(0))


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


def _load_everywhere(checkpoint, params, opt_state):
    """:func:`load_checkpoint` in every process, and make sure that every process read the
    same checkpoint (epoch, step and a checksum of the params): on hosts that do not share
    ``--out``, a copy that process 0 did not update would otherwise train different params
    in lockstep with the others."""
    fn = "fit"
    error, mine = None, [0, 0, 0, 0]
    try:
        params, opt_state, meta = load_checkpoint(checkpoint, params, opt_state)
        leaves = parallel.host(jax.tree_util.tree_leaves(params))
        crc = zlib.crc32(b"".join(np.ascontiguousarray(a).tobytes() for a in leaves))
        mine = [1, meta["epoch"], meta["step"], crc & 0x7FFFFFFF]
    except (OSError, ValueError) as err:
        error = err
    table = parallel.gather(mine)
    if error is not None:
        raise error
    unreadable = [p for p, row in enumerate(table) if not row[0]]
    if unreadable:
        raise ValueError(f"{fn}: process {', '.join(map(str, unreadable))} could not read its "
                         f"checkpoint at {checkpoint} (its own error says why); every process "
                         f"needs the same checkpoint: put --out on a file system all hosts see")
    if (table != table[0]).any():
        seen = "; ".join(f"process {p}: epoch {e}, step {s}, params checksum {c:08x}"
                         for p, (_, e, s, c) in enumerate(table))
        raise ValueError(f"{fn}: the processes read different checkpoints at {checkpoint} "
                         f"({seen}); every process needs the same checkpoint: put --out on a "
                         f"file system all hosts see")
    return params, opt_state, meta


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


def _init(config: TrainConfig, ds):
    """The model's ``apply``, fresh params and optimizer state, and the optimizer."""
    init, apply = MODELS[config.model](ds.num_classes)
    _, params = init(jax.random.key(config.seed), (-1, *ds.train_x.shape[1:]))
    total = config.epochs * data.num_batches(len(ds.train_x), config.batch_size)
    optimizer = make_optimizer(config.optimizer, float(config.lr), decay_steps=total)
    return apply, params, optimizer.init(params), optimizer


def _run_epoch(config, ds, apply, optimizer, params, opt_state, step, epoch, checkpoint, mesh):
    """Train one epoch and evaluate; return the new state, step, the epoch's record and the
    step losses."""
    params, opt_state, step, losses, seconds = _train_epoch(
        config, ds, apply, optimizer, params, opt_state, step, epoch, checkpoint, mesh)
    test = evaluate(params, ds.test_x, ds.test_y, apply=apply, impl=config.impl,
                    dtype=config.dtype, mesh=mesh)
    n_images = data.num_batches(len(ds.train_x), config.batch_size) * config.batch_size
    record = {
        "epoch": epoch + 1,
        "step": step,
        "train_loss": float(losses.mean()),
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "images_per_second": n_images / seconds,
        "train_seconds": seconds,
    }
    return params, opt_state, step, record, losses


def _train_epoch(config, ds, apply, optimizer, params, opt_state, step, epoch, checkpoint,
                 mesh):
    """The training steps of one epoch; returns the step losses as float64.

    Each process gathers only its own rows of every batch (:func:`jaxcnn.parallel.process_rows`)
    and hands them to its devices. Losses stay on the devices and are read every
    :data:`SYNC_EVERY` steps, in one transfer: for the progress bar and to stop at the first
    non-finite loss.
    """
    from tqdm.auto import tqdm

    n_batches = data.num_batches(len(ds.train_x), config.batch_size)
    bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
               leave=False, disable=not (sys.stderr.isatty() and parallel.is_main_process()))
    rows = parallel.process_rows(mesh, config.batch_size)
    done, pending = [], []
    started = time.perf_counter()
    with bar:
        indices = data.batch_indices(len(ds.train_x), config.batch_size, seed=config.seed,
                                     epoch=epoch)
        for i, idx in enumerate(indices):
            local = idx[rows]
            batch = _put(mesh, config.batch_size, ds.train_x[local], ds.train_y[local])
            params, opt_state, loss = train_step(params, opt_state, batch, apply=apply,
                                                 optimizer=optimizer, impl=config.impl,
                                                 dtype=config.dtype)
            pending.append(loss)
            if parallel.preempted(step + i + 1):
                raise Preempted(
                    f"fit: preempted at step {step + i + 1} (epoch {epoch + 1}, batch {i + 1} of "
                    f"{n_batches}): a process received SIGTERM and every process stopped "
                    f"there together; the last checkpoint, {checkpoint} (epoch {epoch}), is "
                    f"left as it was")
            if len(pending) == SYNC_EVERY or i == n_batches - 1:
                losses = np.asarray(parallel.host(pending), np.float64)
                first = step + i + 2 - len(pending)  # the 1-based step of pending[0]
                _check_finite(losses, first, config, epoch, n_batches, checkpoint)
                done.append(losses)
                bar.update(len(pending))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                pending = []
    seconds = time.perf_counter() - started
    return params, opt_state, step + n_batches, np.concatenate(done), seconds


def _check_finite(losses, first_step, config, epoch, n_batches, checkpoint):
    """Raise FloatingPointError naming the first step whose loss is not finite."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if not bad.size:
        return
    step = first_step + int(bad[0])
    batch = step - epoch * n_batches
    kept = (f"the last good checkpoint, {checkpoint} (epoch {epoch}), is left as it was"
            if epoch > 0 and checkpoint.exists() else "no checkpoint had been written yet")
    raise FloatingPointError(
        f"fit: the training loss is {losses[bad[0]]} at step {step} (epoch {epoch + 1}, batch "
        f"{batch} of {n_batches}); training stopped and {kept}. Check the data for NaN or "
        f"infinite values, or lower the learning rate (lr={config.lr})"
    )


def _eval_only(config, ds, apply, params, opt_state, checkpoint, mesh) -> FitResult:
    """Evaluate the checkpoint in ``config.out`` on the test set and print the result."""
    params, opt_state, meta = _load_everywhere(checkpoint, params, opt_state)
    params = parallel.replicate(params, mesh)
    test = evaluate(params, ds.test_x, ds.test_y, apply=apply, impl=config.impl,
                    dtype=config.dtype, mesh=mesh)
    if parallel.is_main_process():
        print(f"checkpoint {checkpoint} (epoch {meta['epoch']}, step {meta['step']}): test "
              f"loss {test['loss']:.4f}  test acc {100 * test['accuracy']:.2f}% "
              f"({test['correct']}/{test['n']})", flush=True)
    summary = {"test_loss": test["loss"], "test_accuracy": test["accuracy"],
               "checkpoint": str(checkpoint)}
    return FitResult(params, opt_state, meta["step"], meta["epoch"], meta["history"], summary)


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


def _checkpoint_meta(config, step, epoch, history) -> dict:
    return {
        "step": step,
        "epoch": epoch,
        "rng": {"seed": config.seed, "next_epoch": epoch,
                "note": "params from jax.random.key(seed); batch order of epoch e from "
                        "numpy.random.default_rng([seed, e])"},
        "config": config.to_json(),
        "history": history,
        "jaxcnn_version": __version__,
    }


def _summary(config, history, params, step, wall_time, mesh) -> dict:
    return {
        "final": history[-1] if history else None,
        "best_test_accuracy": max((r["test_accuracy"] for r in history), default=None),
        "epochs": len(history),
        "steps": step,
        "num_params": count_params(params),
        "wall_time_seconds": wall_time,
        "train_seconds_total": sum(r["train_seconds"] for r in history),
        "config": config.to_json(),
        "versions": {"jaxcnn": __version__, "jax": jax.__version__,
                     "jaxlib": _jaxlib_version(), "optax": optax.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "backend": jax.default_backend(),
        "devices": [str(d) for d in mesh.devices.flat],
        "processes": jax.process_count(),
        "platform": platform.platform(),
    }


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def _header(config, ds, params, start_epoch, mesh) -> str:
    what = f"resuming at epoch {start_epoch + 1}" if start_epoch else "training"
    precision = "" if config.dtype == "float32" else f", {config.dtype} compute"
    return (f"{what}: {config.model} ({count_params(params):,} params, impl {config.impl}"
            f"{precision}) on {config.dataset} ({len(ds.train_x)} train / {len(ds.test_x)} "
            f"test), {config.optimizer} lr {config.lr:g}, batch {config.batch_size}, "
            f"{_plural(config.epochs, 'epoch')}, seed {config.seed}, "
            f"{parallel.describe(mesh)} -> {config.out_dir}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _epoch_line(record, epochs) -> str:
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}  "
            f"test loss {record['test_loss']:.4f}  test acc "
            f"{100 * record['test_accuracy']:.2f}%  {record['images_per_second']:.0f} img/s")


def _jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _append_line(path, line: str):
    """Append one line and make it durable."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# Plots.


def save_plots(out, history, params) -> list[pathlib.Path]:
    """``curves.png`` (losses and accuracy per epoch) and ``filters.png`` (the first layer's
    kernels) in ``out``; without matplotlib, print that the plots were skipped."""
    try:
        plt = _pyplot()
    except ImportError:
        print(PLOTS_SKIPPED, flush=True)
        return []
    out = pathlib.Path(out)
    paths = [_plot_curves(plt, out / "curves.png", history)]
    kernel = _first_kernel(params)
    if kernel is not None:
        paths.append(_plot_filters(plt, out / "filters.png", kernel))
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(plt, path, history):
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in history], "o-", color="C1")
    ax_acc.set(xlabel="epoch", ylabel="%", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _first_kernel(params):
    """The first leaf of rank 4 (a 2-d convolution kernel), or None."""
    for leaf in jax.tree_util.tree_leaves(params):
        if leaf.ndim == 4:
            return np.asarray(jax.device_get(leaf))
    return None


def _plot_filters(plt, path, kernel):
    """One image per output channel of ``kernel: (kh, kw, C_in, C_out)``, input channel 0."""
    c_out = kernel.shape[-1]
    cols = min(c_out, 8)
    rows = -(-c_out // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + 0.4), squeeze=False)
    limit = float(np.abs(kernel[..., 0, :]).max()) or 1.0
    for j, ax in enumerate(axes.flat):
        ax.axis("off")
        if j < c_out:
            ax.imshow(kernel[..., 0, j], cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(str(j), fontsize=8)
    fig.suptitle("first layer kernels (input channel 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
