"""Datasets: the `Dataset` type, `load_dataset` (embedded digits, MNIST-format files), batches.

Every dataset is a `Dataset` of numpy arrays, channels-last and batch first like the rest of
jaxcnn: images `x: (N, 28, 28, 1)` float32 in [0, 1], labels `y: (N,)` int32 in
0..num_classes-1.

* ``"synthetic"`` (the default) needs no files and no network: 28 x 28 grayscale digits drawn
  from a stroke font (`_font`), each one rendered with its own random slant, rotation,
  scale, position, stroke width, smooth (elastic) warp of the pen path and pixel noise.
  70,000 images take a few seconds.
* ``"mnist"`` and ``"fashion_mnist"`` are read from the four IDX files of the original
  distribution (`_idx`), found in a directory or downloaded once into `cache_dir()`, each
  download checked against its published SHA-256 before it is kept (`_download`).

`batches` cuts arrays into mini-batches whose order is a pure function of (seed, epoch), so a
resumed run sees the very same batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from .. import _shapes
from ._download import MIRRORS_ENV, DownloadError, cache_dir, fetch_file
from ._font import IMAGE_SIZE, NUM_CLASSES, synthetic_digits
from ._idx import find_idx_files, read_idx

__all__ = [
    "DATASETS", "IMAGE_SIZE", "NUM_CLASSES", "MIRRORS_ENV", "Dataset", "DownloadError",
    "load_dataset", "synthetic_digits", "read_idx", "fetch_file", "cache_dir", "batches",
    "batch_indices", "num_batches",
]

DATASETS = ("synthetic", "mnist", "fashion_mnist")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split of images and integer labels, as numpy arrays.

    Attributes:
      name: one of `DATASETS`.
      train_x, test_x: images `(N, 28, 28, 1)` float32, values in [0, 1].
      train_y, test_y: labels `(N,)` int32, values in 0..num_classes-1.
      num_classes: number of classes (10 for all three datasets).

    Equality is identity (`eq=False`): comparing datasets element-wise is `np.array_equal`'s job.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int = NUM_CLASSES

    def __post_init__(self):
        for split in ("train", "test"):
            _check_split(
                getattr(self, f"{split}_x"), getattr(self, f"{split}_y"), split, self.num_classes
            )

    def __repr__(self):
        return (
            f"Dataset(name={self.name!r}, train_x={self.train_x.shape}, "
            f"test_x={self.test_x.shape}, num_classes={self.num_classes})"
        )


def _check_split(x, y, split, num_classes):
    """Raise unless `x`, `y` are one split of a `Dataset`: shapes, dtypes and label range."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(
            f"Dataset: {split}_x must be a float32 numpy array of shape (N, H, W, 1); got "
            f"{type(x).__name__} with dtype {getattr(x, 'dtype', None)} and shape "
            f"{getattr(x, 'shape', None)}"
        )
    if not isinstance(y, np.ndarray) or y.dtype != np.int32 or y.shape != x.shape[:1]:
        raise ValueError(
            f"Dataset: {split}_y must be an int32 numpy array of shape ({x.shape[0]},) to match "
            f"{split}_x {x.shape}; got {type(y).__name__} with dtype {getattr(y, 'dtype', None)} "
            f"and shape {getattr(y, 'shape', None)}"
        )
    _shapes.check_label_values("Dataset", f"{split}_y", y, num_classes)


def load_dataset(
    name: str = "synthetic",
    *,
    data_dir=None,
    download: bool = True,
    seed: int = 0,
    n_train: int = 60000,
    n_test: int = 10000,
) -> Dataset:
    """Load one of `DATASETS` as a `Dataset`.

    Args:
      name: ``"synthetic"`` (generated in memory, no files), ``"mnist"`` or ``"fashion_mnist"``.
      data_dir: directory holding the four IDX files (``train-images-idx3-ubyte.gz``, ...,
        gzipped or plain), either directly or in ``data_dir/<name>/``. When None, the files are
        looked for in ``cache_dir()/<name>/``. Ignored for ``"synthetic"``.
      download: when none of the files is found, download them (into ``data_dir/<name>/`` or
        ``cache_dir()/<name>/``) from the mirrors, checking each SHA-256: all four, or none
        (what a failed download created is removed). A cache missing some of the files is
        completed; a `data_dir` holding some but not all of them is refused instead, since
        its files may be of another origin than the download (see `_idx.find_idx_files`).
      seed: seed of the synthetic digits; train and test use seeds derived from it, so they
        never share an image. Ignored for the IDX datasets, which have a fixed order.
      n_train, n_test: number of examples. Synthetic digits are generated to exactly this
        size; for IDX datasets these are caps: the first ``n`` examples of each file.

    Raises:
      FileNotFoundError: IDX files missing and `download` is False, every mirror failed, or
        `data_dir` holds only some of them; the message names the missing files, the
        directories searched (and what one of them holds), and where to get them.
      ValueError: unknown `name`, bad counts, or a corrupt IDX file (the message names it).
    """
    name = _shapes.check_choice("load_dataset", "name", name, DATASETS)
    n_train = _shapes.check_int("load_dataset", "n_train", n_train, minimum=1)
    n_test = _shapes.check_int("load_dataset", "n_test", n_test, minimum=1)
    seed = _shapes.check_int("load_dataset", "seed", seed, minimum=0)
    if name == "synthetic":
        return _load_synthetic(seed, n_train, n_test)
    return _load_idx_dataset(name, data_dir, download, n_train, n_test)


