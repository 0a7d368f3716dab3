"""conv and conv_transpose: both impls against lax (forward and gradients), finite differences,
the adjoint identity, the lecture's example, errors.

Sections: the deliberate grid, property tests, second-order finite differences, the scatter and
gather forms of dX, the shapes that used to be slow, transformations, the lecture's worked
example, bad input; then the same for conv_transpose.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxcnn as jc
from jaxcnn import _shapes
from jaxcnn.convolution import _conv_input_grad_gather, _conv_input_grad_scatter

from conftest import (GRID_NDS, GRID_PADDINGS, GRID_SPATIAL, GRID_STRIDES, IMPLS, assert_close,
                      bad_input_test, compare_impls, sampled, grid_padding)

X = np.zeros((2, 8, 8, 3), np.float32)
K = np.zeros((3, 3, 3, 4), np.float32)


# --------------------------------------------------------------------------------------------
# The deliberate grid: forward manual == lax and jax.grad through manual == through lax.


def _conv_cases():
    cases = []
    for i, (nd, s, p) in enumerate(itertools.product(GRID_NDS, GRID_STRIDES, GRID_PADDINGS)):
        dilation = (1, 2)[i % 2]
        groups = ("1", "2", "depthwise")[i % 3]
        batch = (1, 3)[(i // 2) % 2]
        dtype = ("float64", "float32")[(i // 3) % 2]
        cases.append((nd, s, p, dilation, groups, batch, dtype))
    return cases


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("nd,stride,padding,dilation,groups,batch,dtype", sampled(_conv_cases()))
def test_conv_grid(nd, stride, padding, dilation, groups, batch, dtype):
    rng = np.random.default_rng(0)
    c_in = 4
    g = {"1": 1, "2": 2, "depthwise": c_in}[groups]
    c_out = 2 * c_in if groups == "depthwise" else 6
    window = (3, 2, 2)[:nd]
    x = rng.normal(size=(batch, *GRID_SPATIAL[nd], c_in)).astype(dtype)
    # He-scaled kernel, as a trained layer has: keeps activations and gradients O(1), which is
    # the scale at which float32's rtol/atol of 1e-5 are meaningful.
    fan_in = np.prod(window) * (c_in // g)
    k = (rng.normal(size=(*window, c_in // g, c_out)) / np.sqrt(fan_in)).astype(dtype)
    b = rng.normal(size=(c_out,)).astype(dtype)
    pad = grid_padding(padding, nd)

    def op(x, k, b, impl):
        return jc.conv(x, k, b, stride=stride, padding=pad, dilation=dilation, groups=g, impl=impl)

    compare_impls(op, (x, k, b), dtype)


# --------------------------------------------------------------------------------------------
# Property tests: over random valid configurations (the conftest hypothesis profile is
# derandomized and bounded: the same examples on every run), manual == lax.


@st.composite
def conv_configs(draw):
    nd = draw(st.integers(1, 3))
    window = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    eff = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    padding = draw(st.one_of(
        st.sampled_from(["VALID", "SAME"]), st.integers(0, 2),
        st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2)) for _ in range(nd)])))
    pads = ([(0, 0)] * nd if padding in ("VALID", "SAME") else
            [(padding, padding)] * nd if isinstance(padding, int) else list(padding))
    spatial = tuple(draw(st.integers(max(1, e - lo - hi), e + 4))
                    for e, (lo, hi) in zip(eff, pads))
    batch = draw(st.integers(1, 2))
    return dict(x=(batch, *spatial, c_in), k=(*window, c_in // groups, c_out), stride=stride,
                padding=padding, dilation=dilation, groups=groups)


@pytest.mark.usefixtures("x64")
@given(conv_configs())
def test_conv_manual_equals_lax(cfg):
    rng = np.random.default_rng(1)
    x, k = rng.normal(size=cfg["x"]), rng.normal(size=cfg["k"])
    b = rng.normal(size=cfg["k"][-1:])
    static = {key: cfg[key] for key in ("stride", "padding", "dilation", "groups")}
    compare_impls(lambda x, k, b, impl: jc.conv(x, k, b, impl=impl, **static), (x, k, b),
                  "float64")


# --------------------------------------------------------------------------------------------
# Finite differences, second order, reverse mode (forward mode cannot go through a custom_vjp).

SECOND_ORDER_CASES = {
    "conv stride 2 SAME dilation 1": lambda x, k, b: jc.conv(x, k, b, stride=2, padding="SAME", impl="manual"),
    "conv groups 2 dilation 2 uneven pad": lambda x, k, b: jc.conv(
        x, k[..., :1, :], b, padding=((1, 2), (0, 1)), dilation=2, groups=2, impl="manual"),
    "conv stride 3 remainder": lambda x, k, b: jc.conv(x, k, b, stride=3, impl="manual"),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", sampled(sorted(SECOND_ORDER_CASES), 3, (0,)))
def test_conv_check_grads_second_order(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 8, 2))
    k = rng.normal(size=(3, 2, 2, 4))
    b = rng.normal(size=(4,))
    check_grads(SECOND_ORDER_CASES[name], (x, k, b), order=2, modes=["rev"])


# --------------------------------------------------------------------------------------------
# The scatter form of dX equals the gather form.


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("stride,padding,dilation,groups", sampled([
    (1, "VALID", 1, 1), (2, "SAME", 1, 2), (3, ((2, 0), (1, 3)), 2, 1), (2, 1, 2, 4)], 4, (1, 2)))
def test_input_grad_scatter_form_equals_gather_form(stride, padding, dilation, groups):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 8, 4))
    k = rng.normal(size=(3, 2, 4 // groups, 4))
    cfg = _shapes.conv_config(x.shape, k.shape, None, stride=stride, padding=padding,
                              dilation=dilation, groups=groups)
    dz = rng.normal(size=(2, *_shapes.output_spatial((9, 8), cfg), 4))
    gather = _conv_input_grad_gather(dz, k, x.shape, cfg, groups)
    scatter = _conv_input_grad_scatter(dz, k, x.shape, cfg, groups)
    assert_close(scatter, gather, "float64")


# --------------------------------------------------------------------------------------------
# Shapes that used to be slow on the manual path (issue 9): large windows, long 1-D kernels,
# many channels, 3-D, a 1x1 convolution with a stride. Small sizes, the same configurations.

SLOW_SHAPE_CASES = {
    "2-D 7x7 stride 2 SAME": ((2, 11, 10, 3), (7, 7, 3, 4), dict(stride=2, padding="SAME")),
    "1-D kernel 33": ((2, 40, 3), (33, 3, 2), {}),
    "1-D kernel 129, blocks of taps": ((1, 140, 17), (129, 17, 2), dict(padding=3)),
    "2-D 5x5 many channels": ((1, 7, 6, 40), (5, 5, 40, 36), dict(padding="SAME")),
    "2-D 11x11 stride 4": ((1, 23, 21, 3), (11, 11, 3, 4), dict(stride=4)),
    "3-D 7x7x7": ((1, 8, 9, 7, 2), (7, 7, 7, 2, 3), dict(padding=((1, 0), (0, 1), (2, 1)))),
    "3-D 3x3x3 dilation 2 groups 2": ((1, 7, 7, 6, 4), (3, 3, 3, 2, 4),
                                      dict(dilation=2, groups=2, padding="SAME")),
    "2-D 1x1 stride 2": ((2, 5, 6, 8), (1, 1, 8, 9), dict(stride=2)),
    "2-D depthwise 5x5 multiplier 2": ((1, 9, 9, 5), (5, 5, 1, 10), dict(groups=5, padding=2)),
    # stride and dilation with a common factor: only every 2nd / 3rd input is read
    "2-D 3x3 stride 2 dilation 2 SAME": ((2, 9, 8, 3), (3, 3, 3, 4),
                                         dict(stride=2, dilation=2, padding="SAME")),
    "2-D 3x3 stride (4, 1) dilation (2, 3), uneven padding": (
        (1, 13, 7, 2), (3, 3, 2, 3), dict(stride=(4, 1), dilation=(2, 3),
                                          padding=((1, 2), (0, 1)))),
    "1-D 5 stride 6 dilation 3 groups 2": ((2, 31, 4), (5, 2, 4),
                                           dict(stride=6, dilation=3, groups=2, padding=3)),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name,dtype", sampled(
    [(n, "float64") for n in sorted(SLOW_SHAPE_CASES)]
    + [(n, "float32") for n in ("1-D kernel 129, blocks of taps", "2-D 5x5 many channels",
                                "3-D 7x7x7")], 2, (0,)))
def test_shapes_that_used_to_be_slow(name, dtype):
    x_shape, k_shape, options = SLOW_SHAPE_CASES[name]
    rng = np.random.default_rng(3)
    x = rng.normal(size=x_shape).astype(dtype)
    k = (rng.normal(size=k_shape) / np.sqrt(np.prod(k_shape[:-1]))).astype(dtype)
    b = rng.normal(size=k_shape[-1:]).astype(dtype)
    compare_impls(lambda x, k, b, impl: jc.conv(x, k, b, impl=impl, **options), (x, k, b), dtype)


# Every formulation of the engine (jaxcnn/_patches.py): the elementwise product, the patch
# matrix in several tiles and blocks, the folded form in several tiles, the scatter-order input
# gradient, with tiles made small so that the loops run more than once. Each is checked against
# lax's forward and its two gradients.

ENGINE_CASES = {
    # name: (x shape, kernel shape, options, expected product, at least this many tiles)
    "elementwise (short contraction)": ((2, 9, 8, 2), (3, 3, 2, 5), dict(padding="SAME"),
                                        "elementwise", 1),
    "elementwise, grouped": ((2, 9, 8, 8), (3, 3, 2, 8), dict(groups=4, padding=1),
                             "elementwise", 1),
    "patch matrix, row tiles, stride": ((1, 13, 12, 12), (3, 3, 12, 40),
                                        dict(stride=2, padding=((1, 2), (0, 1))), "matmul", 2),
    "patch matrix, blocks of taps (1-D)": ((3, 60, 24), (33, 24, 9), dict(padding=4), "matmul", 2),
    "patch matrix, groups": ((2, 9, 8, 20), (3, 3, 10, 8), dict(groups=2, dilation=(2, 1)),
                             "matmul", 2),
    "folded form, image tiles": ((5, 7, 7, 16), (3, 3, 16, 8), dict(padding="SAME"), "fold", 2),
    "folded form, last-dim stride and dilation": ((3, 8, 11, 16), (2, 3, 16, 6),
                                                  dict(stride=(1, 2), dilation=(2, 1)), "fold", 2),
    # A batch with no divisor near the tile's fit (7 images, 3 or 4 per tile): the last tile
    # is padded with zero images (_cut).
    "folded form, padded image tiles": ((7, 4, 5, 8), (3, 3, 8, 4), dict(padding="SAME"),
                                        "fold", 2),
    "patch matrix, padded image tiles": ((7, 6, 6, 8), (2, 2, 8, 80), {}, "matmul", 2),
    # One tile, with a stride in the last dim or a single tap: the patch is cut as slices of
    # the input's phase view (_patch_slices) instead of gathered.
    "patch as slices, stride and uneven padding": ((1, 7, 9, 12), (3, 3, 12, 10),
                                                    dict(stride=2, padding=((2, 1), (0, 2))),
                                                    "slices", 1),
    "patch as slices, strides and dilation": ((1, 9, 14, 12), (2, 3, 12, 6),
                                              dict(stride=(2, 3), dilation=2), "slices", 1),
    "patch as slices, one tap": ((2, 5, 6, 16), (1, 1, 16, 8), {}, "slices", 1),
    "patch as slices, kernel dilation (1-D)": ((2, 20, 24), (3, 24, 4),
                                               dict(dilation=4, padding=3), "slices", 1),
    # Strides in the dims before the last, with a wide window and few channels: the folded
    # form with those dims cut into blocks of s rows (_fold_dims), in image tiles.
    "folded form, outer strides (2-D)": ((3, 12, 11, 6), (7, 5, 6, 4),
                                         dict(stride=(3, 2), padding=((3, 1), (2, 2))), "fold", 2),
    "folded form, outer strides (3-D, last-dim dilation)": ((3, 7, 8, 9, 4), (5, 3, 3, 4, 4),
                                                            dict(stride=(2, 3, 1),
                                                                 dilation=(1, 1, 2)), "fold", 2),
    # A stride at least the window, or dividing it, runs as a stride-1 correlation of the
    # phases (_strides_to_phases): windows of 2 and 4 with stride 2, of 3 with stride 4.
    "stride as phases (2-D)": ((2, 13, 12, 12), (2, 4, 12, 10),
                               dict(stride=2, padding=((1, 0), (0, 3))), "phases", 1),
    "stride as phases (1-D, window below the stride)": ((3, 22, 24), (3, 24, 9),
                                                        dict(stride=4, padding=1), "phases", 1),
}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tile budgets small enough that every case runs its loops more than once."""
    from jaxcnn import _xla_cpu
    monkeypatch.setattr(_xla_cpu, "ENABLED", True)
    monkeypatch.setattr(_xla_cpu, "TILE_BYTES", 24_000)
    monkeypatch.setattr(_xla_cpu, "ONE_TILE_BYTES", 24_000)
    monkeypatch.setattr(_xla_cpu, "FOLD_TILE_BYTES", 40_000)


