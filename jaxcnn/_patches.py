"""The manual convolution's three products, computed on the patch matrix one tile at a time.

Let ``P`` be the patch ("im2col") matrix of a convolution: row ``i`` holds the window of output
``i``, tap ``m`` and channel ``c`` at column ``(m, c)``, so that ``P[i, (m, c)] =
Xpad[i * s + m * d, c]``. The lecture's three sums are three products with ``P``
(``K`` flattened to ``(T · C_in, C_out)``, per group):

- forward ``Z = X ⋆ K``: ``Z = P · K``;
- kernel gradient ``dK = X ⋆ dZ``: ``dK = Pᵀ · dZ``;
- input gradient ``dX``: ``dX = col2im(dZ · Kᵀ)``: column block ``m`` of ``dZ · Kᵀ`` is put
  back at the positions ``i * s + m * d`` its tap read, and summed where windows overlap
  (the scatter order of ``pad(dilate_s(dZ)) ⋆ rot180(K)``; see :mod:`jaxcnn.convolution`).

``P`` is ``T`` times the size of the input, so it is never built whole. The output is cut
into *tiles* (a few images, or a few output rows of one image) and the taps into *blocks*
(see :class:`Plan`); the products run tile by tile and block by block in ``lax.fori_loop``s,
each on a piece of ``P`` small enough to stay in cache. So the memory traffic is about one
pass over the input and the output per product, the program holds one block of taps however
large the window (compile time does not grow with ``T``), and the backward keeps only ``X``
and ``K``. Where one tile covers the whole layer (the default off CPU, :mod:`jaxcnn._xla_cpu`)
no loop is emitted. The choices (tile size, block size, product kind, how a patch is built:
gathered, or cut as slices) are made in
:func:`plan` from the layer's shapes alone, with the cost model written there.

Shapes: ``x: (N, *spatial, C_in)``, ``kernel: (*window, C_in // groups, C_out)``, ``dz: (N,
*out_spatial, C_out)``, all channels-last; the group of input channel ``c`` is ``c // (C_in //
groups)``, as in ``lax.conv_general_dilated``.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _xla_cpu
from ._shapes import WindowConfig, output_spatial
from ._windows import accum_dtype, pad

# The cost model's constants. They describe this kind of hardware, not any network: they were
# read off the products themselves (benchmarks/ops.py and the measurements in the docstrings).
BLOCK_WIDTH = 512
"""Target contraction width ``taps · C_in / G`` of one block's product. Window rows are kept
whole (a row is one contiguous run of the input, gathered fast); rows are grouped into a block
while the block stays within this width. Wider blocks give the product a deeper contraction,
narrower ones fewer positions' worth of accumulation traffic per block. Measured forward,
manual / lax, on every case of benchmarks/ops.py that runs the patch product, widths 256 /
512 / 1024 in one interleaved run: 7x7 16->32 s2 2.30 / 2.34 / 2.28, 5x5 8->32 1.87 / 1.88 /
1.84, 3x3 32->64 1.41 / 1.41 / 1.40, 1-D 129 16->16 1.00 / 0.93 / 0.92, 1-D 3 d4 1.55 / 1.62
/ 1.39, 3-D 1x1x1 64->64 1.17 / 1.26 / 1.43: within the noise of each other on every case, so
the width is not what makes a layer slow."""
ROW_WIDTH = 2048
"""A single window row wider than this (a long 1-D kernel) is cut into chunks of taps: wider
contractions gain nothing and the patch tile would hold few output positions."""
FOLD_WIDTH = 2048
"""The folded form (see :func:`plan`) gives its product ``taps of the outer dims · C_out``
columns; beyond this many it is not used."""
FOLD_UNROLL = 8
"""The folded form sums ``F`` shifted slices of ``Y`` (and its kernel gradient stacks ``F``
shifted copies of ``dZ``); up to this many they are unrolled (one fused loop), beyond it they
run in a ``fori_loop`` so that compile time does not grow with the window. A 3-D 5x5x5 8->8
layer (``F = 25``), forward+backward: compile 1.12 s unrolled, 0.70 s in the loop (lax 0.19
s); time 0.15x vs 0.19x lax's. The 3-D 3x3x3 layers of benchmarks/ops.py (``F = 9``) ran
within the noise of their unrolled times."""
ELEMENTWISE_TERMS = 64
"""A layer whose per-group contraction ``taps · C_in/G`` is at most this runs as broadcast
multiply-adds of strided slices, fused by XLA into one loop over the output (also the most
terms unrolled into one block of that loop). Measured forward, manual / lax, elementwise vs
matrix product: 3x3 1->32 0.28 vs 0.75, 5x5 1->6 0.16 vs 1.01, 3x3 3->32 0.22 vs 0.33, 3x3
4->16 0.61 vs 0.93, 3x3 6->16 0.55 vs 1.13; with a wider contraction the product wins (the
input gradient of 5x5 6->16, a 5x5 16->6 correlation: 1.50 vs 0.55)."""
ELEMENTWISE_MACS = 2048
"""...and whose multiply-adds per output position and group, ``taps · C_in/G · C_out/G``, are
at most this: the elementwise form does them at the vector units' rate, the product at the
matrix kernel's, so it pays only while the patch it saves costs more than the multiply-adds it
does slowly, that is for narrow outputs. Measured forward at 28x28, batch 32, manual / lax,
elementwise vs matrix product: 3x3 3->32 (864) 0.22 vs 0.33, 3x3 7->32 (2016) 0.82 vs 0.93,
3x3 3->64 (1728) 1.10 vs 1.40; 3x3 7->64 (4032) 2.19 vs 1.56, 3x3 3->128 (3456) 1.18 vs 0.81,
3x3 7->256 2.82 vs 1.00. A single tap (a 1x1 convolution) never runs elementwise: its patch is
the (strided) input itself, nothing to save (1x1 64->32 1.59 vs 0.62, 64->256 3.11 vs 0.64)."""
SLICES_RUN = 128
"""The patch matrix is gathered (:func:`_patch_gather`: one contiguous run of ``kw · C_in``
numbers per window row) or, for a layer whose patch is one tile and whose last dim has a
stride, cut as slices of the input's phase view (:func:`_patch_slices`: runs of at most
``s · C_in`` numbers, plain copies, no per-element addresses). XLA:CPU's gather is slow on
short runs; the slices pay while the window row is at most this many numbers, and for a single
tap always. Measured forward, manual / lax, gather vs slices (one interleaved run): 7x7 3->64
s2 at 224x224 1.86 vs 1.21 and 11x11 3->64 s4 1.14 vs 0.81 (both too many slices to
compile, :data:`SLICES_PIECES`), 3x3 16->16 s2 2.57 vs 1.34, 3x3
16->16 s2 at 32x32 2.35 vs 1.53, 3x3 32->32 s2 2.35 vs 1.63, 3x3 64->64 s2 (rows of 192)
1.08 vs 1.17, 3x3 8->8 s2 0.99 vs 0.94; a single tap: 1x1 256->64 0.83 vs 0.44, 1-D 1 128->128
1.60 vs 1.23, 3-D 1x1x1 64->64 1.53 vs 1.04; a kernel dilation in the last dim (the gather
then copies one tap's ``C_in`` numbers at a time): 1-D 3 32->32 d4 2.14 vs 1.85. Without a
stride or dilation the slices are one tap of
``C_in`` numbers each and lose where channels are few (5x5 4->32 2.50 vs 3.00, 5x5 8->32
2.59 vs 3.47); in a loop over tiles they lose too (each slice then has a dynamic start: 3x3
32->64 s2 at batch 128 1.27 vs 2.79)."""
SLICES_PIECES = 8
"""...and while the patch is at most this many slices (window rows times runs per row): each
slice is compiled as its own loop, about 15 ms of compile time apiece (a 7x7 stride-2 window,
28 slices, took 0.66 s to compile forward and backward against 0.21 s gathered). For the same
reason the kernel gradient always gathers: its patch is built once more in the backward, and
there the slices bought less (forward+backward, manual / lax, kernel gradient gathered vs
sliced: 3x3 16->16 s2 0.80 vs 0.90, 7x7 3->64 s2 0.78 vs 0.95)."""
RUN_NUMBERS = 128
"""What one gathered run costs, in numbers moved (:func:`_fold_bytes`): XLA:CPU's gather
computes and checks the start of each contiguous run it copies, which costs about as much as
copying a run of this length (the same scale as :data:`SLICES_RUN`). It is what makes the
folded form pay on narrow layers with wide windows although it moves more numbers: its patch
holds one window row per position where the patch matrix holds ``kh``. Measured forward,
manual / lax, one interleaved run, runs counted as 0 (numbers alone, the earlier rule) vs
128 numbers, on the cases of benchmarks/ops.py whose form it changes: 5x5 8->32 1.90 vs 1.24,
5x5 7->32 0.70 vs 0.46, 5x5 6->16 VALID 1.57 vs 1.44, the CIFAR stack's 3x3 32->64 1.33 vs
0.99, small_cnn's 3x3 32->64 1.11 vs 0.81, 11x11 3->64 s4 1.28 vs 0.91, 3-D 3x3x3 16->32
0.53 vs 0.43; forward+backward within the noise (5x5 8->32 1.44 vs 1.55, 5x5 7->32 1.15 vs
1.27, the others equal or better). Whole networks, forward+backward: LeNet-5 0.61 vs 0.53,
CIFAR 0.61 vs 0.57, small_cnn 0.71 vs 0.68, the ResNet 0.84 vs 0.88. A patch cut as slices
(:data:`SLICES_RUN`) has no gathered runs: 3x3 16->16 s2 went 1.75 -> 2.58 when they were
counted there too."""
MATMUL_MIN_WIDTH = 8
"""Grouped layers with fewer input channels per group than this also run elementwise: their
product would be a batched product over the groups with a tiny contraction each (measured:
3x3 64->64 in 8 groups 0.21 elementwise vs 0.94, depthwise 0.05 vs 0.38)."""


class Plan(NamedTuple):
    """How one convolution is cut into tiles of the output and blocks of taps.

    A tile is ``n_tile`` images × ``r_tile`` output rows (rows of spatial dim 1); there are
    ``n_tiles × r_tiles`` of them (the last ones padded with zeros). A block holds every tap of
    the spatial dims after ``split``, ``chunk`` consecutive taps of dim ``split`` and one tap of
    each dim before it; ``split == -1`` means a single block with every tap. ``product`` is
    ``"matmul"``, ``"fold"`` or ``"elementwise"``; ``patch`` how a matrix product's patch is
    built, ``"gather"`` or ``"slices"`` (:func:`_patch`).
    """

    n_tile: int
    n_tiles: int
    r_tile: int
    r_tiles: int
    split: int
    chunk: int
    n_chunks: int
    product: str
    patch: str = "gather"

    @property
    def tiles(self) -> int:
        return self.n_tiles * self.r_tiles


def plan(x_shape, k_shape, cfg: WindowConfig, groups: int, itemsize: int, *,
         fold: bool = True) -> Plan:
    """Choose tiles, blocks and the product kind from the shapes (the cost model).

    - Product: per group the layer is a product with contraction ``taps · C_in/G`` and width
      ``C_out/G``. A short contraction with a narrow output and more than one tap
      (:data:`ELEMENTWISE_TERMS`, :data:`ELEMENTWISE_MACS`; grouped layers with few channels
      per group, :data:`MATMUL_MIN_WIDTH`) runs as broadcast multiply-adds of strided
      slices of the input (no patch, no tiles: XLA fuses the terms of a block into one loop
      over the output); the others as a matrix product on the patch matrix.
    - Folded form (``product="fold"``, :func:`_correlate_fold`): without groups, the taps of
      the dims before the last can move from the patch into the product's columns. The patch
      then holds one window row per *input* row (``kw · C_in`` numbers), the product
      ``Y = P_row · K_fold`` has ``F · C_out`` columns (``F`` taps of the outer dims), and
      ``Z`` is the sum of ``F`` shifted slices of ``Y``. An outer dim with a stride ``s`` is
      cut into blocks of ``s`` rows and a patch row holds a block's first ``min(k, s)`` rows
      (:func:`_fold_dims`), so every row of ``Y`` is used. It is chosen when it costs less
      than the patch matrix (:func:`_fold_bytes`): the typical narrow layer (3x3, 16
      to 64 channels) gathers a third of the numbers, and its product gets 3x as many
      columns; a 7x7 stride-2 layer with 16 channels in gathers 784 numbers per output
      position as one patch, about half of that folded. The cost counts gathered runs too
      (:data:`RUN_NUMBERS`).
    - Strides: where the window is a multiple of the stride, or at most the stride
      (:func:`_phases_pay`), :func:`correlate` moves every dim's stride into the channels
      (:func:`_strides_to_phases`) and plans the stride-1 layer that results.
    - Blocks: whole window rows, grouped while the block's width ``taps · C_in/G`` stays
      within :data:`BLOCK_WIDTH` (see :func:`_blocks`). A window that fits is one block.
    - Tiles: one tile (no loop) where the layer's patch is at most
      :func:`jaxcnn._xla_cpu.one_tile_bytes`; else as many whole images as keep one block's
      patch tile within :func:`jaxcnn._xla_cpu.tile_bytes`; if one image is too large, as many
      output rows; tile counts are balanced so padding wastes less than one tile.
    """
    n, c_in = x_shape[0], k_shape[-2]
    window = cfg.window
    width_in = math.prod(window) * c_in
    out = output_spatial(x_shape[1:-1], cfg)
    macs = width_in * k_shape[-1] // groups
    if ((width_in <= ELEMENTWISE_TERMS and macs <= ELEMENTWISE_MACS and math.prod(window) > 1)
            or (groups > 1 and c_in < MATMUL_MIN_WIDTH)):
        split, chunk, n_chunks = _blocks(window, c_in, ELEMENTWISE_TERMS, ELEMENTWISE_TERMS)
        return Plan(n, 1, out[0], 1, split, chunk, n_chunks, "elementwise")
    budget = _xla_cpu.tile_bytes()
    split, chunk, n_chunks = _blocks(window, c_in, BLOCK_WIDTH, ROW_WIDTH)
    taps = chunk * math.prod(window[split + 1:]) if split >= 0 else math.prod(window)
    bytes_row = math.prod(out[1:]) * taps * c_in * groups * itemsize
    if budget is None or n * out[0] * bytes_row <= _xla_cpu.one_tile_bytes():
        rows = out[0] * n
    else:
        rows = max(1, budget // bytes_row)
    if rows >= out[0]:
        n_tile, n_tiles = _cut(n, rows // out[0])
        tiles = Plan(n_tile, n_tiles, out[0], 1, split, chunk, n_chunks, "matmul")
    else:
        r_tile, r_tiles = _cut(out[0], rows)
        tiles = Plan(1, n, r_tile, r_tiles, split, chunk, n_chunks, "matmul")
    tiles = tiles._replace(patch=_patch_kind(cfg, c_in, tiles))
    costs = _fold_bytes(x_shape, k_shape, cfg, groups, out,
                        gathered=tiles.patch == "gather") if fold else None
    if costs is not None and costs[1] < costs[0]:
        per_image, fold_budget = costs[2] * itemsize, _xla_cpu.tile_bytes(folded=True)
        if fold_budget is None or per_image <= fold_budget:
            n_tile, n_tiles = (n, 1) if fold_budget is None else _cut(n, fold_budget // per_image)
            return Plan(n_tile, n_tiles, out[0], 1, -1, 1, 1, "fold")
    return tiles


def _cut(count: int, fit: int):
    """``(size, pieces)``: ``count`` images (or rows) cut into pieces of at most ``fit``
    (at least 1). A divisor of ``count`` is taken where one at least half as large as ``fit``
    exists, so that nothing is padded: the zero images of a padded last tile cost a copy of
    the whole input and of ``dZ`` (``lax.pad``), and of ``Z`` (the crop). Measured, the kernel
    gradient of 5x5 8->32 at batch 32: 7 tiles of 5 images (3 padded) 6.3 ms, 8 tiles of 4
    4.6 ms. Otherwise the pieces are balanced, the last one padded by less than one piece."""
    fit = max(1, fit)
    if fit >= count:
        return count, 1
    divisors = [d for d in range(fit, 0, -1) if count % d == 0 and 2 * d >= fit]
    if divisors:
        return divisors[0], count // divisors[0]
    pieces = -(-count // fit)
    return -(-count // pieces), pieces


def _patch_kind(cfg: WindowConfig, c_in: int, p: Plan) -> str:
    """``"slices"`` where the whole layer's patch is one tile and one block and either a
    single tap (the patch is the strided input itself) or a stride or kernel dilation in the
    last dim, with gathered runs (window rows; one tap's channels under dilation) of at most
    :data:`SLICES_RUN` numbers and at most :data:`SLICES_PIECES` slices; else ``"gather"``."""
    if p.tiles != 1 or p.split >= 0:
        return "gather"
    if math.prod(cfg.window) == 1:
        return "slices"
    row = cfg.window[-1] * c_in if cfg.dilation[-1] == 1 else c_in   # the gather's runs
    pieces = math.prod(cfg.window[:-1]) * len(_last_dim_runs(cfg))
    spread = cfg.stride[-1] > 1 or cfg.dilation[-1] > 1
    return "slices" if spread and row <= SLICES_RUN and pieces <= SLICES_PIECES else "gather"


def _fold_dims(cfg: WindowConfig):
    """Per dim before the last, ``(w, t, step)`` of the folded form: the window rows ``w`` that
    one row of the patch holds, the taps ``t`` that go into the product's columns, and the
    step between taps in ``Y``'s rows. Without a stride, ``(1, k, d)``: every input row is a
    row of ``Y``. With a stride ``s`` (and no dilation) the rows are cut into blocks of ``s``
    and a patch row holds the first ``w = min(k, s)`` rows of a block: tap ``m = a·s + r``
    of the window is row ``r`` of block ``i + a`` for output ``i`` (``t = ceil(k / s)``,
    ``step = 1``), the taps past ``k`` being zeros in the kernel ("space to depth" without
    moving the input: the gather reads the block's rows in place)."""
    return [(min(k, st), -(-k // st), 1) if st > 1 else (1, k, d)
            for k, st, d in zip(cfg.window[:-1], cfg.stride[:-1], cfg.dilation[:-1])]


def _fold_bytes(x_shape, k_shape, cfg: WindowConfig, groups: int, out, *,
                gathered: bool = True):
    """``(im2col, fold, fold per image)``: the cost per image of the patch-matrix form (the
    patch written and read) and of the folded form (window rows written and read, ``Y``
    written and read, ``Z`` written), in numbers moved, each gathered run counted as
    :data:`RUN_NUMBERS` numbers more (the patch matrix's only where it is ``gathered``, not
    cut as slices); or None where the folded form does not apply (groups, a stride with a kernel
    dilation in a dim before the last, one outer tap, rows or ``Y`` too wide). The third
    number is the folded form's numbers per image, for its tile budget."""
    nd, window = cfg.ndim, cfg.window
    ci, co = k_shape[-2], k_shape[-1]
    if nd < 2 or groups != 1 or any(st > 1 and d > 1 for st, d in
                                    zip(cfg.stride[:-1], cfg.dilation[:-1])):
        return None
    dims = _fold_dims(cfg)
    f, row = math.prod(t for _, t, _ in dims), math.prod(w for w, _, _ in dims) * window[-1] * ci
    if f < 2 or row > ROW_WIDTH or f * co > FOLD_WIDTH:
        return None
    rows_out = math.prod(out[:-1]) * out[-1]
    rows_in = math.prod(o + (t - 1) * step for o, (_, t, step) in zip(out[:-1], dims)) * out[-1]
    runs = window[-1] if cfg.dilation[-1] > 1 else 1       # gathered runs per window row
    im2col = (2 * math.prod(window) * ci
              + (RUN_NUMBERS * math.prod(window[:-1]) * runs if gathered else 0)) * rows_out
    fold = ((2 * row + 2 * f * co + RUN_NUMBERS * math.prod(w for w, _, _ in dims) * runs)
            * rows_in + co * rows_out)
    return im2col, fold, (row + f * co) * rows_in


def _blocks(window, c_in, block_width, row_width):
    """``(split, chunk, n_chunks)`` of :class:`Plan` (see :func:`plan`).

    The last dim is cut only when one row is wider than ``row_width``; going outwards, a dim
    is taken whole while the block stays within ``block_width``, else cut into chunks
    of the rows that fit (:func:`_cut`: a divisor of the dim where one is at least half as
    large as the fit; otherwise balanced chunks, the last one padded with zero taps).
    """
    inner, nd = 1, len(window)
    for q in reversed(range(nd)):
        k = window[q]
        limit = row_width if q == nd - 1 else block_width
        if inner * k * c_in <= limit:
            inner *= k
            continue
        fit = max(1, limit // (inner * c_in))
        return (q, *_cut(k, fit))
    return -1, 1, 1


# --------------------------------------------------------------------------------------------
# Geometry: padded input, tiles, blocks, taps.


class _Geometry(NamedTuple):
    """Static sizes derived from a config and a plan."""

    out: tuple            # output spatial sizes
    window: tuple         # the window, dim ``split`` padded to n_chunks * chunk zero taps
    block_window: tuple   # taps of one block per dim
    tile_out: tuple       # (n_tile, r_tile, *out[1:]): one tile's output (batch and spatial)
    region: tuple         # spatial size of one tile's input region (a multiple of the stride)
    padded: tuple         # spatial size of the padded input (forward padding and any extra)


def _geometry(x_shape, cfg: WindowConfig, p: Plan) -> _Geometry:
    out = output_spatial(x_shape[1:-1], cfg)
    window = tuple(p.n_chunks * p.chunk if q == p.split else k for q, k in enumerate(cfg.window))
    block_window = tuple(1 if q < p.split else p.chunk if q == p.split else k
                         for q, k in enumerate(cfg.window))
    rows = (p.r_tile, *out[1:])
    region = tuple(-(-((k - 1) * d + (r - 1) * s + 1) // s) * s for k, d, r, s in
                   zip(window, cfg.dilation, rows, cfg.stride))
    need = ((p.r_tiles - 1) * p.r_tile * cfg.stride[0] + region[0], *region[1:])
    have = tuple(n + lo + hi for n, (lo, hi) in zip(x_shape[1:-1], cfg.padding))
    padded = tuple(-(-max(a, b) // st) * st for a, b, st in zip(need, have, cfg.stride))
    return _Geometry(out, window, block_window, (p.n_tile, *rows), region, padded)


def _pad_input(x, cfg: WindowConfig, p: Plan, g: _Geometry, *, gathered: bool):
    """``Xpad``: the forward padding, then zeros up to whole tiles and blocks (images, rows
    and columns that only meet zero-padded taps or outputs that are cropped). When a patch
    is ``gathered`` from it, it is written out first (:func:`jaxcnn._xla_cpu.materialize`);
    the elementwise product reads it through slices that XLA fuses with the padding."""
    pads = tuple((lo, want - n - lo) for (lo, _), n, want in
                 zip(cfg.padding, x.shape[1:-1], g.padded))
    return _padded(x, pads, p.n_tiles * p.n_tile, gathered=gathered)


def _padded(x, pads, batch: int, *, gathered: bool):
    """``x`` padded by ``pads`` in its spatial dims and with zero images up to ``batch``;
    written out first (:func:`jaxcnn._xla_cpu.materialize`) when a patch is ``gathered``
    from it."""
    if all(lo == hi == 0 for lo, hi in pads) and batch == x.shape[0]:
        return x
    run = lambda x: _pad_batch(pad(x, pads), batch)   # noqa: E731
    return _xla_cpu.materialize(run, x) if gathered else run(x)


def _pad_batch(a, n):
    if a.shape[0] == n:
        return a
    return lax.pad(a, jnp.zeros((), a.dtype), [(0, n - a.shape[0], 0)] + [(0, 0, 0)] * (a.ndim - 1))


def _tile_start(t, cfg: WindowConfig, p: Plan, *, rows_in_input: bool):
    """Start (batch, then spatial dims) of tile ``t``, in the padded input when
    ``rows_in_input``, else in the output."""
    image, row = (t // p.r_tiles, t % p.r_tiles) if p.r_tiles > 1 else (t, 0)
    row = row * p.r_tile * (cfg.stride[0] if rows_in_input else 1)
    return (image * p.n_tile, row, *(0,) * (cfg.ndim - 1))


def _block_offset(j, cfg: WindowConfig, p: Plan):
    """Spatial offset (in the region) of block ``j``'s first tap."""
    if p.split < 0:
        return (0,) * cfg.ndim
    chunk, rest = j % p.n_chunks, j // p.n_chunks
    offset = [0] * cfg.ndim
    offset[p.split] = chunk * p.chunk * cfg.dilation[p.split]
    for q in reversed(range(p.split)):
        offset[q] = (rest % cfg.window[q]) * cfg.dilation[q]
        rest = rest // cfg.window[q]
    return tuple(offset)


def _n_blocks(cfg: WindowConfig, p: Plan) -> int:
    return p.n_chunks * math.prod(cfg.window[:max(p.split, 0)])


def _spanned(cfg: WindowConfig, g: _Geometry) -> int:
    """First spatial dim of the block's *spanned* suffix: the trailing dims with kernel
    dilation 1, whose taps of one output are contiguous in the input, so that one gathered
    slice covers all of them."""
    q = cfg.ndim
    while q > 0 and cfg.dilation[q - 1] == 1:
        q -= 1
    return q


def _gather_starts(cfg: WindowConfig, g: _Geometry, first: int, c_in: int):
    """Start indices ``(M, *taps of the enumerated dims, nd + 1)`` of :func:`_patch`'s gather
    into the merged view: image ``b``, then per spatial dim ``i * s`` (plus ``u * d`` for the
    block tap ``u`` of an enumerated dim ``q < first``); the last spatial dim is counted in
    numbers, ``C_in`` per position. Built from iotas inside the program: as a constant table
    (one row per output position) it made XLA:CPU's compilation 2-3x slower."""
    nd, (n, *rows) = cfg.ndim, g.tile_out
    enum = [g.block_window[q] for q in range(first)]
    shape = (n, *rows, *enum)
    starts = [lax.broadcasted_iota(jnp.int32, shape, 0)]
    for q in range(nd):
        index = lax.broadcasted_iota(jnp.int32, shape, 1 + q) * cfg.stride[q]
        if q < first:
            index = index + lax.broadcasted_iota(jnp.int32, shape, 1 + nd + q) * cfg.dilation[q]
        starts.append(index * (c_in if q == nd - 1 else 1))
    return jnp.stack(starts, axis=-1).reshape(-1, *enum, nd + 1)


def _patch(xp, t, j, cfg: WindowConfig, p: Plan, g: _Geometry):
    """Block ``j``'s patch for tile ``t``, ``(M, taps · C_in)``: row ``i``, tap ``u`` holds
    ``Xpad[tile_t + i * s + offset_j + u * d]``, taps in row-major order; gathered or cut
    as slices, as the plan says (:data:`SLICES_RUN`)."""
    if p.patch == "slices":
        return _patch_slices(xp, cfg, p, g)
    return _patch_gather(xp, t, j, cfg, p, g)


def _last_dim_runs(cfg: WindowConfig):
    """The last dim's taps as runs ``(block, phase, count)`` of the phase view (see
    :func:`_patch_slices`): consecutive taps (no kernel dilation) that fall into one block of
    ``s`` positions form one run of ``count · C_in`` contiguous numbers."""
    s, d = cfg.stride[-1], cfg.dilation[-1]
    runs = []
    for u in range(cfg.window[-1]):
        block, phase = divmod(u * d, s)
        if runs and d == 1 and runs[-1][0] == block and sum(runs[-1][1:]) == phase:
            runs[-1][2] += 1
        else:
            runs.append([block, phase, 1])
    return [tuple(r) for r in runs]


def _patch_slices(xp, cfg: WindowConfig, p: Plan, g: _Geometry):
    """The whole layer's patch (one tile, one block) as static slices of the *phase view*,
    concatenated: each spatial dim of the padded input (a multiple of the stride) viewed as
    ``(R / s, s)``, position ``i * s + e`` at ``(i + e // s, e % s)``, and the last dim's phase
    merged with the channels (a free reshape). Tap ``e`` of a dim is then the plain slice
    ``[e // s : e // s + rows, e % s]``; in the last dim, the taps of one block are one slice
    ``s · C_in`` wide at most (:func:`_last_dim_runs`). Nothing is gathered: XLA:CPU copies
    each slice and concatenates them with plain copies."""
    nd, n, c = cfg.ndim, xp.shape[0], xp.shape[-1]
    view = xp.reshape(n, *(v for q in range(nd - 1) for v in (xp.shape[1 + q] // cfg.stride[q],
                                                              cfg.stride[q])),
                      xp.shape[-2] // cfg.stride[-1], cfg.stride[-1] * c)
    rows = g.tile_out[1:]
    pieces = []
    for taps in itertools.product(*(range(k) for k in cfg.window[:-1])):
        start, size = [0], [n]
        for q, u in enumerate(taps):
            block, phase = divmod(u * cfg.dilation[q], cfg.stride[q])
            start += [block, phase]
            size += [rows[q], 1]
        for block, phase, count in _last_dim_runs(cfg):
            lo = [*start, block, phase * c]
            hi = [a + b for a, b in zip(lo, [*size, rows[-1], count * c])]
            pieces.append(lax.slice(view, lo, hi).reshape(-1, count * c))
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def _patch_gather(xp, t, j, cfg: WindowConfig, p: Plan, g: _Geometry, *,
                  last_first: bool = False):
    """:func:`_patch` as one ``lax.gather`` straight from the padded input, whatever the
    number of taps, with the input viewed with its last spatial dim and channels merged
    (``(N, ..., W · C_in)``, a free reshape). Each gathered slice is a contiguous run: for a
    window without kernel dilation,
    ``kw · C_in`` numbers per window row, and the rows of the trailing dims without dilation
    are spanned by the slice; taps of dims with dilation are enumerated in the indices. The
    tile's and block's offsets are added to constant start indices. Measured on XLA:CPU: long
    runs gather about 2x faster than ``C_in``-long ones, and gathering from the input itself
    runs 2-3x faster than cutting the tile or block out first (XLA fuses the cut into the
    gather and then computes every element's address on its own). With ``last_first`` the
    rows are ordered with the last spatial dim before the others, ``(n, out[-1], *out[:-1])``
    (for :func:`_kernel_grad_fold`).
    """
    nd, first = cfg.ndim, _spanned(cfg, g)
    n, c = xp.shape[0], xp.shape[-1]
    view = xp.reshape(n, *xp.shape[1:-2], xp.shape[-2] * c)
    shift = jnp.asarray([*_tile_start(t, cfg, p, rows_in_input=True)], jnp.int32) + \
        jnp.asarray([0, *_block_offset(j, cfg, p)], jnp.int32)
    starts = _gather_starts(cfg, g, first, c)
    if last_first:
        rest = starts.shape[1:]
        starts = jnp.moveaxis(starts.reshape(*g.tile_out, *rest), nd, 1).reshape(-1, *rest)
    starts = starts + shift * jnp.asarray([1] * nd + [c], jnp.int32)
    spans = [(g.block_window[q] - 1) * cfg.dilation[q] + 1 if q >= first else 1
             for q in range(nd)]
    spans[-1] *= c
    kept = [q for q in range(nd) if spans[q] != 1]
    n_index = starts.ndim - 1
    dnums = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(n_index, n_index + len(kept))),
        collapsed_slice_dims=(0, *(q + 1 for q in range(nd) if spans[q] == 1)),
        start_index_map=tuple(range(nd + 1)))
    patch = lax.gather(view, starts, dnums, slice_sizes=(1, *spans),
                       mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    return patch.reshape(patch.shape[0], -1)


def _block_input(xp, t, j, cfg: WindowConfig, p: Plan, g: _Geometry):
    """What block ``j`` of tile ``t`` multiplies: the patch tile ``(M, taps · C_in)``
    (:func:`_patch`) for a matrix product, or for the elementwise product the block's taps
    themselves, each the strided slice ``Xpad[offset_j + u * d :: s]`` as ``(M, C_in)`` (XLA
    fuses the slices into the multiply-adds: nothing is gathered)."""
    if p.product == "matmul":
        return _patch(xp, t, j, cfg, p, g)
    rows = g.tile_out[1:]
    size = [(r - 1) * s + (k - 1) * d + 1 for r, s, k, d in
            zip(rows, cfg.stride, g.block_window, cfg.dilation)]
    offset = _block_offset(j, cfg, p)
    if not all(isinstance(o, int) for o in offset):
        xp = lax.dynamic_slice(xp, _index((0, *offset, 0)), (xp.shape[0], *size, xp.shape[-1]))
        offset = (0,) * cfg.ndim
    taps = []
    for o in _tap_offsets(cfg, g):
        start = (0, *(a + int(b) for a, b in zip(offset, o)), 0)
        limit = (xp.shape[0], *(a + (r - 1) * s + 1 for a, r, s in zip(start[1:], rows,
                                                                     cfg.stride)), xp.shape[-1])
        tap = lax.slice(xp, start, limit, (1, *cfg.stride, 1))
        taps.append(tap.reshape(-1, xp.shape[-1]))
    return taps


def _tap_offsets(cfg: WindowConfig, g: _Geometry) -> np.ndarray:
    """``(taps, nd)``: offset ``u * d`` (within a block) of each of the block's taps."""
    return np.array([[m * d for m, d in zip(ms, cfg.dilation)]
                     for ms in itertools.product(*(range(k) for k in g.block_window))], np.int32)


def _col2im(columns, region, offset, cfg: WindowConfig, g: _Geometry):
    """Transpose of :func:`_patch`: ``region`` plus column block ``u`` of ``columns: (M, taps,
    C_in)`` put back at tap ``u``'s positions ``i * s + offset + u * d``, summed where windows
    overlap.

    The region is viewed in *phase layout*: spatial dim ``q`` of size ``R`` (a multiple of the
    stride) as ``(R / s, s)``, position ``p`` at ``(p // s, p % s)``. The positions ``i * s + o``
    of one tap are then the dense block ``[o // s : o // s + rows, o % s]``, so each tap is one
    in-place ``dynamic_update_slice`` of its own size, in a loop over the taps: no tap touches
    the zeros between its strided positions.
    """
    nd, rows, n, c = cfg.ndim, g.tile_out[1:], region.shape[0], region.shape[-1]
    phases = region.reshape(n, *(v for r, s in zip(region.shape[1:-1], cfg.stride)
                                 for v in (r // s, s)), c)
    block = (n, *(v for r in rows for v in (r, 1)), c)
    taps = _tap_offsets(cfg, g)
    stride = np.asarray(cfg.stride, np.int32)

    def place(u, phases):
        o = jnp.asarray(taps)[u] + jnp.asarray(offset, jnp.int32)
        start = jnp.stack([o // stride, o % stride], axis=1).reshape(-1)
        start = (0, *(start[i] for i in range(2 * nd)), 0)
        column = lax.dynamic_index_in_dim(columns, u, axis=1, keepdims=False)
        return _add_at(phases, column.reshape(block).astype(phases.dtype), start)

    phases = lax.fori_loop(0, taps.shape[0], place, phases)
    return phases.reshape(region.shape)


def _add_at(a, b, start):
    """``a`` with ``b`` added at ``start`` (every dim); in place inside a loop."""
    start = _index(start)
    return lax.dynamic_update_slice(a, lax.dynamic_slice(a, start, b.shape) + b, start)


def _index(start):
    """Start indices as int32 (lax wants one integer type; Python ints and loop counters
    otherwise differ when x64 is on)."""
    return tuple(jnp.asarray(v, jnp.int32) for v in start)


def _loop(n: int, body, init):
    """``fori_loop(0, n, body, init)``, or ``body(0, init)`` when there is one iteration."""
    return body(0, init) if n == 1 else lax.fori_loop(0, n, body, init)


def _kernel_blocks(kernel, cfg: WindowConfig, p: Plan, g: _Geometry, groups: int):
    """``K`` as ``(n_blocks, taps per block, C_in/G, G, C_out/G)``, in block and tap order
    (dim ``split`` zero-padded to whole chunks)."""
    ci, co = kernel.shape[-2:]
    if g.window != cfg.window:
        kernel = jnp.pad(kernel, [(0, w - k) for w, k in zip(g.window, cfg.window)] + [(0, 0)] * 2)
    if p.split >= 0:   # (*outer, n_chunks, chunk, *inner, ...): blocks, then taps in a block
        kernel = kernel.reshape(*g.window[:p.split], p.n_chunks, p.chunk,
                                *g.window[p.split + 1:], ci, co)
    return kernel.reshape(-1, math.prod(g.block_window), ci, groups, co // groups)


def _unblock_kernel(kb, k_shape, cfg: WindowConfig, g: _Geometry):
    """Inverse of :func:`_kernel_blocks`, dropping the zero-padded taps."""
    k = kb.reshape(*g.window, *k_shape[-2:])
    return k[tuple(slice(0, w) for w in cfg.window)]


# --------------------------------------------------------------------------------------------
# The three products on one block of one tile. ``patch: (M, taps, C_in)``; ``kb``: the block's
# kernel ``(taps, C_in/G, G, C_out/G)``; ``dz``: the tile's ``(M, G, C_out/G)``. Products
# accumulate in ``acc`` (float32 for half precision).


def _forward_block(inp, kb, p: Plan, acc):
    """``P_block · K_block``: ``(M, G, C_out/G)``; ``inp`` from :func:`_block_input`."""
    taps, ci, groups, co = *kb.shape[:3], kb.shape[-1]
    if p.product == "matmul":
        if groups == 1:
            return jnp.matmul(inp, kb.reshape(taps * ci, co), preferred_element_type=acc
                              )[:, None, :]
        patch = inp.reshape(inp.shape[0], taps, groups, ci)
        return jnp.einsum("mtgc,tcgo->mgo", patch, kb, preferred_element_type=acc)
    z = None
    for u, tap in enumerate(inp):
        tap = tap.astype(acc).reshape(-1, groups, ci)
        for c in range(ci):
            term = tap[:, :, c:c + 1] * kb[u, c].astype(acc)
            z = term if z is None else z + term
    return z


def _kernel_grad_block(patch, dz, taps, acc):
    """``P_blockᵀ · dZ_tile``: ``(taps, C_in/G, G, C_out/G)``. Always a product on the patch
    (one contraction over the tile's positions, with a small output), also for layers whose
    forward runs elementwise: per-tap products compiled 4x slower for no gain."""
    m, groups = patch.shape[0], dz.shape[1]
    c_in = patch.shape[1] // taps
    if groups == 1:
        return jnp.matmul(patch.T, dz[:, 0], preferred_element_type=acc).reshape(taps, c_in, 1,
                                                                               -1)
    patch = patch.reshape(m, taps, groups, c_in // groups)
    return jnp.einsum("mtgc,mgo->tcgo", patch, dz, preferred_element_type=acc)


def _input_grad_block(dz, kb, p: Plan, acc):
    """``dZ_tile · K_blockᵀ`` as ``(M, taps, C_in)``: column block ``u`` is what flows back
    through tap ``u``."""
    m, (taps, ci, groups, co) = dz.shape[0], kb.shape
    if p.product == "matmul" and groups == 1:
        c = jnp.matmul(dz[:, 0], kb.reshape(taps * ci, co).T, preferred_element_type=acc)
    else:
        c = jnp.einsum("mgo,tcgo->mtgc", dz, kb, preferred_element_type=acc)
    return c.reshape(m, taps, groups * ci)


# --------------------------------------------------------------------------------------------
# The three products over the whole layer.


def correlate(x, kernel, cfg: WindowConfig, groups: int):
    """``Z = X ⋆ K`` (no bias): ``(N, *out, C_out)`` in ``x``'s accumulation dtype."""
    acc = accum_dtype(x.dtype)
    p = plan(x.shape, kernel.shape, cfg, groups, x.dtype.itemsize)
    if p.product != "elementwise" and _phases_pay(kernel.shape, cfg, groups):
        x, kernel, cfg = _strides_to_phases(x, kernel, cfg)
        p = plan(x.shape, kernel.shape, cfg, groups, x.dtype.itemsize)
    if p.product == "fold":
        return _correlate_fold(x, kernel, cfg, p, acc)
    g = _geometry(x.shape, cfg, p)
    xp = _pad_input(x, cfg, p, g, gathered=p.product != "elementwise")
    kb = _kernel_blocks(kernel, cfg, p, g, groups)
    co, n_blocks = kernel.shape[-1], _n_blocks(cfg, p)

    def tile(t, z):
        def block(j, zt):
            out = _forward_block(_block_input(xp, t, j, cfg, p, g), _dynamic_index(kb, j), p,
                                 acc)
            return out if zt is None else zt + out

        zt = block(0, None) if n_blocks == 1 else lax.fori_loop(
            0, n_blocks, block, jnp.zeros((math.prod(g.tile_out), groups, co // groups), acc))
        zt = zt.reshape(*g.tile_out, co)
        if p.tiles == 1:
            return zt
        return lax.dynamic_update_slice(z, zt, _index((*_tile_start(t, cfg, p, rows_in_input=False), 0)))

    z = None if p.tiles == 1 else jnp.zeros((p.n_tiles * p.n_tile, p.r_tiles * p.r_tile,
                                             *g.out[1:], co), acc)
    z = _loop(p.tiles, tile, z)
    return z[:x.shape[0], :g.out[0]]


PHASES_WASTE = 1.0
"""The most zero multiply-adds (as a factor of the real ones) that :func:`_strides_to_phases`
may add: none, so it runs where the window is at most the stride or a multiple of it.
Measured forward, manual / lax, patch product with strides vs phases (one interleaved run):
1x1 64->128 s2 1.16 vs 0.82, 2x2 32->64 s2 0.75 vs 0.74, 3x3 16->32 s4 0.95 vs 0.90; where
zero taps are added it did not pay: 7x7 16->32 s2 (waste 1.31) 3.23 vs 3.39, 7x7 3->64 s2
1.85 vs 1.92, 11x11 3->64 s4 (1.19) 1.00 vs 1.06, 1-D 7 32->64 s2 (1.14) 1.20 vs 1.21, 3x3
32->64 s2 (1.78) 2.32 vs 2.72."""


def _phases_pay(k_shape, cfg: WindowConfig, groups: int) -> bool:
    """Whether :func:`_strides_to_phases` applies (a stride, no dilation, no groups) and adds at
    most :data:`PHASES_WASTE` zero multiply-adds."""
    if groups != 1 or all(st == 1 for st in cfg.stride) or any(d != 1 for d in cfg.dilation):
        return False
    waste = math.prod(-(-k // st) * st / k if k > st else 1.0
                      for k, st in zip(cfg.window, cfg.stride))
    return waste <= PHASES_WASTE


def _strides_to_phases(x, kernel, cfg: WindowConfig):
    """A strided correlation as one with stride 1 ("space to depth"), exactly.

    Per dim with stride ``s`` and window ``k``, write a tap as ``m = a·s + p`` (``0 <= p < s``):
    ``z_i = Σ_m Xpad[i·s + m] K_m = Σ_a Σ_p X'[i + a, p] K'[a, p]`` with ``X'[j, p] =
    Xpad[j·s + p]`` (the padded input cut into blocks of ``s``, the phase ``p`` moved into the
    channels) and ``K'[a, p] = K[a·s + p]`` (zero where ``a·s + p >= k``). So the result is a
    stride-1 correlation of ``X'`` (``s`` times the channels, ``1/s`` the length) with ``K'``
    (``ceil(k/s)`` taps); where ``k <= s`` only the first ``k`` phases are kept and ``K'``
    has one tap (the windows do not overlap: the patch matrix is ``X'`` itself). Its windows
    are runs of whole blocks, so the gather reads contiguous memory and the folded form
    applies. Returns ``(x', kernel', cfg')``; the output positions are the same.
    """
    nd = cfg.ndim
    out = output_spatial(x.shape[1:-1], cfg)
    phases = tuple(min(k, st) for k, st in zip(cfg.window, cfg.stride))
    taps = tuple(-(-k // st) for k, st in zip(cfg.window, cfg.stride))
    length = tuple((o - 1 + t) * st for o, t, st in zip(out, taps, cfg.stride))
    xp = pad(x, tuple((lo, want - n - lo) for (lo, _), n, want in
                      zip(cfg.padding, x.shape[1:-1], length)))
    n, c = xp.shape[0], xp.shape[-1]
    blocks = [dim for j, st in zip(length, cfg.stride) for dim in (j // st, st)]
    xp = xp.reshape(n, *blocks, c)[(slice(None), *(sl for q in phases
                                                   for sl in (slice(None), slice(0, q))))]
    order = (0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
    xp = xp.transpose(order).reshape(n, *(j // st for j, st in zip(length, cfg.stride)),
                                     math.prod(phases) * c)
    ci, co = kernel.shape[-2:]
    kp = jnp.pad(kernel, [(0, t * st - k if k > st else 0) for k, t, st in
                          zip(cfg.window, taps, cfg.stride)] + [(0, 0), (0, 0)])
    kp = kp.reshape(*(dim for t, q in zip(taps, phases) for dim in (t, q)), ci, co)
    kp = kp.transpose((*range(0, 2 * nd, 2), *range(1, 2 * nd, 2), 2 * nd, 2 * nd + 1))
    kp = kp.reshape(*taps, math.prod(phases) * ci, co)
    return xp, kp, WindowConfig(taps, (1,) * nd, ((0, 0),) * nd, (1,) * nd)


def _dynamic_index(a, j):
    return a[j] if isinstance(j, int) else lax.dynamic_index_in_dim(a, j, keepdims=False)


def _pad_dz(dz, p: Plan):
    """``dZ`` with zero images and rows up to whole tiles."""
    dz = _pad_batch(dz, p.n_tiles * p.n_tile)
    rows = p.r_tiles * p.r_tile - dz.shape[1]
    return pad(dz, ((0, rows),) + ((0, 0),) * (dz.ndim - 3)) if rows else dz


def _tile_dz(dz, t, cfg: WindowConfig, p: Plan, g: _Geometry, groups: int):
    """Tile ``t`` of the tile-padded ``dZ`` as ``(M, G, C_out/G)``."""
    if p.tiles > 1:
        start = (*_tile_start(t, cfg, p, rows_in_input=False), 0)
        dz = lax.dynamic_slice(dz, _index(start), (*g.tile_out, dz.shape[-1]))
    return dz.reshape(-1, groups, dz.shape[-1] // groups)


def kernel_grad(x, dz, k_shape, cfg: WindowConfig, groups: int):
    """``dK = X ⋆ dZ`` (``= Pᵀ · dZ``) in ``x``'s accumulation dtype, shaped ``k_shape``."""
    framing = _framing(x.shape, k_shape, cfg, groups)
    if framing is not None:
        return _kernel_grad_framed(x, dz, k_shape, cfg, *framing)
    acc = accum_dtype(x.dtype)
    # The kernel gradient always gathers its patch (see SLICES_PIECES).
    p = plan(x.shape, k_shape, cfg, groups, x.dtype.itemsize)._replace(patch="gather")
    if p.product == "fold":
        return _kernel_grad_fold(x, dz, k_shape, cfg, p, acc)
    g = _geometry(x.shape, cfg, p)
    xp, dzp = _pad_input(x, cfg, p, g, gathered=True), _pad_dz(dz, p)
    n_blocks, taps, (ci, co) = _n_blocks(cfg, p), math.prod(g.block_window), k_shape[-2:]

    def tile(t, dk):
        dzt = _tile_dz(dzp, t, cfg, p, g, groups)

        def block(j, dk):
            dkj = _kernel_grad_block(_patch(xp, t, j, cfg, p, g), dzt, taps, acc)
            return _add_at(dk, dkj[None], (j, 0, 0, 0, 0))

        return _loop(n_blocks, block, dk)

    dk = jnp.zeros((n_blocks, taps, ci, groups, co // groups), acc)
    return _unblock_kernel(_loop(p.tiles, tile, dk), k_shape, cfg, g)


def input_grad(dz, kernel, x_shape, cfg: WindowConfig, groups: int):
    """``dX = col2im(dZ · Kᵀ)`` in ``dz``'s accumulation dtype, shaped ``x_shape``."""
    acc = accum_dtype(dz.dtype)
    # The folded form has no input gradient of its own: the product runs on the patch
    # matrix's tiles (as before the folded form took strided outer dims).
    p = plan(x_shape, kernel.shape, cfg, groups, np.dtype(dz.dtype).itemsize,
             fold=all(st == 1 for st in cfg.stride[:-1]))
    g = _geometry(x_shape, cfg, p)
    kb, dzp = _kernel_blocks(kernel, cfg, p, g, groups), _pad_dz(dz, p)
    ci, n_blocks = x_shape[-1], _n_blocks(cfg, p)

    def tile(t, dxp):
        dzt = _tile_dz(dzp, t, cfg, p, g, groups)

        def block(j, region):
            columns = _input_grad_block(dzt, _dynamic_index(kb, j), p, acc)
            return _col2im(columns, region, _block_offset(j, cfg, p), cfg, g)

        region = _loop(n_blocks, block, jnp.zeros((p.n_tile, *g.region, ci), acc))
        if p.tiles == 1 and g.region == g.padded:
            return region
        return _add_at(dxp, region, (*_tile_start(t, cfg, p, rows_in_input=True), 0))

    dxp = jnp.zeros((p.n_tiles * p.n_tile, *g.padded, ci), acc)
    dxp = _loop(p.tiles, tile, dxp)
    crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(cfg.padding, x_shape[1:-1]))
    return dxp[(slice(0, x_shape[0]), *crop)]


# --------------------------------------------------------------------------------------------
# The folded form: the taps of the outer dims in the product's columns (see plan()).


def _fold_setup(x, cfg: WindowConfig, p: Plan):
    """The padded input and the row patch's geometry: per dim before the last a window of
    ``w`` rows with the layer's stride (:func:`_fold_dims`; one row, stride 1, where the layer
    has no stride there), the layer's window, stride and dilation in the last."""
    nd, out, dims = cfg.ndim, output_spatial(x.shape[1:-1], cfg), _fold_dims(cfg)
    span = tuple(o + (t - 1) * step for o, (_, t, step) in zip(out[:-1], dims))
    row = WindowConfig((*(w for w, _, _ in dims), cfg.window[-1]), cfg.stride,
                       ((0, 0),) * nd, (1,) * (nd - 1) + cfg.dilation[-1:])
    rp = Plan(p.n_tile, p.n_tiles, span[0], 1, -1, 1, 1, "matmul")
    rows = (*span, out[-1])
    width = (out[-1] - 1) * cfg.stride[-1] + (cfg.window[-1] - 1) * cfg.dilation[-1] + 1
    need = (*((v - 1) * st + w for v, st, (w, _, _) in zip(span, cfg.stride, dims)), width)
    g = _Geometry(rows, row.window, row.window, (p.n_tile, *rows), need, None)
    pads = tuple((lo, v - n - lo) if q < nd - 1 else (lo, max(hi, v - n - lo))
                 for q, ((lo, hi), n, v) in enumerate(zip(cfg.padding, x.shape[1:-1], need)))
    xp = _padded(x, pads, p.n_tiles * p.n_tile, gathered=True)   # its row patch is gathered
    return xp, row, rp, g, out, span


def _fold_taps(cfg: WindowConfig):
    """Offsets ``a · step`` in ``Y``'s rows of the outer dims' taps, row-major (the order of
    ``K_fold``'s column blocks, :func:`_fold_kernel`)."""
    return list(itertools.product(*(range(0, t * step, step) for _, t, step in _fold_dims(cfg))))


def _fold_kernel(kernel, cfg: WindowConfig):
    """``K_fold[(r, b, c), (a, o)] = K[a·s + r, b, c, o]`` (per dim before the last, ``a < t``
    and ``r < w`` of :func:`_fold_dims`; zero where ``a·s + r`` is past the window; ``b`` the
    last dim's tap): ``(W · kw · C_in, F · C_out)``."""
    nd, dims, (ci, co) = cfg.ndim, _fold_dims(cfg), kernel.shape[-2:]
    k = jnp.pad(kernel, [(0, t * w - kq) for (w, t, _), kq in zip(dims, cfg.window)]
                + [(0, 0)] * 3)
    k = k.reshape(*(v for w, t, _ in dims for v in (t, w)), cfg.window[-1], ci, co)
    k = k.transpose(*range(0, 2 * nd - 2, 2), *range(1, 2 * nd - 2, 2), *range(2 * nd - 2, 2 * nd + 1))
    f = math.prod(t for _, t, _ in dims)
    return jnp.moveaxis(k.reshape(f, -1, co), 0, 1).reshape(-1, f * co)


def _unfold_kernel(dk_fold, k_shape, cfg: WindowConfig):
    """Inverse of :func:`_fold_kernel` (the zero taps past the window dropped)."""
    nd, dims, (ci, co) = len(k_shape) - 2, _fold_dims(cfg), k_shape[-2:]
    f = math.prod(t for _, t, _ in dims)
    k = jnp.moveaxis(dk_fold.reshape(-1, f, co), 1, 0)
    k = k.reshape(*(t for _, t, _ in dims), *(w for w, _, _ in dims), k_shape[-3], ci, co)
    order = [v for q in range(nd - 1) for v in (q, nd - 1 + q)]
    k = k.transpose(*order, *range(2 * nd - 2, 2 * nd + 1))
    k = k.reshape(*(t * w for w, t, _ in dims), *k_shape[-3:])
    return k[tuple(slice(0, kq) for kq in k_shape[:-3])]


def _fold_start(offsets, a):
    """Start of outer tap ``a`` in ``Y`` (or ``dY``), ``(n, *span, w, F, C_out)``: its offset
    ``a·d`` (row ``a`` of ``offsets``, :func:`_fold_taps`) in the outer dims, slot ``a``."""
    return _index((0, *(offsets[a, q] for q in range(offsets.shape[1])), 0, a, 0))


def _correlate_fold(x, kernel, cfg: WindowConfig, p: Plan, acc):
    """``Z_i = Σ_a Y[i + a·step, a]`` with ``Y = P_row · K_fold`` (:func:`_fold_kernel`):
    ``P_row`` holds, per row of ``Y`` (an input row, or a block of ``s`` rows where the layer
    has a stride ``s`` there; :func:`_fold_dims`), those rows' window along the last dim
    (``a`` the outer taps, ``b`` the last dim's); the same sum as ``P · K``, grouped by
    rows."""
    xp, row, rp, g, out, span = _fold_setup(x, cfg, p)
    nd, co, k_fold = cfg.ndim, kernel.shape[-1], _fold_kernel(kernel, cfg)
    f = k_fold.shape[1] // co

    def tile(t, z):
        y = jnp.matmul(_patch(xp, t, 0, row, rp, g), k_fold, preferred_element_type=acc)
        y = y.reshape(p.n_tile, *span, out[-1], f, co)
        size = (p.n_tile, *out, 1, co)
        if f <= FOLD_UNROLL:
            zt = None
            for a, offset in enumerate(_fold_taps(cfg)):
                part = lax.slice(y, (0, *offset, 0, a, 0),
                                 tuple(b + n for b, n in zip((0, *offset, 0, a, 0), size)))
                zt = part if zt is None else zt + part
        else:
            offsets = jnp.asarray(_fold_taps(cfg), jnp.int32)

            def add(a, zt):
                return zt + lax.dynamic_slice(y, _fold_start(offsets, a), size)

            zt = lax.fori_loop(0, f, add, jnp.zeros(size, acc))
        zt = zt.reshape(*size[:-2], co)
        if p.n_tiles == 1:
            return zt
        return lax.dynamic_update_slice(z, zt, _index((t * p.n_tile, *(0,) * nd, 0)))

    z = None if p.n_tiles == 1 else jnp.zeros((p.n_tiles * p.n_tile, *out, co), acc)
    return _loop(p.n_tiles, tile, z)[:x.shape[0]]


def _kernel_grad_fold(x, dz, k_shape, cfg: WindowConfig, p: Plan, acc):
    """``dK_fold = P_rowᵀ · dY`` with ``dY[h, a] = dZ[h - a·step]`` (zero where that is
    outside ``dZ``): the transpose of :func:`_correlate_fold`'s two steps.

    Where the outer taps lie along one dim with step 1 (2-D without kernel dilation in the
    first dim, or 3-D with one outer window of 1), ``dY`` is gathered (:func:`_dz_windows`)
    with rows ordered ``(n, w, *h)``, the last spatial dim first, and ``P_row``'s rows in the
    same order: then one row of ``dY`` is one contiguous run, ``F · C_out`` numbers, of ``dZ``
    moved to ``(n, w, *h, C_out)``. Else the ``F`` shifted copies of ``dZ`` are stacked
    (short runs of ``C_out``). Measured f+b of the layer, manual/lax stacked -> gathered (one
    interleaved run): 5x5 8->32 at batch 32 1.53 -> 1.04, 3x3 16->16 at batch 128 1.16 ->
    0.93, 3x3 24->48 at batch 64 0.70 -> 0.51. With two outer dims the gather's row is ``t``
    runs and ran slower than the stack (3x3x3 and 5x5x5 layers 1.03-1.23x the stacked time)."""
    xp, row, rp, g, out, span = _fold_setup(x, cfg, p)
    co, dims, f = k_shape[-1], _fold_dims(cfg), len(_fold_taps(cfg))
    width = math.prod(row.window) * k_shape[-2]
    if dims[-1][2] == 1 and f == dims[-1][1]:
        windows = _dz_windows(dz, dims, p, out)

        def tile(t, dk):
            dy = windows(t)
            patch = _patch_gather(xp, t, 0, row, rp, g, last_first=True)
            return dk + jnp.matmul(patch.T, dy, preferred_element_type=acc)

        dk = _loop(p.n_tiles, tile, jnp.zeros((width, f * co), acc))
        # dY's column block a' is outer tap f - 1 - a' (the taps lie along one dim): flip it.
        dk = lax.rev(dk.reshape(width, f, co), (1,)).reshape(width, f * co)
        return _unfold_kernel(dk, k_shape, cfg)
    dzp = _pad_batch(dz, p.n_tiles * p.n_tile)

    def tile(t, dk):
        dzt = dzp if p.n_tiles == 1 else lax.dynamic_slice_in_dim(dzp, t * p.n_tile, p.n_tile, 0)
        if f <= FOLD_UNROLL:
            shifted = [pad(dzt, tuple((o, s - n - o) for o, s, n in
                                      zip(offset, span, out[:-1])) + ((0, 0),))
                       for offset in _fold_taps(cfg)]
            dy = jnp.stack(shifted, axis=-2)
        else:
            offsets = jnp.asarray(_fold_taps(cfg), jnp.int32)

            def put(a, dy):
                return lax.dynamic_update_slice(dy, dzt[..., None, :].astype(dy.dtype),
                                                _fold_start(offsets, a))

            dy = lax.fori_loop(0, f, put, jnp.zeros((p.n_tile, *span, out[-1], f, co),
                                                    dzt.dtype))
        dy = dy.reshape(-1, f * co)
        patch = _patch(xp, t, 0, row, rp, g)
        return dk + jnp.matmul(patch.T, dy, preferred_element_type=acc)

    return _unfold_kernel(_loop(p.n_tiles, tile, jnp.zeros((width, f * co), acc)), k_shape, cfg)


def _dz_windows(dz, dims, p: Plan, out):
    """For outer steps of 1: ``t -> dY'`` of image tile ``t``, ``(M, F · C_out)`` with rows
    ``(n, w, *h)`` (``h`` over the fold's span, ``w`` over ``out[-1]``) and
    ``dY'[(n, w, *h), (a', o)] = dZ[n, *(h + a' - (t - 1)), w, o]`` (``a' = t - 1 - a``; zero
    outside ``dZ``). ``dZ`` is padded by ``t - 1`` zero rows on both sides of each outer dim and
    its last spatial dim moved before the outer ones, once for the whole batch (a pass over
    ``dZ``); each row of ``dY'`` is then one gathered block of that copy, whose last outer dim
    and channels are contiguous (``t · C_out`` numbers)."""
    nd, co = len(out), dz.shape[-1]
    taps = tuple(t for _, t, _ in dims)
    dzt = _xla_cpu.materialize(lambda a: jnp.moveaxis(pad(
        _pad_batch(a, p.n_tiles * p.n_tile), tuple((t - 1, t - 1) for t in taps) + ((0, 0),)),
        nd, 1), dz)
    view = dzt.reshape(*dzt.shape[:-2], dzt.shape[-2] * co)
    rows = (p.n_tile, out[-1], *(o + t - 1 for o, t in zip(out[:-1], taps)))
    starts = jnp.stack([lax.broadcasted_iota(jnp.int32, rows, q) * (co if q == nd else 1)
                        for q in range(nd + 1)], axis=-1).reshape(-1, nd + 1)
    dnums = lax.GatherDimensionNumbers(offset_dims=tuple(range(1, nd)),
                                       collapsed_slice_dims=(0, 1),
                                       start_index_map=tuple(range(nd + 1)))

    def windows(t):
        shift = jnp.asarray([1] + [0] * nd, jnp.int32) * (t * p.n_tile)
        dy = lax.gather(view, starts + shift, dnums,
                        slice_sizes=(1, 1, *taps[:-1], taps[-1] * co),
                        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
        return dy.reshape(dy.shape[0], -1)

    return windows


# --------------------------------------------------------------------------------------------
# The framed kernel gradient of a long 1-D window: a 2-D folded one.


def _framing(x_shape, k_shape, cfg: WindowConfig, groups: int):
    """``(B, A)`` where the kernel gradient of a 1-D layer (stride 1, no dilation, no groups)
    runs framed (:func:`_kernel_grad_framed`: taps cut into ``A`` blocks of ``B``, with ``B``
    near ``sqrt(T · C_out / C_in)`` so that a row of the patch, ``B · C_in``, and of ``dY``,
    ``A · C_out``, are about as wide), when that moves fewer numbers than the patch matrix
    (counted as in :func:`_fold_bytes`, with the framed form's extra copies); else None. 1-D
    9 40->40 (300 long, batch 8) is the nearest case: framed, counted without the copies of
    the input's frames and of ``dZ``, it looked 6% cheaper and ran 1.70x lax's time against
    the patch matrix's 1.30x; counted with them, it costs 13% more and stays direct.

    Only the kernel gradient: its patch-matrix product has a ``T · C_in``-wide patch and a
    narrow ``C_out``-wide result, and ran at 2.2x lax's time. Measured alone, manual patch
    matrix vs framed (lax): 1-D 129 16->16 at batch 32 11.96 vs 6.84 ms (5.47), 1-D 33
    16->16 6.57 vs 3.41 ms (2.96). The forward framed the same way was slower than its patch
    matrix (6.19 vs 5.91 ms, 3.29 vs 2.49 ms), so it stays as it is, and so does ``dX``
    (a forward on ``dZ``)."""
    if (cfg.ndim != 1 or groups != 1 or cfg.stride != (1,) or cfg.dilation != (1,)):
        return None
    t, (ci, co) = cfg.window[0], k_shape[-2:]
    b = min(t, max(2, math.ceil(math.sqrt(t * co / ci))))
    a = -(-t // b)
    b = -(-t // a)                         # the fewest zero taps for A blocks
    if a < 2 or b * ci > ROW_WIDTH or a * co > FOLD_WIDTH:
        return None
    out = output_spatial(x_shape[1:-1], cfg)[0]
    q = -(-out // b)
    rows_in = (q + a - 1) * b
    # Framed: the frames written (about 2 numbers per input number) and the input read; the
    # folded product's row patch and dY written and read, one gathered run each per row; dZ
    # moved to (n, w, h, C) for dY's gather (read and written). Direct: the patch matrix
    # written and read, one gathered run per row (long windows are cut into blocks of taps,
    # the same numbers).
    framed = ((2 * b * ci + 2 * a * co + 2 * RUN_NUMBERS + 3 * ci) * rows_in
              + 2 * co * q * b)
    direct = (2 * t * ci + RUN_NUMBERS) * out
    return (b, a) if framed < direct else None


def _kernel_grad_framed(x, dz, k_shape, cfg: WindowConfig, b: int, a: int):
    """``dK`` of a 1-D correlation ``z_i = Σ_m Xpad[i + m] K_m`` as that of a 2-D one.

    With ``i = q·B + r`` and ``m = a·B + b`` (``r, b < B``): ``Xpad[i + m] = X2[q + a, r + b]``
    where row ``j`` of ``X2`` is the *frame* ``Xpad[j·B : j·B + 2B - 1]`` (each row overlaps
    the next by ``B - 1`` positions; ``r + b <= 2B - 2``). So ``z_{qB + r} = Σ_{a, b} X2[q +
    a, r + b] K2[a, b]`` with ``K2[a, b] = K[a·B + b]`` (zero past ``T``): a 2-D VALID
    correlation of ``X2`` whose output ``Z2[q, r]`` is ``z_{qB + r}``. Its kernel gradient
    ``dK2 = X2 ⋆ dZ2``, with ``dZ2`` the rows of ``dZ`` (zero past the output), runs on the
    2-D engine (the folded form, where it pays: the ``A`` block taps in the product's
    columns, a patch of ``B`` taps), and ``dK_m = dK2[m // B, m % B]`` for ``m < T``."""
    n, length, ci = x.shape
    t, co, out = cfg.window[0], k_shape[-1], dz.shape[1]
    q = -(-out // b)
    (lo, _), = cfg.padding
    xp = pad(x, ((lo, (q + a) * b - length - lo),))
    rows = xp.reshape(n, q + a, b, ci)
    x2 = jnp.concatenate([rows[:, :-1], rows[:, 1:, :b - 1]], axis=2)   # (N, Q + A - 1, 2B - 1, C)
    dz2 = pad(dz, ((0, q * b - out),)).reshape(n, q, b, co)
    cfg2 = WindowConfig((a, b), (1, 1), ((0, 0), (0, 0)), (1, 1))
    dk2 = kernel_grad(x2, dz2, (a, b, ci, co), cfg2, 1)
    return dk2.reshape(a * b, ci, co)[:t]
