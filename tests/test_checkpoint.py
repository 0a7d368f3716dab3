"""Tests for jaxcnn.checkpoint: the format, atomic writes, and every way a file can be wrong.

Every damaged file must be refused with a ``ValueError`` naming it (never a traceback of
zipfile, numpy or json), or read back exactly as written. The run-level fields of a ``fit``
checkpoint (``config``, ``rng``, ``history``) are checked by ``training._saved_config``, which
``fit`` calls before resuming or evaluating; they are tested here too.
"""

import io
import json
import re
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import checkpoint, models, training
from jaxcnn.checkpoint import load_checkpoint, save_checkpoint
from jaxcnn.training import TrainConfig, TrainState

from test_training import tree_equal

LR = 2e-3


def state_of(params, optimizer="adam", *, step=0, epoch=0):
    return TrainState(params, {}, training.make_optimizer(optimizer, LR).init(params), step, epoch)


@pytest.fixture(scope="module")
def lenet_params():
    return models.lenet5().init(jax.random.key(0), (-1, 28, 28, 1))[1]


# A real checkpoint of fit, small enough to corrupt byte by byte: a 3 -> 2 dense layer, Adam,
# after epoch 1 of 2 (2 steps), with the metadata fit writes.
SMALL = {"b": jnp.zeros(2), "w": jnp.arange(6.0).reshape(3, 2) / 7}
RECORD = {"epoch": 1, "step": 2, "train_loss": 1.5, "test_loss": 1.25, "test_accuracy": 0.5,
          "images_per_second": 100.0, "train_seconds": 0.5}


def small_like():
    return TrainState(SMALL, {}, training.make_optimizer("adam", LR, 4).init(SMALL))


@pytest.fixture
def small_checkpoint(tmp_path):
    state = small_like()._replace(step=2, epoch=1)
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, state,
                    checkpoint.run_meta(TrainConfig(epochs=2).to_json(), state, [RECORD]))
    return path


def read_all(path):
    """What fit reads from a checkpoint: the state, the metadata, the run's configuration."""
    state, meta = load_checkpoint(path, small_like())
    return state, meta, training._saved_config(path, state, meta)


# ------------------------------------------------------------------------------------------
# Writing and reading back.


def test_checkpoint_write_is_atomic(tmp_path, lenet_params, monkeypatch):
    params = lenet_params
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, state_of(params, step=8, epoch=1))
    good = path.read_bytes()

    def dies_halfway(file, **arrays):                  # a kill in the middle of the write
        file.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dies_halfway)
    bigger = jax.tree_util.tree_map(lambda a: a + 1, params)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, state_of(bigger, step=16, epoch=2))
    assert path.read_bytes() == good                   # the old checkpoint, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]
    restored, meta = load_checkpoint(path, state_of(params))
    assert meta["epoch"] == 1 and tree_equal(restored.params, params)
    assert (restored.step, restored.epoch) == (8, 1)


def test_checkpoint_that_does_not_match_the_model(tmp_path, lenet_params):
    params = lenet_params
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, state_of(params, step=8, epoch=1))
    _, other = models.small_cnn().init(jax.random.key(0), (-1, 28, 28, 1))
    # The first mismatch in tree order (dict keys sorted: "bias" before "kernel").
    with pytest.raises(ValueError, match=r"does not match the model: \['params'\]\[0\]\['bias'\] "
                                         r"has shape \(6,\) in the checkpoint but \(32,\) in "
                                         r"the model"):
        load_checkpoint(path, state_of(other))
    with pytest.raises(ValueError, match=r"it has no entry \['opt_state'\]\[0\]\.trace"):
        load_checkpoint(path, state_of(params, "momentum"))


