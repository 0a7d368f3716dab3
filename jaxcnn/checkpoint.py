"""Checkpoints: a train state written atomically, read back into a template, agreed on by
every process.

The format (``numpy.savez``, no pickle): one ``.npy`` entry per array leaf of the state's three
trees, named ``['params']``, ``['model_state']`` or ``['opt_state']`` followed by the leaf's
``jax.tree_util.keystr`` path (``['params'][0]['bias']``, ``['opt_state'][0].mu[0]['bias']``),
plus ``__meta__``, a JSON string holding ``"format": "jaxcnn-checkpoint-v1"``, the state's
``step`` and ``epoch``, and whatever else the caller adds (``fit`` adds its configuration, the
RNG seed and the per-epoch history). ``model_state`` (non-trainable layer state such as batch
norm statistics) has no leaves for today's models, so a checkpoint written before it existed
reads the same.

The state is any ``NamedTuple`` with the fields ``params``, ``model_state``, ``opt_state``,
``step`` and ``epoch``, such as :class:`jaxcnn.training.TrainState`.
"""

from __future__ import annotations

import json
import math
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from . import __version__, _io, parallel
from ._shapes import is_int

FILENAME = "checkpoint.npz"  # the checkpoint's name in a run's output directory
FORMAT = "jaxcnn-checkpoint-v1"
META_KEY = "__meta__"  # the entry holding the JSON metadata
TREES = ("params", "model_state", "opt_state")  # the state's fields saved as arrays, in order


def save_checkpoint(path, state, meta: dict | None = None) -> None:
    """Write ``state`` (its three trees, its step and epoch) and the JSON ``meta`` to ``path``,
    atomically.

    The file is written to a temporary file in the same directory, flushed and fsynced, renamed
    over ``path`` with ``os.replace``, and the directory is fsynced: a kill at any moment leaves
    either the old or the new checkpoint, complete (:func:`jaxcnn._io.atomic_write`).

    Raises:
      FloatingPointError: an array holds NaN or infinite values (named); nothing is written, so
        a checkpoint already at ``path`` stays as it was.
    """
    named = named_leaves(state)
    values = parallel.host([leaf for _, leaf in named])  # one transfer, this process's copies
    arrays = {name: np.asarray(value) for (name, _), value in zip(named, values)}
    bad = first_non_finite(arrays)
    if bad is not None:
        raise FloatingPointError(
            f"save_checkpoint: {bad} holds NaN or infinite values; a checkpoint never holds "
            f"them, so {path} was not written (a checkpoint already there is left as it was)")
    meta = {"format": FORMAT, **(meta or {}), "step": int(state.step), "epoch": int(state.epoch)}
    arrays[META_KEY] = np.array(json.dumps(meta))
    _io.atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path, like):
    """Read a checkpoint into the structure of the state ``like``.

    ``like`` is a template (a freshly initialised state): the result has its structure, with
    every leaf, the step and the epoch read from the file.

    Returns:
      ``(state, meta)``.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: not a jaxcnn checkpoint, or one that does not match the template; the
        message names the first mismatching entry and both shapes (or dtypes).
    """
    fn = "load_checkpoint"
    path = pathlib.Path(path)
    stored, meta = _read_npz(fn, path)
    bad = first_non_finite(stored)
    if bad is not None:
        raise ValueError(
            f"{fn}: {path} holds non-finite values: {bad} has NaN or infinite entries; jaxcnn "
            f"never saves such a state, so the file was damaged or written by other code: use "
            f"another checkpoint, or start again with --overwrite")
    restored = []
    for name, leaf in named_leaves(like):
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
    trees = {}
    for field in TREES:
        treedef = jax.tree_util.tree_structure(getattr(like, field))
        trees[field] = jax.tree_util.tree_unflatten(treedef, restored[:treedef.num_leaves])
        restored = restored[treedef.num_leaves:]
    return like._replace(**trees, step=meta["step"], epoch=meta["epoch"]), meta


