"""Datasets: the embedded synthetic digits, MNIST-format IDX files, checked downloads, batches.

Every dataset is a `Dataset` of numpy arrays, channels-last and batch first like the rest of
jaxcnn: images `x: (N, 28, 28, 1)` float32 in [0, 1], labels `y: (N,)` int32 in
0..num_classes-1.

* ``"synthetic"`` (the default) needs no files and no network: 28 x 28 grayscale digits drawn
  from a stroke font defined below, each one rendered with its own random slant, rotation,
  scale, position, stroke width, smooth (elastic) warp of the pen path and pixel noise.
  70,000 images take a few seconds.
* ``"mnist"`` and ``"fashion_mnist"`` are read from the four IDX files of the original
  distribution, found in a directory or downloaded once into `cache_dir()`, each download
  checked against its published SHA-256 before it is kept.

`batches` cuts arrays into mini-batches whose order is a pure function of (seed, epoch), so a
resumed run sees the very same batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import http.client
import os
import pathlib
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from . import _io, _shapes

DATASETS = ("synthetic", "mnist", "fashion_mnist")

IMAGE_SIZE = 28
NUM_CLASSES = 10


class DownloadError(OSError):
    """No mirror delivered a file whose SHA-256 matches; the message lists every URL tried."""


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
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"Dataset: {split}_y values must be in 0..{num_classes - 1}; got values from "
            f"{y.min()} to {y.max()}"
        )


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
      download: when the files are not found, download them (into ``data_dir/<name>/`` or
        ``cache_dir()/<name>/``) from the mirrors, checking each SHA-256.
      seed: seed of the synthetic digits; train and test use seeds derived from it, so they
        never share an image. Ignored for the IDX datasets, which have a fixed order.
      n_train, n_test: number of examples. Synthetic digits are generated to exactly this
        size; for IDX datasets these are caps: the first ``n`` examples of each file.

    Raises:
      FileNotFoundError: IDX files missing and `download` is False or every mirror failed; the
        message lists the expected files, the directories searched, and where to get them.
      ValueError: unknown `name`, bad counts, or a corrupt IDX file (the message names it).
    """
    if name not in DATASETS:
        raise ValueError(f"load_dataset: name must be one of {DATASETS}; got {name!r}")
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
# The embedded dataset: synthetic digits.


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