def test_model_state_is_saved_and_restored_by_name(tmp_path, lenet_params):
    """The checkpoint stores non-trainable layer state (batch norm statistics, once a layer
    has any) under ['model_state'], and a template without it refuses such a file."""
    params = lenet_params
    path = tmp_path / "checkpoint.npz"
    stats = [{}, {"mean": jnp.arange(3.0), "var": jnp.ones(3)}]
    save_checkpoint(path, state_of(params, step=8, epoch=1)._replace(model_state=stats))
    with np.load(path) as f:
        assert {"['model_state'][1]['mean']", "['model_state'][1]['var']"} <= set(f.files)
    like = state_of(params)._replace(model_state=[{}, {"mean": jnp.zeros(3), "var": jnp.zeros(3)}])
    restored, _ = load_checkpoint(path, like)
    assert tree_equal(restored.model_state, stats) and tree_equal(restored.params, params)
    with pytest.raises(ValueError, match=r"the checkpoint has 2 entries the model has not, the "
                                         r"first \['model_state'\]\[1\]\['mean'\]"):
        load_checkpoint(path, state_of(params))


def test_a_checkpoint_written_before_model_state_existed_still_loads(tmp_path, lenet_params):
    """A file as the code before TrainState wrote it: the entries of {"params": ...,
    "opt_state": ...} named by their keystr paths, and the metadata."""
    params = lenet_params
    state = state_of(params, step=8, epoch=1)
    entries = {}
    for prefix, tree in (("params", params), ("opt_state", state.opt_state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            entries[f"['{prefix}']" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    meta = {"format": "jaxcnn-checkpoint-v1", "step": 8, "epoch": 1}
    old = tmp_path / "old.npz"
    np.savez(old, **entries, __meta__=np.array(json.dumps(meta)))
    restored, meta = load_checkpoint(old, state_of(params))
    assert restored.model_state == {} and tree_equal(restored.params, params)
    assert tree_equal(restored.opt_state, state.opt_state)
    assert (restored.step, meta["epoch"]) == (8, 1)


def test_unreadable_checkpoints(tmp_path, lenet_params):
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"is not a readable checkpoint"):
        load_checkpoint(path, state_of(lenet_params))
    np.savez(path, w=np.zeros(3))
    with pytest.raises(ValueError, match=r"is not a jaxcnn checkpoint: expected format"):
        load_checkpoint(path, state_of(lenet_params))


def test_a_fit_checkpoint_reads_back_exactly(small_checkpoint):
    state, meta, saved = read_all(small_checkpoint)
    assert tree_equal(state.params, SMALL) and (state.step, state.epoch) == (2, 1)
    assert meta["history"] == [RECORD] and saved == TrainConfig(epochs=2)


# ------------------------------------------------------------------------------------------
# Non-finite values are never written, and refused when read.


def test_non_finite_values_are_never_written(tmp_path):
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, small_like())
    good = path.read_bytes()
    broken = small_like()._replace(params={"b": jnp.zeros(2), "w": jnp.full((3, 2), jnp.inf)})
    with pytest.raises(FloatingPointError, match=r"save_checkpoint: \['params'\]\['w'\] holds NaN "
                                                 r"or infinite values; .* was not written"):
        save_checkpoint(path, broken)
    assert path.read_bytes() == good and sorted(tmp_path.iterdir()) == [path]


def test_a_checkpoint_with_non_finite_values_is_refused_naming_the_first(small_checkpoint):
    with np.load(small_checkpoint) as f:
        entries = {name: f[name] for name in f.files}
    entries["['params']['w']"] = entries["['params']['w']"].copy()
    entries["['params']['w']"][1, 0] = np.nan
    entries["['opt_state'][0].nu['b']"] = np.full(2, np.inf, np.float32)
    np.savez(small_checkpoint, **entries)
    with pytest.raises(ValueError, match=r"load_checkpoint: .*checkpoint.npz holds non-finite "
                                         r"values: \['params'\]\['w'\] has NaN or infinite "
                                         r"entries"):
        load_checkpoint(small_checkpoint, small_like())


# ------------------------------------------------------------------------------------------
# Malformed metadata: every field, one by one.


def with_meta(path, meta):
    """Rewrite the checkpoint at `path` with its arrays and `meta` (a dict, or a raw entry)."""
    with np.load(path) as f:
        entries = {name: f[name] for name in f.files if name != "__meta__"}
    if meta is not None:
        entries["__meta__"] = meta if isinstance(meta, np.ndarray) else np.array(
            meta if isinstance(meta, str) else json.dumps(meta))
    np.savez(path, **entries)


def edit(**changes):
    """A function of the original metadata: `changes` applied (None deletes a field); a key
    "config.lr" or "history.0.test_loss" reaches inside."""
    def apply(meta):
        meta = json.loads(json.dumps(meta))
        for key, value in changes.items():
            *parents, last = key.split(".")
            target = meta
            for p in parents:
                target = target[int(p)] if isinstance(target, list) else target[p]
            if isinstance(target, list):
                target[int(last)] = value
            elif value is None:
                del target[last]
            else:
                target[last] = value
        return meta
    return apply


BAD = "load_checkpoint: {path} has malformed metadata: "
BAD_RUN = "fit: {path} has malformed metadata: "


@pytest.mark.parametrize("change, message", [
    (lambda m: None, "load_checkpoint: {path} is not a jaxcnn checkpoint: expected format "
                     "'jaxcnn-checkpoint-v1' in its __meta__ entry; got no __meta__ entry"),
    (lambda m: np.arange(3), BAD + "its __meta__ entry must be a JSON string; got an array of "
                                   "dtype int64 and shape (3,)"),
    (lambda m: np.array(["{}", "{}"]), BAD + "its __meta__ entry must be a JSON string; got an "
                                             "array of dtype <U2 and shape (2,)"),
    (lambda m: '{"format": "jaxcnn-checkpoint-v1", "step": 2,', BAD + "its __meta__ entry is not "
                                                                  "valid JSON (Expecting"),
    (lambda m: [m], BAD + "its __meta__ entry must be a JSON object; got list"),
    (edit(format="other"), "load_checkpoint: {path} is not a jaxcnn checkpoint: expected format "
                           "'jaxcnn-checkpoint-v1' in its __meta__ entry; got 'other'"),
    (edit(format=None), "is not a jaxcnn checkpoint: expected format .*; got None"),
    (edit(epoch=None), BAD + "it has no field 'epoch'"),
    (edit(step=None), BAD + "it has no field 'step'"),
    (edit(epoch="1"), BAD + "field 'epoch' must be an int >= 0; got str '1'"),
    (edit(epoch=True), BAD + "field 'epoch' must be an int >= 0; got bool True"),
    (edit(epoch=1.0), BAD + "field 'epoch' must be an int >= 0; got float 1.0"),
    (edit(step=-3), BAD + "field 'step' must be an int >= 0; got int -3"),
    (edit(config=None), BAD_RUN + "it has no field 'config'"),
    (edit(config=[]), BAD_RUN + "field 'config' must be a JSON object; got list []"),
    (edit(**{"config.colour": "red"}), BAD_RUN + "field 'config' has an unknown setting 'colour'"),
    (edit(**{"config.lr": -1}), BAD_RUN + "field 'config' is not valid (TrainConfig: lr must be a "
                                          "finite number > 0; got -1)"),
    (edit(**{"config.model": "vgg"}), BAD_RUN + "field 'config' is not valid (TrainConfig: model "
                                                "must be one of"),
    (edit(**{"config.epochs": "2"}), BAD_RUN + "field 'config' is not valid (TrainConfig: epochs "
                                               "must be an int; got str '2')"),
    (lambda m: {**m, "epoch": 3, "step": 6,
                "history": [{**RECORD, "epoch": e, "step": 2 * e} for e in (1, 2, 3)]},
     BAD_RUN + "field 'epoch' (3) is past the run's own epochs (2)"),
    (edit(epoch=2), BAD_RUN + "field 'history' must be a list of 2 records, one per epoch; got "
                              "list"),
    (edit(rng=None), BAD_RUN + "it has no field 'rng'"),
    (edit(rng=7), BAD_RUN + "field 'rng' must be a JSON object; got int 7"),
    (edit(**{"rng.seed": None}), BAD_RUN + "it has no field 'rng.seed'"),
    (edit(**{"rng.seed": 7}), BAD_RUN + "field 'rng.seed' must be the config's seed (0); got int "
                                        "7"),
    (edit(history=None), BAD_RUN + "it has no field 'history'"),
    (edit(history={}), BAD_RUN + "field 'history' must be a list of 1 records, one per epoch; got "
                                 "dict {}"),
    (edit(history=[]), BAD_RUN + "field 'history' must be a list of 1 records, one per epoch; got "
                                 "list []"),
    (edit(**{"history.0": "epoch 1"}), BAD_RUN + "history[0] must be a JSON object; got str"),
    (edit(**{"history.0.epoch": 2}), BAD_RUN + "field 'history[0].epoch' must be 1; got int 2"),
    (edit(**{"history.0.test_loss": None}), BAD_RUN + "it has no field 'history[0].test_loss'"),
    (edit(**{"history.0.train_loss": "nan"}), BAD_RUN + "field 'history[0].train_loss' must be a "
                                                        "finite number; got str 'nan'"),
    (edit(**{"history.0.test_accuracy": 1.5}), BAD_RUN + "field 'history[0].test_accuracy' must "
                                                         "be a number in [0, 1]; got float 1.5"),
    (edit(**{"history.0.step": 9}), BAD_RUN + "the last record of 'history' is at step 9, not 2"),
])
def test_malformed_metadata_is_refused_field_by_field(small_checkpoint, change, message):
    with np.load(small_checkpoint) as f:
        meta = json.loads(str(f["__meta__"]))
    with_meta(small_checkpoint, change(meta))
    message = message.replace("{path}", str(small_checkpoint))
    with pytest.raises(ValueError) as err:
        read_all(small_checkpoint)
    text = str(err.value)   # the exact start, or a pattern where the text varies
    assert text.startswith(message) or re.search(message, text), text


def test_json_nan_in_the_history_is_refused(small_checkpoint):
    """JSON's NaN extension: json.loads reads it, the record check refuses it."""
    with np.load(small_checkpoint) as f:
        text = str(f["__meta__"])
    with_meta(small_checkpoint, text.replace('"test_loss": 1.25', '"test_loss": NaN'))
    with pytest.raises(ValueError, match=r"field 'history\[0\]\.test_loss' must be a finite "
                                         r"number; got float nan"):
        read_all(small_checkpoint)


# ------------------------------------------------------------------------------------------
# Damaged files: zip-level errors, and every corrupted byte.


def headers(data: bytes, signature: bytes):
    """The offsets of the zip headers with this signature."""
    found, start = [], 0
    while (i := data.find(signature, start)) >= 0:
        found.append(i)
        start = i + 1
    return found


def patched(data: bytes, *edits):
    """`data` with little-endian uint16 values written at (offset, value) pairs."""
    data = bytearray(data)
    for offset, value in edits:
        data[offset:offset + 2] = struct.pack("<H", value)
    return bytes(data)


LOCAL, CENTRAL = b"PK\x03\x04", b"PK\x01\x02"


def unsupported_compression(data):   # method 99 in every local and central header
    return patched(data, *[(i + 8, 99) for i in headers(data, LOCAL)],
                   *[(i + 10, 99) for i in headers(data, CENTRAL)])


def encrypted(data):                 # the "encrypted" flag bit in every header
    return patched(data, *[(i + 6, 1) for i in headers(data, LOCAL)],
                   *[(i + 8, 1) for i in headers(data, CENTRAL)])


def npy_instead_of_npz(data):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


@pytest.mark.parametrize("damage, match", [
    (unsupported_compression, r"is not a readable checkpoint: NotImplementedError: That "
                              r"compression method is not supported"),
    (encrypted, r"is not a readable checkpoint: RuntimeError: File .* is encrypted, password "
                r"required for extraction"),
    (lambda d: d[: len(d) // 2], r"is not a readable checkpoint: BadZipFile: File is not a zip "
                                 r"file"),
    (lambda d: d[:-1], r"is not a readable checkpoint: BadZipFile"),
    (lambda d: b"", r"is not a readable checkpoint: EOFError"),
    (lambda d: b"PK\x03\x04 truncated", r"is not a readable checkpoint"),
    (lambda d: b"not a checkpoint at all\n", r"is not a readable checkpoint: ValueError: "
                                              r".*pickled"),
    (npy_instead_of_npz, r"is not a readable checkpoint: ValueError: a single \.npy array, not a "
                         r"\.npz archive"),
])
def test_zip_level_damage_is_refused_naming_the_file(small_checkpoint, damage, match):
    small_checkpoint.write_bytes(damage(small_checkpoint.read_bytes()))
    with pytest.raises(ValueError, match=rf"^load_checkpoint: {small_checkpoint} {match}"):
        read_all(small_checkpoint)


def test_entries_that_are_not_plain_arrays_are_refused(small_checkpoint):
    data = small_checkpoint.read_bytes()
    with zipfile.ZipFile(small_checkpoint, "a") as z:
        z.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match=r"is not a jaxcnn checkpoint: its entry 'notes.txt' is "
                                         r"not a \.npy array"):
        read_all(small_checkpoint)
    small_checkpoint.write_bytes(data)
    with np.load(small_checkpoint) as f:
        entries = {name: f[name] for name in f.files}
    np.savez(small_checkpoint, **entries, extra=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"is not a readable checkpoint: ValueError: Object arrays "
                                         r"cannot be loaded when allow_pickle=False"):
        read_all(small_checkpoint)


def sweep_offsets(data: bytes, stride: int = 6) -> list[int]:
    """Every byte of the zip structure (local and central headers, names, the end records),
    and every ``stride``-th byte inside the entries (.npy headers, array data, the metadata's
    text): all of those are covered by the same CRC-32, so a sample shows the rule. The full
    sweep is ``test_every_corrupted_byte`` (-m slow)."""
    inside = set()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            local = info.header_offset
            name_len, extra_len = struct.unpack("<HH", data[local + 26:local + 30])
            start = local + 30 + name_len + extra_len
            inside |= {i for i in range(start, start + info.compress_size) if (i - start) % stride}
    return [i for i in range(len(data)) if i not in inside]


def assert_each_corruption_refused_or_harmless(path, offsets):
    good = path.read_bytes()
    want_state, want_meta, want_config = read_all(path)
    outcomes = {"refused": 0, "identical": 0}
    for i in offsets:
        path.write_bytes(good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:])
        try:
            state, meta, saved = read_all(path)
        except ValueError as err:        # refused: it must name the file, nothing else escapes
            assert str(err).startswith((f"load_checkpoint: {path} ", f"fit: {path} ")), (i, err)
            outcomes["refused"] += 1
            continue
        assert tree_equal(state, want_state) and meta == want_meta and saved == want_config, i
        outcomes["identical"] += 1
    return outcomes


def test_corrupted_bytes_are_refused_or_change_nothing(small_checkpoint):
    """Flip each byte of the structure and a sample of the data: the file is refused with a
    message naming it, or reads back exactly as written (bytes zipfile does not use: times,
    the local copies of sizes and CRC). Any other exception fails the test."""
    offsets = sweep_offsets(small_checkpoint.read_bytes())
    outcomes = assert_each_corruption_refused_or_harmless(small_checkpoint, offsets)
    assert sum(outcomes.values()) == len(offsets) and min(outcomes.values()) > 0, outcomes


@pytest.mark.slow
def test_every_corrupted_byte(small_checkpoint):
    n = len(small_checkpoint.read_bytes())
    outcomes = assert_each_corruption_refused_or_harmless(small_checkpoint, range(n))
    assert sum(outcomes.values()) == n


def test_check_exists_and_the_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^load_checkpoint: no checkpoint at .*nothing; "
                                                r"hint$"):
        checkpoint.check_exists(tmp_path / "nothing", "; hint")