def check_exists(path, hint: str = "") -> None:
    """Raise FileNotFoundError unless there is a checkpoint file at ``path``."""
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path}{hint}")


def first_non_finite(arrays: dict) -> str | None:
    """The name of the first floating-point array of ``{name: array}`` (in its order) that
    holds NaN or an infinity, or None."""
    for name, value in arrays.items():
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            return name
    return None


def malformed(fn: str, path, detail: str) -> ValueError:
    """The error for checkpoint metadata that is missing or wrong, naming the file."""
    return ValueError(f"{fn}: {path} has malformed metadata: {detail}; the file is damaged or "
                      f"was not written by jaxcnn: use another checkpoint, or start again with "
                      f"--overwrite")


def load_everywhere(path, like):
    """:func:`load_checkpoint` in every process (a collective), and make sure that every
    process read the same checkpoint (epoch, step and a checksum of the params): on hosts that
    do not share the output directory, a copy that process 0 did not update would otherwise
    train different params in lockstep with the others."""
    fn = "fit"
    error, mine = None, [0, 0, 0, 0]
    try:
        state, meta = load_checkpoint(path, like)
        leaves = parallel.host(jax.tree_util.tree_leaves(state.params))
        crc = zlib.crc32(b"".join(np.ascontiguousarray(a).tobytes() for a in leaves))
        mine = [1, state.epoch, state.step, crc & 0x7FFFFFFF]
    except (OSError, ValueError) as err:
        error = err
    table = parallel.gather(mine)
    if error is not None:
        raise error
    unreadable = [p for p, row in enumerate(table) if not row[0]]
    if unreadable:
        raise ValueError(f"{fn}: process {', '.join(map(str, unreadable))} could not read its "
                         f"checkpoint at {path} (its own error says why); every process "
                         f"needs the same checkpoint: put --out on a file system all hosts see")
    if (table != table[0]).any():
        seen = "; ".join(f"process {p}: epoch {e}, step {s}, params checksum {c:08x}"
                         for p, (_, e, s, c) in enumerate(table))
        raise ValueError(f"{fn}: the processes read different checkpoints at {path} "
                         f"({seen}); every process needs the same checkpoint: put --out on a "
                         f"file system all hosts see")
    return state, meta


def named_leaves(state):
    """``[(name, leaf)]`` over the trees of :data:`TREES` in order, each leaf named by its
    tree's field and its ``keystr`` path."""
    named = []
    for field in TREES:
        leaves, _ = jax.tree_util.tree_flatten_with_path(getattr(state, field))
        named += [(f"['{field}']" + jax.tree_util.keystr(p), leaf) for p, leaf in leaves]
    return named