@pytest.mark.usefixtures("x64", "small_tiles")
@pytest.mark.parametrize("name", sorted(ENGINE_CASES))
def test_every_formulation_of_the_engine(name):
    _check_engine_case(name)


# Long 1-D windows: the kernel gradient as a 2-D folded one on overlapping frames of the input
# (_patches._kernel_grad_framed). The first two the cost model frames itself; the others are
# framed by force: uneven padding, an output and a window that are not multiples of the block,
# a block of 2, one channel in.
FRAMED_CASES = [
    ((1, 200, 4), (65, 4, 4), "SAME", None),
    ((2, 120, 8), (33, 8, 8), ((5, 9),), None),
    ((2, 23, 3), (10, 3, 5), ((4, 1),), (4, 3)),
    ((1, 19, 1), (7, 1, 2), "VALID", (2, 4)),
    ((3, 16, 2), (9, 2, 3), ((0, 8),), (3, 3)),
]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("case", range(len(FRAMED_CASES)))
def test_framed_kernel_gradient_of_long_1d_windows(case, monkeypatch):
    from jaxcnn import _patches

    x_shape, k_shape, padding, forced = FRAMED_CASES[case]
    cfg = _shapes.conv_config(x_shape, k_shape, None, stride=1, padding=padding, dilation=1,
                              groups=1)
    if forced is None:
        assert _patches._framing(x_shape, k_shape, cfg, 1) is not None
    else:
        assert _patches._framing(x_shape, k_shape, cfg, 1) is None
        monkeypatch.setattr(_patches, "_framing",         # the 1-D call, not the 2-D one
                            lambda x_shape, *args: forced if len(x_shape) == 3 else None)
    rng = np.random.default_rng(case)
    x, k = rng.normal(size=x_shape), rng.normal(size=k_shape)
    z_ref, vjp = jax.vjp(lambda k: jc.conv(x, k, padding=padding, impl="lax"), k)
    dz = rng.normal(size=z_ref.shape)
    dk = jax.jit(lambda x, dz: _patches.kernel_grad(x, dz, k_shape, cfg, 1))(x, dz)
    assert_close(dk, vjp(dz)[0], "float64", "dK")
    # and through the layer's own backward, input gradient included
    compare_impls(lambda x, k, impl: jc.conv(x, k, padding=padding, impl=impl), (x, k),
                  "float64")


