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
import pathlib
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from . import _io, parallel

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
    """
    named = _named_leaves(state)
    values = parallel.host([leaf for _, leaf in named])  # one transfer, this process's copies
    arrays = {name: np.asarray(value) for (name, _), value in zip(named, values)}
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
    restored = []
    for name, leaf in _named_leaves(like):
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


def _named_leaves(state):
    """``[(name, leaf)]`` over the trees of :data:`TREES` in order, each leaf named by its
    tree's field and its ``keystr`` path."""
    named = []
    for field in TREES:
        leaves, _ = jax.tree_util.tree_flatten_with_path(getattr(state, field))
        named += [(f"['{field}']" + jax.tree_util.keystr(p), leaf) for p, leaf in leaves]
    return named


def _read_npz(fn, path: pathlib.Path):
    """The arrays (without the metadata) and the metadata of a checkpoint file."""
    if not path.is_file():
        raise FileNotFoundError(f"{fn}: no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = {name: f[name] for name in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{fn}: {path} is not a readable checkpoint: {err}") from err
    meta_entry = stored.pop(META_KEY, None)
    meta = json.loads(str(meta_entry)) if meta_entry is not None else {}
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{fn}: {path} is not a jaxcnn checkpoint: expected format {FORMAT!r} in its "
            f"{META_KEY} entry; got {meta.get('format')!r}"
        )
    return stored, meta