def _to_float_images(images: np.ndarray) -> np.ndarray:
    """uint8 images `(N, 28, 28)` -> float32 `(N, 28, 28, 1)` in [0, 1]."""
    return (images.astype(np.float32) / np.float32(255.0))[..., None]


# ------------------------------------------------------------------------------------------
# The two kinds of dataset.


def _load_synthetic(seed, n_train, n_test) -> Dataset:
    """Render the synthetic train and test splits from seeds derived from `seed`."""
    train_images, train_labels = synthetic_digits(n_train, seed=_split_seed(seed, 0))
    test_images, test_labels = synthetic_digits(n_test, seed=_split_seed(seed, 1))
    return Dataset(
        "synthetic",
        _to_float_images(train_images),
        train_labels,
        _to_float_images(test_images),
        test_labels,
    )


def _split_seed(seed, split: int) -> int:
    """An independent 63-bit seed for one split (0 train, 1 test) of dataset seed `seed`."""
    state = np.random.SeedSequence([seed, split]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _load_idx_dataset(name, data_dir, download, n_train, n_test) -> Dataset:
    """Find (or download) the four IDX files of `name` and read them into a `Dataset`."""
    paths = find_idx_files(name, data_dir, download)
    train_x, train_y = _read_idx_split(paths["train_x"], paths["train_y"], n_train)
    test_x, test_y = _read_idx_split(paths["test_x"], paths["test_y"], n_test)
    return Dataset(name, train_x, train_y, test_x, test_y)


def _read_idx_split(images_path, labels_path, limit):
    """Read one split's images and labels; check their shapes, types, count and range."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"load_dataset: {images_path} must hold uint8 images of shape (N, {IMAGE_SIZE}, "
            f"{IMAGE_SIZE}); got {images.dtype} of shape {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"load_dataset: {labels_path} must hold integer labels of shape (N,); got "
            f"{labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"load_dataset: {images_path} has {len(images)} images but {labels_path} has "
            f"{len(labels)} labels; the counts must match"
        )
    _shapes.check_label_values("load_dataset", f"the labels of {labels_path}", labels,
                               NUM_CLASSES)
    return _to_float_images(images[:limit]), labels[:limit].astype(np.int32)


# ------------------------------------------------------------------------------------------
# Mini-batches.


def batches(
    x,
    y,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mini-batches `(x[idx], y[idx])` covering one epoch, as numpy arrays.

    The order is a pure function of (seed, epoch) -- the permutation is
    ``np.random.default_rng([seed, epoch]).permutation(n)`` -- so a run resumed at some epoch
    sees exactly the batches it would have seen. With `drop_last` (training) every batch has
    `batch_size` examples, so a jitted step compiles once, and the last ``n % batch_size``
    examples of this epoch's order are left out; evaluate with ``drop_last=False`` to get a
    final partial batch and see every example exactly once.

    Args:
      x, y: arrays with the same first dimension n (e.g. images `(N, 28, 28, 1)` and labels).
      batch_size: an int, 1 <= batch_size (<= n when `drop_last`, since otherwise no batch is
        produced).
      seed, epoch: non-negative ints choosing the permutation.
      shuffle: False keeps the stored order (seed and epoch are then unused).
      drop_last: leave out the final partial batch.

    Returns:
      an iterator over ``num_batches(n, batch_size, drop_last=drop_last)`` pairs. Arguments are
      checked when `batches` is called, not at the first `next`.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(
            f"batches: x and y must have the same first dimension; got x of shape {x.shape} "
            f"and y of shape {y.shape}"
        )
    n = len(x)
    indices = _batch_indices("batches", n, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                             drop_last=drop_last)
    return ((x[idx], y[idx]) for idx in indices)


def batch_indices(n: int, batch_size: int, *, seed: int = 0, epoch: int = 0,
                  shuffle: bool = True, drop_last: bool = True) -> Iterator[np.ndarray]:
    """The example indices of the batches of :func:`batches` (the same order and rules), as
    int arrays: to load only part of each batch, e.g. the rows one process of a multi-host run
    feeds to its devices (``x[idx[rows]]``)."""
    n = _shapes.check_int("batch_indices", "n", n, minimum=0)
    return _batch_indices("batch_indices", n, batch_size, seed=seed, epoch=epoch,
                          shuffle=shuffle, drop_last=drop_last)


def _batch_indices(fn, n, batch_size, *, seed, epoch, shuffle, drop_last):
    batch_size = _shapes.check_int(fn, "batch_size", batch_size, minimum=1)
    if drop_last and batch_size > n:
        raise ValueError(
            f"{fn}: batch_size ({batch_size}) must be <= the number of examples ({n}) when "
            f"drop_last=True, or no batch would be produced"
        )
    seed = _shapes.check_int(fn, "seed", seed, minimum=0)
    epoch = _shapes.check_int(fn, "epoch", epoch, minimum=0)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    count = num_batches(n, batch_size, drop_last=drop_last)
    return _slices(order, batch_size, count)


def _slices(order, batch_size, count):
    """Yield `count` consecutive pieces of `batch_size` (the last may be shorter) of `order`."""
    for i in range(count):
        yield order[i * batch_size : (i + 1) * batch_size]


def num_batches(n: int, batch_size: int, *, drop_last: bool = True) -> int:
    """Number of batches `batches` yields for n examples: floor(n / b), or ceil with a partial."""
    n = _shapes.check_int("num_batches", "n", n, minimum=0)
    batch_size = _shapes.check_int("num_batches", "batch_size", batch_size, minimum=1)
    return n // batch_size if drop_last else -(-n // batch_size)