@pytest.mark.parametrize("count, fit, cut", [
    (32, 5, (4, 8)),      # a divisor at least half the fit: no padded images
    (128, 12, (8, 16)),
    (7, 4, (4, 2)),       # no such divisor: balanced, the last piece padded by one
    (7, 3, (3, 3)),
    (7, 7, (7, 1)), (7, 100, (7, 1)), (5, 0, (1, 5)),
])
def test_tiles_divide_the_batch_where_they_can(count, fit, cut):
    from jaxcnn import _patches
    assert _patches._cut(count, fit) == cut


@pytest.mark.usefixtures("x64", "small_tiles")
@pytest.mark.parametrize("name", [n for n in sorted(ENGINE_CASES) if n.startswith("folded form")])
def test_folded_form_with_its_outer_taps_in_a_loop(name, monkeypatch):
    """The folded form with more outer taps than FOLD_UNROLL sums them in a fori_loop."""
    from jaxcnn import _patches
    monkeypatch.setattr(_patches, "FOLD_UNROLL", 1)
    _check_engine_case(name)


# The folded form wherever it applies, whether or not the cost model would choose it: strides
# in the outer dims with windows below, equal to and above the stride, a stride-1 dim between
# strided ones, a dilated last dim (the engine cases above add uneven padding and an outer
# dilation without a stride).
FORCED_FOLD_CASES = [
    ((2, 13, 11, 8), (7, 7, 8, 5), dict(stride=2, padding="SAME")),
    ((1, 9, 10, 8, 6), (3, 5, 2, 6, 4), dict(stride=(2, 1, 3), dilation=(1, 1, 2))),
    ((1, 10, 9, 11, 4), (3, 4, 3, 4, 3), dict(stride=(2, 3, 2), padding="SAME")),
]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("case", range(len(FORCED_FOLD_CASES)))
def test_folded_form_wherever_it_applies(case, monkeypatch):
    from jaxcnn import _patches

    x_shape, k_shape, options = FORCED_FOLD_CASES[case]
    fold_bytes = _patches._fold_bytes

    def always_cheaper(*args, **kwargs):
        cost = fold_bytes(*args, **kwargs)
        return None if cost is None else (cost[1] + 1, *cost[1:])

    monkeypatch.setattr(_patches, "_fold_bytes", always_cheaper)
    cfg = _shapes.conv_config(x_shape, k_shape, None, stride=options.get("stride", 1),
                              padding=options.get("padding", "VALID"),
                              dilation=options.get("dilation", 1), groups=1)
    assert _patches.plan(x_shape, k_shape, cfg, 1, 8).product == "fold"
    rng = np.random.default_rng(case)
    x, k = rng.normal(size=x_shape), rng.normal(size=k_shape)
    compare_impls(lambda x, k, impl: jc.conv(x, k, impl=impl, **options), (x, k), "float64")