def _read_npz(fn, path: pathlib.Path):
    """The arrays (without the metadata) and the checked metadata of a checkpoint file."""
    check_exists(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not a .npz archive")
        with loaded as f:
            stored = {name: f[name] for name in f.files}
    except Exception as err:  # noqa: BLE001 - zipfile, zlib, numpy and the OS raise a dozen
        # types for a damaged file (BadZipFile, NotImplementedError for an unknown compression,
        # RuntimeError for an encrypted entry, EOFError, struct.error, ...): all mean the same.
        raise ValueError(f"{fn}: {path} is not a readable checkpoint: {type(err).__name__}: "
                         f"{err}; use another checkpoint, or start again with --overwrite"
                         ) from err
    for name, value in stored.items():
        if not isinstance(value, np.ndarray):  # a zip member that is not a .npy file
            raise ValueError(f"{fn}: {path} is not a jaxcnn checkpoint: its entry {name!r} is "
                             f"not a .npy array")
    return stored, _read_meta(fn, path, stored.pop(META_KEY, None))


def _read_meta(fn, path, entry) -> dict:
    """The metadata of the ``__meta__`` entry, checked field by field: ``format``, ``step`` and
    ``epoch`` (the fields of the run that wrote it are checked by :mod:`jaxcnn.training`)."""
    if entry is None:
        raise ValueError(f"{fn}: {path} is not a jaxcnn checkpoint: expected format {FORMAT!r} "
                         f"in its {META_KEY} entry; got no {META_KEY} entry")
    if entry.dtype.kind != "U" or entry.ndim != 0:
        raise malformed(fn, path, f"its {META_KEY} entry must be a JSON string; got an array of "
                                  f"dtype {entry.dtype} and shape {entry.shape}")
    try:
        meta = json.loads(str(entry))
    except ValueError as err:
        raise malformed(fn, path, f"its {META_KEY} entry is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise malformed(fn, path, f"its {META_KEY} entry must be a JSON object; got "
                                  f"{type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{fn}: {path} is not a jaxcnn checkpoint: expected format {FORMAT!r} in its "
            f"{META_KEY} entry; got {meta.get('format')!r}"
        )
    for field in ("step", "epoch"):
        check_field(fn, path, meta, field, is_count, "an int >= 0")
    return meta


def run_meta(config: dict, state, history) -> dict:
    """The metadata ``fit`` adds to its checkpoints: how to continue the run. ``config`` is
    the run's configuration as JSON (``TrainConfig.to_json()``), ``history`` its per-epoch
    records."""
    return {
        "rng": {"seed": config["seed"], "next_epoch": state.epoch,
                "note": "params from jax.random.key(seed); batch order of epoch e from "
                        "numpy.random.default_rng([seed, e])"},
        "config": config,
        "history": history,
        "jaxcnn_version": __version__,
    }


def check_run(fn: str, path, state, meta: dict) -> dict:
    """The fields :func:`run_meta` writes, checked one by one against the ``state`` read with
    them: ``config`` a JSON object (returned, for the caller to check its settings), ``rng``
    one with a ``seed``, ``history`` one record per finished epoch, the last at the state's
    step. Errors name the file (:func:`malformed`)."""
    config = check_field(fn, path, meta, "config", lambda v: isinstance(v, dict),
                         "a JSON object")
    rng = check_field(fn, path, meta, "rng", lambda v: isinstance(v, dict), "a JSON object")
    check_field(fn, path, rng, "seed", is_count, "an int >= 0", "rng")
    history = check_field(fn, path, meta, "history",
                          lambda v: isinstance(v, list) and len(v) == state.epoch,
                          f"a list of {state.epoch} records, one per epoch")
    for i, record in enumerate(history):
        _check_record(fn, path, record, i)
    if history and history[-1]["step"] != state.step:
        raise malformed(fn, path, f"the last record of 'history' is at step "
                                  f"{history[-1]['step']}, not {state.step}")
    return config


def _check_record(fn, path, record, i: int) -> None:
    """One epoch's record of a checkpoint's history."""
    where = f"history[{i}]"
    if not isinstance(record, dict):
        raise malformed(fn, path, f"{where} must be a JSON object; got {type(record).__name__}")
    check_field(fn, path, record, "epoch", lambda v: v == i + 1, str(i + 1), where)
    check_field(fn, path, record, "step", is_count, "an int >= 0", where)
    for name in ("train_loss", "test_loss", "images_per_second", "train_seconds"):
        check_field(fn, path, record, name, _is_finite_number, "a finite number", where)
    check_field(fn, path, record, "test_accuracy",
                lambda v: _is_finite_number(v) and 0 <= v <= 1, "a number in [0, 1]", where)


def _is_finite_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_field(fn, path, record: dict, field: str, ok, expected: str, where: str = ""):
    """``record[field]`` if ``ok(value)``; else the :func:`malformed` error saying what was
    expected (``where`` names the record, e.g. ``"history[2]"``)."""
    name = f"{where}.{field}" if where else field
    if field not in record:
        raise malformed(fn, path, f"it has no field {name!r}")
    value = record[field]
    if not ok(value):
        raise malformed(fn, path, f"field {name!r} must be {expected}; got "
                                  f"{type(value).__name__} {value!r:.60}")
    return value


def is_count(value) -> bool:
    """An int >= 0 (not a bool): a step, an epoch."""
    return is_int(value) and value >= 0
