"""The embedded digits: a stroke font and `synthetic_digits`, which renders it with random styles.

Each image draws one glyph of the font (2-3 styles per digit) with its own random slant,
rotation, scale, position, stroke width, smooth (elastic) warp of the pen path and pixel noise,
as a 28 x 28 grayscale uint8 image. 70,000 images take a few seconds.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .. import _shapes

IMAGE_SIZE = 28  # images are IMAGE_SIZE x IMAGE_SIZE pixels, as in MNIST
NUM_CLASSES = 10  # the digits 0..9


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