def _check_engine_case(name):
    from jaxcnn import _patches
    from jaxcnn.convolution import _conv_input_grad

    x_shape, k_shape, options, product, tiles = ENGINE_CASES[name]
    groups = options.get("groups", 1)
    cfg = _shapes.conv_config(x_shape, k_shape, None, stride=options.get("stride", 1),
                              padding=options.get("padding", "VALID"),
                              dilation=options.get("dilation", 1), groups=groups)
    plan = _patches.plan(x_shape, k_shape, cfg, groups, 8)
    if product == "phases":
        assert plan.product != "elementwise" and _patches._phases_pay(k_shape, cfg, groups)
    elif product == "slices":
        assert (plan.product, plan.patch, plan.tiles) == ("matmul", "slices", 1), plan
    else:
        assert plan.product == product and plan.tiles >= tiles and plan.patch == "gather", plan
        assert not _patches._phases_pay(k_shape, cfg, groups)
    rng = np.random.default_rng(5)
    x, k = rng.normal(size=x_shape), rng.normal(size=k_shape)
    z_ref, vjp = jax.vjp(lambda x, k: jc.conv(x, k, impl="lax", **options), x, k)
    dz = rng.normal(size=z_ref.shape)
    dx_ref, dk_ref = vjp(dz)
    z, dk, dx, dx_scatter = jax.jit(lambda x, k, dz: (
        _patches.correlate(x, k, cfg, groups), _patches.kernel_grad(x, dz, k.shape, cfg, groups),
        _conv_input_grad(dz, k, x.shape, cfg, groups),
        _conv_input_grad_scatter(dz, k, x.shape, cfg, groups)))(x, k, dz)
    assert_close(z, z_ref, "float64", "forward")
    assert_close(dk, dk_ref, "float64", "dK")
    assert_close(dx, dx_ref, "float64", "dX")
    assert_close(dx_scatter, dx_ref, "float64", "dX, scatter order")