def synthetic_digits(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Render `n` synthetic handwritten-style digits.

    Each image draws one glyph of the stroke font (`_GLYPHS`, 2-3 styles per digit) and renders
    it with its own random style (`_sample_style`): the pen path is warped smoothly and each
    stroke nudged, then slanted, rotated, scaled and placed in the 28 x 28 frame; the ink is
    deposited along the path, blurred into an anti-aliased stroke of random width, and pixel
    noise is added. Labels are exactly balanced (``n // 10`` or one more of each digit) and
    shuffled.

    Args:
      n: number of images, >= 0.
      seed: any non-negative int; the output is a pure function of (n, seed).

    Returns:
      images `(n, 28, 28)` uint8, labels `(n,)` int32 in 0..9.
    """
    n = _shapes.check_int("synthetic_digits", "n", n, minimum=0)
    seed = _shapes.check_int("synthetic_digits", "seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    font = _font()
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)
    style = _sample_style(rng, labels, font)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    starts = range(0, n, _RENDER_CHUNK)
    for start, chunk_rng in zip(starts, rng.spawn(len(starts))):
        stop = min(start + _RENDER_CHUNK, n)
        images[start:stop] = _render(style.slice(start, stop), font, chunk_rng)
    return images, labels


_RENDER_CHUNK = 1024  # images rendered at once; bounds memory to a few tens of MB


# The stroke font. Glyph coordinates: x to the right in [-0.3, 0.3], y *down* in [-0.5, 0.5]
# (the glyph's height is 1). Angles of arcs are in degrees, measured from +x towards +y, so
# increasing angles go clockwise on screen. Each glyph is a tuple of strokes; each stroke an
# (K, 2) array of densely sampled points along the pen path.


def _line(*points) -> np.ndarray:
    """A polyline through `points`, sampled densely."""
    points = np.asarray(points, np.float64)
    pieces = [
        a + np.linspace(0.0, 1.0, 32, endpoint=False)[:, None] * (b - a)
        for a, b in zip(points[:-1], points[1:])
    ]
    return np.concatenate(pieces + [points[-1:]])


def _arc(cx, cy, rx, ry, start, stop) -> np.ndarray:
    """An elliptical arc from angle `start` to `stop` (degrees, clockwise on screen)."""
    angles = np.radians(np.linspace(start, stop, 128))
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)


def _curve(*points) -> np.ndarray:
    """A Catmull-Rom spline through `points` (it passes through every one)."""
    p = np.asarray(points, np.float64)
    p = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
    t = np.linspace(0.0, 1.0, 32, endpoint=False)[:, None]
    pieces = []
    for p0, p1, p2, p3 in zip(p[:-3], p[1:-2], p[2:-1], p[3:]):
        pieces.append(
            0.5
            * (
                2 * p1
                + (p2 - p0) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (3 * p1 - p0 - 3 * p2 + p3) * t**3
            )
        )
    return np.concatenate(pieces + [p[-2:-1]])


def _join(*parts) -> np.ndarray:
    """One stroke made of consecutive pieces (the pen does not lift between them)."""
    return np.concatenate(parts)


_GLYPHS = {
    0: (
        (_arc(0, 0, 0.26, 0.48, -90, 270),),
        (_arc(0, 0, 0.21, 0.48, -100, 262),),
    ),
    1: (
        (_line((0, -0.5), (0, 0.5)),),
        (_line((-0.16, -0.3), (0, -0.5), (0, 0.5)),),
        (_line((-0.16, -0.3), (0, -0.5), (0, 0.5)), _line((-0.16, 0.5), (0.16, 0.5))),
    ),
    2: (
        (
            _join(
                _arc(0, -0.24, 0.26, 0.26, -165, 30),
                _line((0.22, -0.11), (-0.27, 0.5), (0.28, 0.5)),
            ),
        ),
        (
            _curve(
                (-0.24, -0.3), (-0.05, -0.5), (0.22, -0.4), (0.2, -0.1), (-0.05, 0.2),
                (-0.27, 0.48),
            ),
            _line((-0.27, 0.48), (0.28, 0.46)),
        ),
    ),
    3: (
        (_join(_arc(0, -0.26, 0.23, 0.24, -160, 100), _arc(0, 0.22, 0.27, 0.28, -105, 160)),),
        (
            _join(
                _line((-0.22, -0.5), (0.22, -0.5), (-0.03, -0.08)),
                _arc(0, 0.2, 0.27, 0.3, -100, 160),
            ),
        ),
    ),
    4: (
        (_line((0.12, -0.5), (-0.28, 0.17), (0.3, 0.17)), _line((0.12, -0.5), (0.12, 0.5))),
        (_line((-0.18, -0.5), (-0.26, 0.1), (0.28, 0.1)), _line((0.14, -0.32), (0.14, 0.5))),
    ),
    5: (
        (
            _line((0.26, -0.5), (-0.16, -0.5)),
            _join(_line((-0.16, -0.5), (-0.21, -0.04)), _arc(0, 0.2, 0.26, 0.28, -135, 160)),
        ),
        (
            _line((0.24, -0.5), (-0.18, -0.5)),
            _join(
                _line((-0.18, -0.5), (-0.22, -0.05)),
                _curve((-0.22, -0.05), (0.1, -0.1), (0.27, 0.15), (0.15, 0.45), (-0.25, 0.42)),
            ),
        ),
    ),
    6: (
        (
            _join(
                _curve((0.2, -0.48), (-0.05, -0.42), (-0.22, -0.15), (-0.26, 0.2)),
                _arc(0, 0.22, 0.25, 0.26, 180, 540),
            ),
        ),
        (_join(_line((0.15, -0.5), (-0.2, 0.1)), _arc(0, 0.22, 0.24, 0.26, 200, 560)),),
    ),
    7: (
        (_line((-0.27, -0.5), (0.27, -0.5), (-0.06, 0.5)),),
        (_line((-0.27, -0.5), (0.27, -0.5), (-0.06, 0.5)), _line((-0.05, 0.0), (0.25, 0.0))),
        (
            _join(
                _line((-0.27, -0.42), (-0.25, -0.5), (0.27, -0.5)),
                _curve((0.27, -0.5), (0.08, -0.05), (0.0, 0.5)),
            ),
        ),
    ),
    8: (
        (_arc(0, -0.26, 0.21, 0.24, 90, 450), _arc(0, 0.23, 0.26, 0.27, -90, 270)),
        (
            _curve(
                (0.2, -0.4), (0, -0.5), (-0.2, -0.38), (-0.15, -0.15), (0.2, 0.15), (0.22, 0.38),
                (0, 0.5), (-0.22, 0.38), (-0.2, 0.15), (0.15, -0.15), (0.2, -0.4),
            ),
        ),
    ),
    9: (
        (_join(_arc(0, -0.22, 0.25, 0.27, 0, 360), _line((0.25, -0.22), (0.22, 0.5))),),
        (
            _join(
                _arc(0, -0.22, 0.25, 0.27, 0, 360),
                _curve((0.25, -0.22), (0.24, 0.15), (0.1, 0.42), (-0.15, 0.48)),
            ),
        ),
    ),
}

_PEN_SPACING = 0.02  # distance between ink points along a stroke, in glyph heights


@dataclasses.dataclass(frozen=True)
class _Font:
    """The glyphs of `_GLYPHS` as padded arrays, one row per glyph (one style of a digit).

    Pen positions are resampled every `_PEN_SPACING` along each stroke and padded to a common
    length P; `valid` is False on the padding.
    """

    x: np.ndarray  # (G, P) float32 pen positions, glyph units
    y: np.ndarray  # (G, P)
    stroke: np.ndarray  # (G, P) int: which stroke of the glyph each point belongs to
    along: np.ndarray  # (G, P) float32: position along its stroke, 0 at the start, 1 at the end
    valid: np.ndarray  # (G, P) bool
    label: np.ndarray  # (G,) the digit
    first: np.ndarray  # (10,) first row of each digit
    count: np.ndarray  # (10,) number of rows (styles) of each digit
    max_strokes: int


def _resample(stroke: np.ndarray, spacing: float) -> np.ndarray:
    """Points every `spacing` of arc length along a densely sampled stroke (ends included)."""
    length = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(stroke, axis=0), axis=1))])
    count = max(2, int(np.ceil(length[-1] / spacing)) + 1)
    at = np.linspace(0.0, length[-1], count)
    return np.stack([np.interp(at, length, stroke[:, 0]), np.interp(at, length, stroke[:, 1])], 1)


@functools.cache
def _font() -> _Font:
    """Resample every glyph of `_GLYPHS` and pack them into one padded `_Font`."""
    rows = [
        (digit, [_resample(s, _PEN_SPACING) for s in glyph])
        for digit in range(NUM_CLASSES)
        for glyph in _GLYPHS[digit]
    ]
    shape = (len(rows), max(sum(len(s) for s in strokes) for _, strokes in rows))
    points = np.zeros(shape + (2,), np.float32)
    stroke = np.zeros(shape, np.int32)
    along = np.zeros(shape, np.float32)
    valid = np.zeros(shape, bool)
    for row, (_, strokes) in enumerate(rows):
        start = 0
        for k, s in enumerate(strokes):
            stop = start + len(s)
            points[row, start:stop] = s
            stroke[row, start:stop] = k
            along[row, start:stop] = np.linspace(0.0, 1.0, len(s))
            valid[row, start:stop] = True
            start = stop
    label = np.array([digit for digit, _ in rows], np.int32)
    count = np.bincount(label, minlength=NUM_CLASSES)
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    max_strokes = max(len(strokes) for _, strokes in rows)
    x, y = points[..., 0], points[..., 1]
    return _Font(x, y, stroke, along, valid, label, first, count, max_strokes)


# Ranges of the random style. Tuned so that LeNet-5 (Adam 1e-3, batch 128) passes 99% test
# accuracy within three epochs while logistic regression on the raw pixels stays below 80%:
# random position (_SHIFT) is what defeats a linear model; rotation and warp cost the CNN most.
_STROKE_NUDGE = 0.03  # std of each stroke's own shift, glyph heights
_TRIM = 0.05  # up to this fraction of the first stroke's start and the last stroke's end is cut
_WARP_WAVES = 3  # sine waves summed per axis in the smooth warp of the pen path
_WARP_AMPLITUDE = 0.025  # amplitude of each wave, glyph heights
_WARP_FREQUENCY = (0.4, 1.4)  # cycles per glyph height
_ROTATION = 14.0  # degrees, either way
_SLANT = (-0.15, 0.45)  # horizontal shear (x += slant * height above centre)
_HEIGHT = (15.0, 21.0)  # glyph height in pixels
_ASPECT = (0.75, 1.3)  # extra horizontal stretch
_SHIFT = 4.0  # pixels the glyph may move from the centre, each axis, if it stays inside
_MARGIN = 1.5  # pixels kept free between the pen path and the border
_BLUR = 0.85  # std of the ink's Gaussian spread, pixels
_INK = (3.0, 25.0)  # log-uniform ink density: sets the stroke width (about 2 to 5 pixels)
_CONTRAST = (0.8, 1.0)  # peak intensity
_NOISE = 0.06  # maximal std of the additive pixel noise


@dataclasses.dataclass(frozen=True)
class _Style:
    """Per-image random style parameters; every field has the image index as axis 0."""

    glyph: np.ndarray  # (n,) row of `_Font`
    nudge: np.ndarray  # (n, strokes, 2) shift of each stroke, glyph heights
    trim: np.ndarray  # (n, 2) fraction cut from the start and end of the pen path
    warp: np.ndarray  # (n, axis, wave, 4): per moved axis and wave: (fx, fy, phase, amplitude)
    rotation: np.ndarray  # (n,) radians
    slant: np.ndarray  # (n,)
    height: np.ndarray  # (n,) pixels
    aspect: np.ndarray  # (n,)
    shift: np.ndarray  # (n, 2) in [-1, 1], scaled by the room available
    ink: np.ndarray  # (n,)
    contrast: np.ndarray  # (n,)
    noise: np.ndarray  # (n,)

    def slice(self, start, stop) -> "_Style":
        """The styles of images start..stop-1."""
        fields = dataclasses.fields(self)
        return _Style(**{f.name: getattr(self, f.name)[start:stop] for f in fields})


def _sample_style(rng: np.random.Generator, labels: np.ndarray, font: _Font) -> _Style:
    """Draw one random `_Style` per label (a glyph of that digit and its rendering)."""
    n = len(labels)

    def uniform(low, high, *shape):
        return rng.uniform(low, high, shape).astype(np.float32)

    glyph = font.first[labels] + (rng.random(n) * font.count[labels]).astype(np.int64)
    frequency = 2 * np.pi * uniform(*_WARP_FREQUENCY, n, 2, _WARP_WAVES)  # radians per height
    direction = uniform(0, 2 * np.pi, n, 2, _WARP_WAVES)
    warp = np.stack(
        [
            frequency * np.cos(direction),
            frequency * np.sin(direction),
            uniform(0, 2 * np.pi, n, 2, _WARP_WAVES),
            uniform(-_WARP_AMPLITUDE, _WARP_AMPLITUDE, n, 2, _WARP_WAVES),
        ],
        axis=-1,
    )
    return _Style(
        glyph=glyph,
        nudge=_STROKE_NUDGE * rng.standard_normal((n, font.max_strokes, 2), dtype=np.float32),
        trim=uniform(0, _TRIM, n, 2),
        warp=warp,
        rotation=np.radians(uniform(-_ROTATION, _ROTATION, n)),
        slant=uniform(*_SLANT, n),
        height=uniform(*_HEIGHT, n),
        aspect=uniform(*_ASPECT, n),
        shift=uniform(-1, 1, n, 2),
        ink=np.exp(uniform(*np.log(_INK), n)),
        contrast=uniform(*_CONTRAST, n),
        noise=uniform(0, _NOISE, n),
    )


def _render(style: _Style, font: _Font, rng: np.random.Generator) -> np.ndarray:
    """Render one chunk of styles to uint8 images `(n, 28, 28)`."""
    x, y, stroke, valid = _pen_path(style, font)
    x, y = _place(x, y, valid, style)
    ink = _splat(x, y, _ink_weights(x, y, stroke, valid))
    return _develop(ink, style, rng)


def _pen_path(style: _Style, font: _Font):
    """Glyph points `(n, P)` after the stroke nudges, the trims and the smooth warp."""
    x, y = font.x[style.glyph], font.y[style.glyph]
    stroke, along = font.stroke[style.glyph], font.along[style.glyph]
    valid = font.valid[style.glyph]
    rows = np.arange(len(x))[:, None]
    x = x + style.nudge[..., 0][rows, stroke]
    y = y + style.nudge[..., 1][rows, stroke]
    # Cut the ends of the whole pen path (the first stroke's start, the last stroke's end).
    last = np.max(np.where(valid, stroke, 0), axis=1, keepdims=True)
    cut_start = (stroke == 0) & (along < style.trim[:, :1])
    cut_end = (stroke == last) & (along > 1 - style.trim[:, 1:])
    valid = valid & ~cut_start & ~cut_end
    # Smooth warp: each axis moves by a sum of a few long sine waves over the glyph plane.
    dx, dy = np.zeros_like(x), np.zeros_like(y)
    for d, axis in ((dx, 0), (dy, 1)):
        for w in range(_WARP_WAVES):
            fx, fy, phase, amplitude = (style.warp[:, axis, w, k, None] for k in range(4))
            d += amplitude * np.sin(fx * x + fy * y + phase)
    return x + dx, y + dy, stroke, valid


def _place(x, y, valid, style: _Style):
    """Glyph units -> pixel coordinates (x = column, y = row): slant, stretch, rotate, move."""
    x = x * style.aspect[:, None] - style.slant[:, None] * y
    cos, sin = np.cos(style.rotation)[:, None], np.sin(style.rotation)[:, None]
    height = style.height[:, None]
    x, y = height * (cos * x - sin * y), height * (sin * x + cos * y)
    # Centre the pen path's bounding box, then move it at random as far as it still fits.
    placed = []
    for z, shift in ((x, style.shift[:, 0]), (y, style.shift[:, 1])):
        low = np.min(np.where(valid, z, np.inf), axis=1)
        high = np.max(np.where(valid, z, -np.inf), axis=1)
        room = np.maximum((IMAGE_SIZE - 1 - 2 * _MARGIN - (high - low)) / 2, 0)
        offset = (IMAGE_SIZE - 1) / 2 - (low + high) / 2 + shift * np.minimum(room, _SHIFT)
        placed.append(z + offset[:, None].astype(np.float32))
    return placed


def _ink_weights(x, y, stroke, valid):
    """Ink per point: half the pen-path length to each neighbour on the same stroke (pixels)."""
    joined = (stroke[:, 1:] == stroke[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    step = np.where(joined, np.hypot(np.diff(x, axis=1), np.diff(y, axis=1)), 0)
    weights = np.zeros(x.shape, np.float32)
    weights[:, 1:] += 0.5 * step
    weights[:, :-1] += 0.5 * step
    return weights


_FINE = 2 * IMAGE_SIZE  # ink is collected on a grid twice as fine as the image


def _splat(x, y, weights):
    """Collect each point's ink in its cell of the fine grid -> `(n, 56, 56)` ink per cell.

    Fine cell k spans pixel coordinates [k/2 - 1/2, k/2); ink falling outside the frame is
    kept in the border cells.
    """
    n = len(x)
    col = np.clip((2 * x + 1).astype(np.int64), 0, _FINE - 1)
    row = np.clip((2 * y + 1).astype(np.int64), 0, _FINE - 1)
    cell = (np.arange(n)[:, None] * _FINE + row) * _FINE + col
    ink = np.bincount(cell.ravel(), weights.ravel(), n * _FINE * _FINE)
    return ink.astype(np.float32).reshape(n, _FINE, _FINE)


@functools.cache
def _blur_matrix() -> np.ndarray:
    """`G (28, 56)`: `G @ ink @ G.T` spreads fine-grid ink into a 28 x 28 Gaussian blur.

    Entry (i, k) is the Gaussian (std `_BLUR`, unit mass) at pixel i from the centre of fine
    cell k, (2k - 1) / 4 in pixel coordinates.
    """
    distance = np.arange(IMAGE_SIZE)[:, None] - (2 * np.arange(_FINE)[None, :] - 1) / 4
    g = np.exp(-0.5 * (distance / _BLUR) ** 2) / (np.sqrt(2 * np.pi) * _BLUR)
    return g.astype(np.float32)


def _develop(ink, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """Fine-grid ink -> uint8 image: blur, saturate (1 - exp(-ink * density)), noise, quantize."""
    g = _blur_matrix()
    density = g @ ink @ g.T
    image = style.contrast[:, None, None] * (1 - np.exp(-style.ink[:, None, None] * density))
    noise = rng.random(image.shape, dtype=np.float32) * 2 - 1  # uniform, std 1/sqrt(3)
    image += np.float32(np.sqrt(3)) * style.noise[:, None, None] * noise
    return np.rint(255 * np.clip(image, 0.0, 1.0)).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: IDX files.

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

# IDX type code (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzipped or plain; gzip is recognised by its content) into an array.

    The format: a magic number of four bytes -- two zero bytes, a type code (0x08 uint8,
    0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64) and the number of
    dimensions -- then each dimension as a big-endian uint32, then the data, big-endian, in
    C order.

    Returns:
      an array of the file's shape and type, in native byte order.

    Raises:
      ValueError: naming the file, for a corrupt gzip stream, a bad magic number, an unknown
        type code, a truncated header, or data that is shorter or longer than the dimensions
        say.
    """
    path = pathlib.Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(
            f"read_idx: {path} is truncated: an IDX file starts with a 4-byte magic number; "
            f"the file has {len(raw)} bytes"
        )
    if raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"read_idx: {path} has a bad magic number 0x{raw[:4].hex()}: expected two zero "
            f"bytes, a type code in {{{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}}} and the "
            f"number of dimensions (e.g. 0x00000803 for uint8 images)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"read_idx: {path} is truncated: its magic number announces {ndim} dimensions, "
            f"which need a {header}-byte header; the file has {len(raw)} bytes"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        problem = "is truncated" if len(raw) - header < expected else "is too long"
        raise ValueError(
            f"read_idx: {path} {problem}: dimensions {shape} of {dtype.name} need {expected} "
            f"bytes of data after the {header}-byte header; got {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _read_bytes(path: pathlib.Path) -> bytes:
    """The bytes of `path`, decompressed if it is gzipped (starts with 0x1f 0x8b)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"read_idx: {path} is not a valid gzip file: {err}") from err


def _load_idx_dataset(name, data_dir, download, n_train, n_test) -> Dataset:
    """Find (or download) the four IDX files of `name` and read them into a `Dataset`."""
    paths = _find_idx_files(name, data_dir, download)
    train_x, train_y = _read_idx_split(paths["train_x"], paths["train_y"], n_train)
    test_x, test_y = _read_idx_split(paths["test_x"], paths["test_y"], n_test)
    return Dataset(name, train_x, train_y, test_x, test_y)


def _search_dirs(name, data_dir) -> list[pathlib.Path]:
    """Directories that may hold the IDX files of `name`, in the order they are tried."""
    if data_dir is None:
        return [cache_dir() / name]
    data_dir = pathlib.Path(data_dir).expanduser()
    return [data_dir / name, data_dir]


def _find_idx_files(name, data_dir, download) -> dict[str, pathlib.Path]:
    """Paths of the four IDX files of `name`: found in a search directory, or downloaded."""
    searched = _search_dirs(name, data_dir)
    for directory in searched:
        found = {key: _existing(directory / stem) for key, stem in _IDX_FILES.items()}
        if all(found.values()):
            return found
    if not download:
        raise FileNotFoundError(
            _missing_message(name, searched, "download=False, so nothing was fetched. Run with "
                             "download=True, or download them")
        )
    root = None if data_dir is None else pathlib.Path(data_dir).expanduser()
    try:
        return {
            key: fetch_file(stem + ".gz", dataset=name, cache_dir=root)
            for key, stem in _IDX_FILES.items()
        }
    except DownloadError as err:
        raise FileNotFoundError(
            _missing_message(name, searched, f"downloading failed.\n{err}\nDownload them by hand")
        ) from err


def _existing(stem: pathlib.Path):
    """`stem.gz` if it exists, else `stem` if it exists, else None."""
    for candidate in (stem.with_name(stem.name + ".gz"), stem):
        if candidate.is_file():
            return candidate
    return None


def _missing_message(name, searched, reason) -> str:
    """The FileNotFoundError text: which files, where we looked, why not fetched, where from."""
    files = ", ".join(stem + ".gz" for stem in _IDX_FILES.values())
    mirrors = _mirrors(name, None)
    others = f" (or another mirror: {', '.join(mirrors[1:])})" if len(mirrors) > 1 else ""
    return (
        f"load_dataset: the {name} files {files} (gzipped, or unzipped without .gz) were not "
        f"found in {' or '.join(str(d) for d in searched)}; {reason} from {mirrors[0]}{others} "
        f"and place them in {searched[0]}"
    )


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
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise ValueError(
            f"load_dataset: {labels_path} has labels outside 0..{NUM_CLASSES - 1}: "
            f"{labels[bad[0]]} at index {bad[0]} ({bad.size} such labels)"
        )
    return _to_float_images(images[:limit]), labels[:limit].astype(np.int32)


# ------------------------------------------------------------------------------------------
# Downloads with checksums.

_MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# Published SHA-256 of the distributed files (the same digests torchvision and the
# Fashion-MNIST downloaders pin).
_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

MIRRORS_ENV = "JAXCNN_MIRRORS"
_TIMEOUT = 30.0  # seconds without data before a mirror counts as failed
_BLOCK = 1 << 16


def cache_dir() -> pathlib.Path:
    """Where downloads are kept: ``$XDG_CACHE_HOME/jaxcnn``, or ``~/.cache/jaxcnn``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxcnn"


_default_cache_dir = cache_dir  # `fetch_file`'s argument of the same name hides the function


def fetch_file(
    filename: str,
    *,
    dataset: str,
    cache_dir=None,
    mirrors: Sequence[str] | None = None,
    sha256: str | Mapping[str, str] | None = None,
    timeout: float = _TIMEOUT,
) -> pathlib.Path:
    """Return the path of ``<cache_dir>/<dataset>/<filename>``, downloading it if needed.

    A file already there is kept if its SHA-256 matches, and fetched again otherwise. The
    mirrors are tried in order; a mirror fails on any network or HTTP error, a timeout, or a
    checksum mismatch, and the next one is tried. A download goes to a temporary file in the
    target directory which is renamed into place only after its SHA-256 matched, so the target
    is either absent or complete and verified; nothing is left behind on failure. A progress
    bar is shown when stderr is a terminal.

    Args:
      filename: e.g. ``"train-images-idx3-ubyte.gz"``.
      dataset: ``"mnist"`` or ``"fashion_mnist"``: picks the default mirrors and checksums and
        names the subdirectory.
      cache_dir: root directory; default `cache_dir()`.
      mirrors: base URLs, each joined with `filename`. Default: the ``JAXCNN_MIRRORS``
        environment variable (comma-separated base URLs) if set, else the dataset's mirrors.
      sha256: expected hex digest of this file, or a mapping filename -> digest. Default: the
        published digests.
      timeout: seconds a mirror may stay silent before it counts as failed.

    Raises:
      DownloadError: every mirror failed; the message gives each URL and why (for a checksum
        mismatch: the expected and the actual digest).
      ValueError: unknown dataset or a file without a known checksum.
    """
    if dataset not in _MIRRORS:
        raise ValueError(
            f"fetch_file: dataset must be one of {tuple(_MIRRORS)}; got {dataset!r}"
        )
    expected = _expected_sha256(filename, dataset, sha256)
    root = _default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir).expanduser()
    target = root / dataset / filename
    if target.is_file() and _sha256_of(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for base in _mirrors(dataset, mirrors):
        url = base.rstrip("/") + "/" + filename
        try:
            _download(url, target, expected, timeout)
            return target
        except (OSError, ValueError, http.client.HTTPException) as err:
            failures.append(f"  {url}: {_describe(err)}")
    raise DownloadError(
        f"fetch_file: could not download {filename} for {dataset} into {target.parent}; "
        f"every mirror failed:\n" + "\n".join(failures)
    )


def _expected_sha256(filename, dataset, sha256) -> str:
    """The digest `filename` must have: from the `sha256` override or the published table."""
    if isinstance(sha256, str):
        return sha256.lower()
    table = _SHA256[dataset] if sha256 is None else sha256
    if filename not in table:
        raise ValueError(
            f"fetch_file: no SHA-256 known for {filename!r} of {dataset}; known files: "
            f"{sorted(table)}; pass sha256= to download another file"
        )
    return table[filename].lower()


def _mirrors(dataset, mirrors) -> list[str]:
    """Base URLs to try: the `mirrors` argument, else $JAXCNN_MIRRORS, else the defaults."""
    if mirrors is None:
        env = os.environ.get(MIRRORS_ENV, "")
        mirrors = [m.strip() for m in env.split(",") if m.strip()] or _MIRRORS[dataset]
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    return list(mirrors)


class _ChecksumMismatch(ValueError):
    """A downloaded file's SHA-256 differs from the expected one."""


def _download(url, target: pathlib.Path, expected, timeout):
    """Download `url` to `target` atomically, keeping it only if its SHA-256 is `expected`."""

    def write(f):
        with urllib.request.urlopen(url, timeout=timeout) as response:
            actual = _copy_with_digest(response, f, _content_length(response), target.name)
        if actual != expected:
            raise _ChecksumMismatch(
                f"checksum mismatch: expected sha256 {expected}, got {actual}"
            )

    _io.atomic_write(target, write)


def _copy_with_digest(source, sink, total, label) -> str:
    """Copy `source` to `sink` block by block, with a progress bar; return the SHA-256."""
    digest = hashlib.sha256()
    with _progress(total, label) as bar:
        while block := source.read(_BLOCK):
            sink.write(block)
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _content_length(response):
    """The response's Content-Length as an int, or None."""
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _progress(total, label):
    """A tqdm bar on stderr, shown only when stderr is a terminal; a no-op without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    disable = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=disable)


class _NoProgress(contextlib.nullcontext):
    """Stands in for a progress bar."""

    def update(self, _):
        pass


def _sha256_of(path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _describe(err: BaseException) -> str:
    """A one-line reason for a failed download."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        return f"{type(err.reason).__name__}: {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"URLError: {err.reason}"
    if isinstance(err, _ChecksumMismatch):
        return str(err)
    return f"{type(err).__name__}: {err}"


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
