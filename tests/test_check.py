"""The derivation-check tool: check_vjp catches wrong VJPs, and the command line reports them."""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import _shapes, _windows, check
from jaxcnn.check import grid as check_grid
from jaxcnn.check.__main__ import main as check_main
from jaxcnn.pooling import max_pool
from jaxcnn._shapes import WindowConfig

from jaxcnn import convolution as conv_mod
from jaxcnn import activations, losses


def _conv_reference(x, k, cfg):
    return conv_mod._conv_lax(x, k, None, cfg, 1)


def _conv_arrays(x_shape, k_shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(x_shape), rng.standard_normal(k_shape)


# --------------------------------------------------------------------------------------------
# Deliberately broken backward rules, built the way a student might get them wrong. They are
# written here from the lecture's formula (single group), so that only the one mistake differs.


def _dk(x, k, cfg, dz):
    """The right kernel gradient (so that only dX is wrong)."""
    return jax.vjp(lambda k: conv_mod._conv_lax(x, k, None, cfg, 1), k)[1](dz)[0]


def _dx(dz, k, x_shape, cfg, *, rotate=True, remainder=True):
    """dX = pad(dilate_s(dZ)) ⋆ rot180(K)ᵀ, paddings low = k_eff-1-lo, high = k_eff-1-hi+r."""
    pads = []
    for n, (lo, hi), ke, s in zip(x_shape[1:-1], cfg.padding, cfg.effective_window, cfg.stride):
        r = _shapes.stride_remainder(n, (lo, hi), ke, s) if remainder else 0
        pads.append((ke - 1 - lo, ke - 1 - hi + r))
    dz_dil = _windows.pad(dz, ((0, 0),) * cfg.ndim, interior=tuple(s - 1 for s in cfg.stride))
    kt = jnp.flip(k, axis=tuple(range(cfg.ndim))) if rotate else k
    kt = jnp.swapaxes(kt, -1, -2)                                # in/out channels swapped
    back = WindowConfig(cfg.window, (1,) * cfg.ndim, tuple(pads), cfg.dilation)
    return conv_mod._conv_manual_forward(dz_dil, kt, None, back, 1)


def _conv_fwd(x, k, cfg):
    return conv_mod._conv_manual_forward(x, k, None, cfg, 1), (x, k)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_right(x, k, cfg):
    """The lecture's backward, correctly: the control for the broken ones below."""
    return conv_mod._conv_manual_forward(x, k, None, cfg, 1)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_no_rotation(x, k, cfg):
    """dX correlates the padded dZ with K itself, not with rot180(K)."""
    return conv_mod._conv_manual_forward(x, k, None, cfg, 1)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_no_remainder(x, k, cfg):
    """dX forgets the + r on the high side: it comes out r rows short."""
    return conv_mod._conv_manual_forward(x, k, None, cfg, 1)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_remainder_first(x, k, cfg):
    """dX forgets the + r, then 'fixes' the shape by padding the low side instead."""
    return conv_mod._conv_manual_forward(x, k, None, cfg, 1)


def _remainder_first_dx(dz, k, x_shape, cfg):
    short = _dx(dz, k, x_shape, cfg, remainder=False)
    missing = [(n - m, 0) for n, m in zip(x_shape[1:-1], short.shape[1:-1])]
    return jnp.pad(short, [(0, 0), *missing, (0, 0)])


conv_right.defvjp(_conv_fwd, lambda cfg, res, dz: (
    _dx(dz, res[1], res[0].shape, cfg), _dk(*res, cfg, dz)))
conv_no_rotation.defvjp(_conv_fwd, lambda cfg, res, dz: (
    _dx(dz, res[1], res[0].shape, cfg, rotate=False), _dk(*res, cfg, dz)))
conv_no_remainder.defvjp(_conv_fwd, lambda cfg, res, dz: (
    _dx(dz, res[1], res[0].shape, cfg, remainder=False), _dk(*res, cfg, dz)))
conv_remainder_first.defvjp(_conv_fwd, lambda cfg, res, dz: (
    _remainder_first_dx(dz, res[1], res[0].shape, cfg), _dk(*res, cfg, dz)))


@jax.custom_vjp
def dense_transposed_dw(x, w):
    """dW = (xᵀ·dZ)ᵀ: the right shape for a square W, the wrong numbers."""
    return x @ w


@jax.custom_vjp
def dense_w_not_transposed(x, w):
    """dx = dZ·W instead of dZ·Wᵀ (again only shape-correct for a square W)."""
    return x @ w


def _dense_fwd(x, w):
    return x @ w, (x, w)


dense_transposed_dw.defvjp(_dense_fwd, lambda res, dz: (dz @ res[1].T, (res[0].T @ dz).T))
dense_w_not_transposed.defvjp(_dense_fwd, lambda res, dz: (dz @ res[1], res[0].T @ dz))


# --------------------------------------------------------------------------------------------
# check_vjp


def test_check_vjp_passes_the_real_conv(x64):
    x, k = _conv_arrays((2, 6, 6, 2), (3, 3, 2, 3))
    b = np.arange(3.0)
    cfg = _shapes.conv_config(x.shape, k.shape, b.shape, stride=2, padding="VALID",
                              dilation=1, groups=1)
    result = check.check_vjp(conv_mod._conv_manual, conv_mod._conv_lax, x, k, b, cfg, 1)
    assert result, str(result)
    assert [a.name for a in result.args] == ["x", "kernel", "bias"]
    assert result.failed_args == []
    assert "ok" in str(result)


@pytest.mark.parametrize("stride", [1, 2])
def test_check_vjp_passes_the_test_formula(x64, stride):
    x, k = _conv_arrays((1, 6, 7, 2), (3, 2, 2, 3))
    cfg = _shapes.conv_config(x.shape, k.shape, None, stride=stride, padding="VALID",
                              dilation=1, groups=1)
    result = check.check_vjp(conv_right, _conv_reference, x, k, cfg)
    assert result, str(result)


def test_check_vjp_catches_a_missing_rotation(x64):
    x, k = _conv_arrays((1, 5, 5, 2), (3, 3, 2, 3))
    cfg = _shapes.conv_config(x.shape, k.shape, None, stride=1, padding="VALID", dilation=1,
                              groups=1)
    result = check.check_vjp(conv_no_rotation, _conv_reference, x, k, cfg)
    assert not result
    assert result.failed_args == ["x"]          # the kernel gradient is right
    x_row = next(a for a in result.args if a.name == "x")
    assert {"reference_grad", "finite_diff", "adjoint"} <= set(x_row.failed)
    assert "FAIL x:" in str(result)


def test_check_vjp_catches_a_forgotten_stride_remainder_shape(x64):
    # 6 - 3 = 3 is odd at stride 2: r = 1 row and column that no window reaches.
    x, k = _conv_arrays((1, 6, 6, 2), (3, 3, 2, 2))
    cfg = _shapes.conv_config(x.shape, k.shape, None, stride=2, padding="VALID", dilation=1,
                              groups=1)
    assert _shapes.stride_remainder(6, (0, 0), 3, 2) == 1
    result = check.check_vjp(conv_no_remainder, _conv_reference, x, k, cfg)
    assert not result
    assert result.failed_args == ["x"]
    assert "argument x" in str(result)
    assert "shape" in result.error


def test_check_vjp_catches_a_remainder_put_on_the_wrong_side(x64):
    x, k = _conv_arrays((1, 7, 6, 2), (3, 2, 2, 2))
    cfg = _shapes.conv_config(x.shape, k.shape, None, stride=(2, 3), padding="VALID",
                              dilation=1, groups=1)
    assert _shapes.stride_remainder(6, (0, 0), 2, 3) == 1      # columns: r = 1
    result = check.check_vjp(conv_remainder_first, _conv_reference, x, k, cfg)
    assert not result
    assert result.failed_args == ["x"]


def test_check_vjp_catches_a_transposed_weight_gradient(x64):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((4, 5)), rng.standard_normal((5, 5))
    result = check.check_vjp(dense_transposed_dw, lambda x, w: x @ w, x, w)
    assert not result
    assert result.failed_args == ["w"]
    result = check.check_vjp(dense_w_not_transposed, lambda x, w: x @ w, x, w)
    assert not result
    assert result.failed_args == ["x"]
    assert "FAIL x:" in str(result)


def test_check_vjp_static_keywords_and_labels(x64):
    rng = np.random.default_rng(2)
    logits, labels = rng.standard_normal((6, 4)), np.array([0, 3, 1, 2, 2, 0], np.int32)
    result = check.check_vjp(losses._cross_entropy_manual,
                             losses._cross_entropy_manual_forward, logits, labels)
    assert result, str(result)
    assert [a.name for a in result.args] == ["logits"]        # integer labels pass through
    x = rng.standard_normal((1, 6, 6, 2))
    result = check.check_vjp(lambda x, **kw: max_pool(x, 3, impl="manual", **kw),
                             lambda x, **kw: max_pool(x, 3, impl="lax", **kw),
                             check_grid._unique(rng, x.shape, "float64"), stride=1, padding="SAME")
    assert result, str(result)


def test_docstring_example_runs(x64):
    @jax.custom_vjp
    def prelu(x, a):
        return jnp.maximum(x, 0) + a * jnp.minimum(x, 0)

    prelu.defvjp(lambda x, a: (prelu(x, a), (x, a)),
                 lambda res, dy: (dy * jnp.where(res[0] > 0, 1.0, res[1]),
                                  jnp.sum(dy * jnp.minimum(res[0], 0))))
    reference = lambda x, a: jnp.where(x > 0, x, a * x)
    result = check.check_vjp(prelu, reference, jnp.linspace(-2.0, 2.0, 8), jnp.asarray(0.1))
    assert result and result.ok, str(result)
    assert [a.name for a in result.args] == ["x", "a"]


# --------------------------------------------------------------------------------------------
# The command line


def test_cli_quick_relu_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert check_main(["--quick", "--op", "relu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"backend {jax.default_backend()}" in text.splitlines()[0]
    assert "1 passed, 0 failed" in text
    report = json.loads(out.read_text())
    assert report["backend"] == jax.default_backend()
    assert report["failed"] == 0 and report["passed"] == len(report["rows"]) == 1
    row = report["rows"][0]
    assert row["op"] == "relu" and row["ok"]
    assert set(row["worst"]) == set(check.COLUMNS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]   # no temporary file


def test_cli_fails_when_a_tolerance_is_impossible(monkeypatch, capsys):
    # Finite differences are never exact: with a zero tolerance (d) must fail.
    monkeypatch.setitem(check.TOLERANCES, "float64", {"rtol": 0.0, "atol": 0.0})
    monkeypatch.setitem(check.FD_TOLERANCES, "float64", {"step": 1e-6, "rtol": 0.0, "atol": 0.0})
    assert check_main(["--quick", "--op", "relu"]) == 1
    assert "0 passed, 1 failed" in capsys.readouterr().out


def test_cli_fails_on_a_broken_op(monkeypatch, tmp_path, capsys):
    @jax.custom_vjp
    def doubled(x):
        return activations._relu_manual_forward(x)

    doubled.defvjp(lambda x: (doubled(x), x), lambda x, dy: (2 * jnp.where(x > 0, dy, 0),))

    def broken_relu(x, *, impl="lax"):
        return doubled(x) if impl == "manual" else jax.nn.relu(x)

    monkeypatch.setattr(check_grid, "relu", broken_relu)
    out = tmp_path / "r.json"
    assert check_main(["--quick", "--op", "relu", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "0 passed, 1 failed" in text
    assert json.loads(out.read_text())["rows"][0]["ok"] is False


def test_cli_restores_x64():
    before = jax.config.jax_enable_x64
    check_main(["--quick", "--op", "flatten"])
    assert jax.config.jax_enable_x64 == before


def test_explain_checks_every_number(capsys):
    assert check_main(["--explain"]) == 0
    text = capsys.readouterr().out
    assert text.count("✓") >= 30
    assert "✗" not in text
    for needed in ("rot180(K)", "dL/dK_11", "dL/dB", "dilate", "remainder", "Max pooling",
                   "Average pooling"):
        assert needed in text


def test_tolerance_tables_cover_both_dtypes():
    for table in (check.TOLERANCES, check.FD_TOLERANCES):
        assert set(table) == {"float64", "float32"}
    assert set(check.TOLERANCES["float64"]) == {"rtol", "atol"}    # splatted into allclose
    assert check.fd_tolerance("float32")["rtol"] >= check.TOLERANCES["float32"]["rtol"]


def test_quick_grid_covers_remainders_and_ties():
    conv_labels = [c.label for c in check_grid.grid("float64", ("conv",), quick=True)]
    pool_labels = [c.label for c in check_grid.grid("float64", ("max_pool",), quick=True)]
    assert any("3D" in label for label in conv_labels)
    assert any(label.startswith("ties") for label in pool_labels)