@pytest.mark.parametrize("token", [np.float32(np.nan), np.float32(-np.inf), np.float32(2.0)])
def test_a_product_ordered_after_another_still_runs(token, monkeypatch):
    """_xla_cpu.after only orders: whatever the token holds (NaN, inf), the op runs and its
    result comes back, inside jit and under grad."""
    from jaxcnn import _xla_cpu
    monkeypatch.setattr(_xla_cpu, "ENABLED", True)
    x = np.arange(6, dtype=np.float32)
    f = jax.jit(lambda t, x: _xla_cpu.after(t, lambda x: jnp.sin(x) * 3, x))
    assert_close(f(np.full(4, token), x), np.sin(x) * 3, "float32", "after")
    g = jax.grad(lambda x: jnp.sum(f(np.full(2, token), x)))(x)
    assert_close(g, np.cos(x) * 3, "float32", "grad of after")


def test_manual_conv_uses_no_lax_convolution_and_goes_through_the_custom_vjp():
    """The manual path computes with gathers, pads, slices and matrix products only, and its
    gradient is the registered custom VJP (not JAX's autodiff of the forward)."""
    x = np.ones((1, 9, 9, 2), np.float32)
    k = np.ones((3, 3, 2, 3), np.float32)
    for op in (lambda x, k: jc.conv(x, k, stride=2, padding="SAME", impl="manual"),
               lambda x, k: jc.conv(x, k, padding=1, impl="manual"),
               lambda x, k: jc.conv(x, k, stride=2, dilation=2, padding="SAME", impl="manual"),
               lambda x, k: jc.conv_transpose(x[..., :1].repeat(3, -1), k, stride=2,
                                              impl="manual")):
        grad = str(jax.make_jaxpr(jax.grad(lambda x, k: jnp.sum(op(x, k)), (0, 1)))(x, k))
        assert "conv_general_dilated" not in grad and "reduce_window" not in grad
        assert "custom_vjp_call" in str(jax.make_jaxpr(op)(x, k))


# --------------------------------------------------------------------------------------------
# Transformations of conv alone (jit / vmap / grad-of-grad over every op: test_transformations.py).


def test_vmap_of_manual_conv_over_kernels():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 1)), jnp.float32)
    ks = jnp.asarray(rng.normal(size=(4, 3, 3, 1, 2)), jnp.float32)
    got = jax.vmap(lambda k: jc.conv(x, k, impl="manual"))(ks)
    want = jnp.stack([jc.conv(x, k) for k in ks])
    assert_close(got, want, "float32")


# --------------------------------------------------------------------------------------------
# The lecture's worked example, by hand: X 3x3, K 2x2, Z 2x2.


@pytest.mark.usefixtures("x64")
def test_lecture_worked_example_by_hand():
    X = np.array([[1., 2., 0.], [3., -1., 4.], [2., 1., -2.]])
    K = np.array([[1., -1.], [2., 0.5]])
    B = 0.5
    c = np.array([[1., -2.], [0.5, 3.]])            # L = Σ_ij c_ij z_ij, so dL/dz_ij = c_ij
    x, k = X[None, :, :, None], K[:, :, None, None]
    # Forward: z_ij = Σ_mn X[i+m, j+n] K_mn + B.
    Z = np.array([[np.sum(X[i:i + 2, j:j + 2] * K) + B for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(jc.conv(x, k, jnp.asarray([B]), impl="manual")[0, :, :, 0], Z)

    loss = lambda x, k, b: jnp.sum(jc.conv(x, k, b, impl="manual")[0, :, :, 0] * c)   # noqa: E731
    dx, dk, db = jax.grad(loss, argnums=(0, 1, 2))(x, k, jnp.asarray([B]))
    dZ = c
    # dL/dK_mn = Σ_ij dL/dz_ij · ∂z_ij/∂K_mn, and ∂z_ij/∂K_mn = X[i+m, j+n].
    dK = np.zeros((2, 2))
    for m, n in itertools.product(range(2), range(2)):
        dK[m, n] = sum(dZ[i, j] * X[i + m, j + n] for i in range(2) for j in range(2))
    np.testing.assert_allclose(dk[:, :, 0, 0], dK)
    # dL/dB = Σ_ij dL/dz_ij.
    np.testing.assert_allclose(db, [dZ.sum()])
    # dL/dX = (dL/dZ zero-padded by 1) correlated with rot180(K).
    dZpad = np.pad(dZ, 1)
    Krot = K[::-1, ::-1]
    dX = np.array([[np.sum(dZpad[p:p + 2, q:q + 2] * Krot) for q in range(3)] for p in range(3)])
    np.testing.assert_allclose(dx[0, :, :, 0], dX)
    # And element by element from the chain rule: dL/dX_pq = Σ_ij dZ_ij · K[p-i, q-j].
    for p, q in itertools.product(range(3), range(3)):
        terms = [dZ[i, j] * K[p - i, q - j] for i in range(2) for j in range(2)
                 if 0 <= p - i < 2 and 0 <= q - j < 2]
        assert dX[p, q] == pytest.approx(sum(terms))


# --------------------------------------------------------------------------------------------
# Bad input: a clear ValueError / TypeError before any computation, the same for both impls.

ERROR_CASES = [
    # (call, exception, message pattern)
    (lambda i: jc.conv(X[0], K, impl=i), ValueError,
     r"conv: x must have rank 4, \(N, \*spatial, C_in\) with 2 spatial dims .* got x shape \(8, 8, 3\)"),
    (lambda i: jc.conv(X, K[0, 0], impl=i), ValueError,
     r"conv: kernel must have rank 3, 4 or 5, .* got kernel shape \(3, 4\) \(rank 2\)"),
    (lambda i: jc.conv(X, np.zeros((3, 3, 2, 4), np.float32), impl=i), ValueError,
     r"conv: kernel in-channels \(kernel.shape\[-2\]=2\) times groups \(1\) must equal x channels "
     r"\(x.shape\[-1\]=3\); x has shape \(2, 8, 8, 3\), kernel \(3, 3, 2, 4\)"),
    (lambda i: jc.conv(X, K, groups=2, impl=i), ValueError,
     r"conv: groups \(2\) must divide the x channels \(x.shape\[-1\]=3\)"),
    (lambda i: jc.conv(np.zeros((1, 8, 8, 4), np.float32), np.zeros((3, 3, 2, 3), np.float32),
                       groups=2, impl=i), ValueError,
     r"conv: groups \(2\) must divide the kernel out-channels \(kernel.shape\[-1\]=3\)"),
    (lambda i: jc.conv(X, K, groups=0, impl=i), ValueError, r"conv: groups must be >= 1; got 0"),
    (lambda i: jc.conv(X, K, groups=1.0, impl=i), TypeError, r"conv: groups must be an int; got float 1.0"),
    (lambda i: jc.conv(X, K, stride=0, impl=i), ValueError, r"conv: stride must be >= 1; got 0"),
    (lambda i: jc.conv(X, K, stride=1.5, impl=i), TypeError,
     r"conv: stride must be an int or a tuple of ints; got 1.5"),
    (lambda i: jc.conv(X, K, stride=(1, 2, 1), impl=i), ValueError,
     r"conv: stride must be an int or a tuple of 2 ints \(one per spatial dimension\); got \(1, 2, 1\)"),
    (lambda i: jc.conv(X, K, dilation=0, impl=i), ValueError, r"conv: dilation must be >= 1; got 0"),
    (lambda i: jc.conv(X, K, padding="FULL", impl=i), ValueError,
     r"conv: padding must be 'VALID', 'SAME', an int or 2 \(low, high\) pairs; got 'FULL'"),
    (lambda i: jc.conv(X, K, padding=-1, impl=i), ValueError, r"conv: padding must be >= 0; got -1"),
    (lambda i: jc.conv(X, K, padding=((1, -1), (0, 0)), impl=i), ValueError,
     r"conv: padding must be >= 0; got \(\(1, -1\), \(0, 0\)\)"),
    (lambda i: jc.conv(X, K, padding=((1, 1),), impl=i), ValueError,
     r"conv: padding must be .* \(one per spatial dimension\); got \(\(1, 1\),\)"),
    (lambda i: jc.conv(X, K, padding=1.0, impl=i), TypeError, r"conv: padding must be .* got float 1.0"),
    (lambda i: jc.conv(X, K, dilation=4, impl=i), ValueError,
     r"conv: the dilated kernel window \(9, 9\) \(kernel \(3, 3\) with dilation \(4, 4\)\) is larger "
     r"than the padded input \(8, 8\)"),
    (lambda i: jc.conv(X, K, np.zeros((3,), np.float32), impl=i), ValueError,
     r"conv: bias must have shape \(C_out,\) = \(4,\); got bias shape \(3,\)"),
    (lambda i: jc.conv(X.astype(np.int32), K, impl=i), TypeError,
     r"conv: x must have a floating dtype .* got int32"),
    (lambda i: jc.conv("x", K, impl=i), TypeError, r"conv: x must be an array; got str"),
]


test_bad_input_message = bad_input_test(ERROR_CASES)


# ============================================================================================
# conv_transpose: the adjoint of conv in its input.

def _transpose_cases():
    cases = []
    for i, (nd, s, p) in enumerate(itertools.product(GRID_NDS, GRID_STRIDES, GRID_PADDINGS)):
        dilation = (1, 2)[i % 2]
        groups = ("1", "2")[(i // 2) % 2]
        output_padding = 0 if p == "SAME" else (i % max(s, dilation))
        dtype = ("float64", "float32")[(i // 3) % 2]
        cases.append((nd, s, p, dilation, groups, output_padding, dtype))
    return cases


def _transpose_args(nd, groups, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c_x, c_y = 4, 6
    window = (3, 2, 2)[:nd]
    y = rng.normal(size=(2, *(4, 5, 3)[:nd], c_y)).astype(dtype)
    k = (rng.normal(size=(*window, c_x // groups, c_y)) / np.sqrt(np.prod(window) * c_y)
         ).astype(dtype)
    b = rng.normal(size=(c_x,)).astype(dtype)
    return y, k, b


def _transpose_grid():
    """Every third case in the default run (each nd, stride and padding form still appears);
    the rest under ``-m slow``."""
    return [c if i % 3 == 0 else pytest.param(*c, marks=pytest.mark.slow)
            for i, c in enumerate(_transpose_cases())]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("nd,stride,padding,dilation,groups,output_padding,dtype",
                         _transpose_grid())
def test_conv_transpose_grid(nd, stride, padding, dilation, groups, output_padding, dtype):
    g = int(groups)
    y, k, b = _transpose_args(nd, g, dtype)
    pad = grid_padding(padding, nd)

    def op(y, k, b, impl):
        return jc.conv_transpose(y, k, b, stride=stride, padding=pad, dilation=dilation, groups=g,
                                 output_padding=output_padding, impl=impl)

    compare_impls(op, (y, k, b), dtype)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("nd,stride,padding,dilation,groups,output_padding",
                         sampled([c[:6] for c in _transpose_cases()[1::6]], 2, (0,)))
def test_conv_transpose_is_the_adjoint_of_conv(nd, stride, padding, dilation, groups,
                                               output_padding):
    """<conv(x, K), y> = <x, conv_transpose(y, K)> for random x and y, both impls."""
    g = int(groups)
    y, k, _ = _transpose_args(nd, g, "float64", seed=1)
    pad = grid_padding(padding, nd)
    options = dict(stride=stride, padding=pad, dilation=dilation, groups=g)
    for impl in IMPLS:
        xt = jc.conv_transpose(y, k, output_padding=output_padding, impl=impl, **options)
        x = np.random.default_rng(2).normal(size=xt.shape)
        # the convolution cut to y's size (output_padding at or above the stride, allowed below
        # the dilation as in PyTorch, adds result rows that no entry of y reaches)
        z = jc.conv(x, k, impl=impl, **options)[(slice(None), *map(slice, y.shape[1:-1]))]
        assert z.shape == y.shape
        lhs, rhs = float(jnp.vdot(z, y)), float(jnp.vdot(x, xt))
        assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs)), (impl, lhs, rhs)


@pytest.mark.usefixtures("x64")
def test_conv_transpose_check_grads_second_order():
    rng = np.random.default_rng(4)
    y, k, b = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(2,))
    check_grads(lambda y, k, b: jc.conv_transpose(y, k, b, stride=2, padding=((1, 0), (0, 1)),
                                                  output_padding=1, impl="manual"),
                (y, k, b), order=2, modes=["rev"])


@pytest.mark.usefixtures("x64")
def test_conv_transpose_by_hand():
    """1-D, one channel, kernel [1, 10], stride 2: each y_i lays down y_i · K at 2 i."""
    y = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    k = np.array([1.0, 10.0]).reshape(2, 1, 1)
    want = [1, 10, 2, 20, 3, 30]
    for impl in IMPLS:
        out = jc.conv_transpose(y, k, stride=2, impl=impl)
        np.testing.assert_allclose(np.ravel(out), want)
        # output_padding adds the row a stride-2 convolution of a 7-long input also ignores;
        # padding 1 (of the convolution being transposed) crops one row at each end.
        np.testing.assert_allclose(np.ravel(jc.conv_transpose(y, k, stride=2, output_padding=1,
                                                              impl=impl)), want + [0])
        np.testing.assert_allclose(np.ravel(jc.conv_transpose(y, k, stride=2, padding=1,
                                                              impl=impl)), want[1:-1])
        # with overlap (stride 1) the contributions add: [1, 10+2, 20+3, 30]
        np.testing.assert_allclose(np.ravel(jc.conv_transpose(y, k, impl=impl)), [1, 12, 23, 30])


@pytest.mark.parametrize("n,s", [(3, 1), (4, 2), (5, 3)])
def test_conv_transpose_same_multiplies_the_size_by_the_stride(n, s):
    y = np.zeros((1, n, n, 2), np.float32)
    k = np.zeros((3, 3, 5, 2), np.float32)
    for impl in IMPLS:
        assert jc.conv_transpose(y, k, stride=s, padding="SAME", impl=impl).shape == (
            1, n * s, n * s, 5)


Y_T = np.zeros((2, 4, 4, 6), np.float32)
K_T = np.zeros((3, 3, 2, 6), np.float32)

TRANSPOSE_ERROR_CASES = [
    (lambda i: jc.conv_transpose(Y_T[..., :5], K_T, impl=i), ValueError,
     r"conv_transpose: y channels \(y.shape\[-1\]=5\) must equal the kernel's last dim "
     r"\(kernel.shape\[-1\]=6\)"),
    (lambda i: jc.conv_transpose(Y_T, K_T, stride=2, output_padding=2, impl=i), ValueError,
     r"conv_transpose: output_padding must be smaller than the stride or the dilation .* got "
     r"output_padding \(2, 2\), stride \(2, 2\)"),
    (lambda i: jc.conv_transpose(Y_T, K_T, output_padding=-1, impl=i), ValueError,
     r"conv_transpose: output_padding must be >= 0; got -1"),
    (lambda i: jc.conv_transpose(Y_T, K_T, stride=2, padding="SAME", output_padding=1, impl=i),
     ValueError, r"conv_transpose: output_padding must be 0 with padding 'SAME'"),
    (lambda i: jc.conv_transpose(Y_T, K_T, padding=4, impl=i), ValueError,
     r"conv_transpose: the result would have spatial size \(-2, -2\)"),
    (lambda i: jc.conv_transpose(Y_T, K_T, np.zeros(6, np.float32), impl=i), ValueError,
     r"conv_transpose: bias must have shape \(C_out,\) = \(2,\)"),
    (lambda i: jc.conv_transpose(Y_T, K_T, groups=4, impl=i), ValueError,
     r"conv_transpose: groups \(4\) must divide the y channels"),
    (lambda i: jc.conv_transpose(Y_T[0], K_T, impl=i), ValueError,
     r"conv_transpose: y must have rank 4"),
    (lambda i: jc.conv_transpose(Y_T, K_T, padding="FULL", impl=i), ValueError,
     r"conv_transpose: padding must be 'VALID', 'SAME'"),
]


test_conv_transpose_bad_input_message = bad_input_test(TRANSPOSE_ERROR_CASES)


def test_conv_transpose_layer_applies_its_op_and_inverts_conv_shapes():
    from jaxcnn.nn import Conv, ConvTranspose
    key = jax.random.key(0)
    layer = ConvTranspose(6, 3, stride=2, padding="SAME", groups=2)
    shape, params = layer.init(key, (-1, 5, 4, 4))
    assert shape == (-1, 10, 8, 6)
    assert params["kernel"].shape == (3, 3, 3, 4) and params["bias"].shape == (6,)
    # He initialisation with PyTorch's fan-in of a transposed convolution: 3·3·(6 / 2).
    big = ConvTranspose(64, 3, init="he").init(key, (-1, 8, 8, 32))[1]["kernel"]
    assert abs(float(jnp.std(big)) - (2 / (3 * 3 * 64)) ** 0.5) < 0.01
    y = np.random.default_rng(0).normal(size=(2, 5, 4, 4)).astype(np.float32)
    params = {**params, "bias": jnp.arange(6.0)}
    for impl in IMPLS:
        np.testing.assert_array_equal(
            layer.apply(params, y, impl=impl),
            jc.conv_transpose(y, params["kernel"], params["bias"], stride=2, padding="SAME",
                              groups=2, impl=impl))
    # A decoder undoes an encoder's shapes: Conv stride 2 then ConvTranspose stride 2.
    enc = Conv(8, 3, stride=2, padding="SAME").init(key, (-1, 12, 12, 3))[0]
    assert ConvTranspose(3, 3, stride=2, padding="SAME").init(key, enc)[0] == (-1, 12, 12, 3)
    assert "bias" not in ConvTranspose(6, 3, use_bias=False).init(key, (-1, 5, 5, 2))[1]
    with pytest.raises(ValueError, match=r"ConvTranspose: groups \(4\) must divide "
                                         r"out_channels \(6\)"):
        ConvTranspose(6, 3, groups=4)
    with pytest.raises(ValueError, match=r"conv_transpose: groups \(2\) must divide the y "
                                         r"channels"):
        ConvTranspose(6, 3, groups=2).init(key, (-1, 5, 5, 3))
