"""The normalizer: padding resolution and the output-size rule, against lax's own rules."""

import itertools

import jax
import numpy as np
import pytest
from jax import lax

from jaxcnn import _shapes


@pytest.mark.parametrize("n,k,s", list(itertools.product(range(1, 12), (1, 2, 3, 5), (1, 2, 3))))
def test_same_padding_matches_lax(n, k, s):
    if k > n + k - 1:
        pytest.skip("impossible window")
    assert [_shapes.same_padding(n, k, s)] == list(lax.padtype_to_pads((n,), (k,), (s,), "SAME"))


@pytest.mark.parametrize("padding", ["VALID", "SAME", "same", 2, ((1, 0), (0, 3))])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (3, 2), ((1, 2), (2, 1))])
def test_conv_output_shape_matches_lax(padding, stride, dilation):
    x = jax.ShapeDtypeStruct((2, 11, 9, 3), np.float32)
    k = jax.ShapeDtypeStruct((3, 2, 3, 4), np.float32)
    cfg = _shapes.conv_config(x.shape, k.shape, None, stride=stride, padding=padding,
                              dilation=dilation, groups=1)
    lax_pad = padding.upper() if isinstance(padding, str) else (
        ((padding, padding),) * 2 if isinstance(padding, int) else padding)
    expected = jax.eval_shape(lambda x, k: lax.conv_general_dilated(
        x, k, cfg.stride, lax_pad, rhs_dilation=cfg.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC")), x, k).shape
    assert (2, *_shapes.output_spatial((11, 9), cfg), 4) == expected


def test_stride_remainder_and_backward_paddings():
    # n=7, k=3, s=2, no padding: windows start at 0, 2, 4 and cover 0..6: no remainder.
    cfg = _shapes.WindowConfig((3,), (2,), ((0, 0),), (1,))
    assert _shapes.output_size(7, (0, 0), 3, 2) == 3
    assert _shapes.stride_remainder(7, (0, 0), 3, 2) == 0
    # n=8: windows at 0, 2, 4 cover 0..6, position 7 is the remainder (r=1).
    assert _shapes.output_size(8, (0, 0), 3, 2) == 3
    assert _shapes.stride_remainder(8, (0, 0), 3, 2) == 1
    assert _shapes.conv_input_grad_padding((8,), cfg) == ((2, 3),)
    # A forward padding wider than the window gives a negative (cropping) backward padding.
    wide = _shapes.WindowConfig((2,), (1,), ((3, 3),), (1,))
    assert _shapes.conv_input_grad_padding((4,), wide) == ((-2, -2),)


def _correlate_1d(x, w, cfg):
    """``z_i = Σ_m xpad[i·s + m·d] w_m`` by the definition, in numpy."""
    (lo, hi), = cfg.padding
    xp = np.concatenate([np.zeros(lo), x, np.zeros(hi)])
    out = _shapes.output_spatial((len(x),), cfg)[0]
    return np.array([sum(xp[i * cfg.stride[0] + m * cfg.dilation[0]] * w[m]
                         for m in range(len(w))) for i in range(out)])


def test_a_conv_whose_stride_and_dilation_share_a_factor_reads_only_that_phase():
    """conv_phase: x[start:limit:step] convolved with the new config gives the same output,
    on every 1-D case up to n=11, k=4, s=6, d=6 and padding 4 on each side."""
    rng = np.random.default_rng(0)
    taken = 0
    for n, k, s, d, lo, hi in itertools.product(range(1, 12), range(1, 5), range(1, 7),
                                                range(1, 7), range(5), range(5)):
        cfg = _shapes.WindowConfig((k,), (s,), ((lo, hi),), (d,))
        if n + lo + hi < (k - 1) * d + 1:
            continue
        phase = _shapes.conv_phase((n,), cfg)
        g = np.gcd(s, d) if k > 1 else 1
        x, w = rng.normal(size=n), rng.normal(size=k)
        if phase is None:   # no common factor, or every tap reads padding
            assert g == 1 or not _correlate_1d(x, w, cfg).any(), (n, k, s, d, lo, hi)
            continue
        taken += 1
        assert phase.step == (g,) and min(phase.cfg.padding[0]) >= 0
        assert phase.cfg.stride == (s // g,) and phase.cfg.dilation == (d // g,)
        np.testing.assert_allclose(
            _correlate_1d(x[phase.start[0]:phase.limit[0]:phase.step[0]], w, phase.cfg),
            _correlate_1d(x, w, cfg), err_msg=str((n, k, s, d, lo, hi)))
    assert taken > 1000


def test_to_tuple():
    assert _shapes.to_tuple("f", "stride", 2, 3) == (2, 2, 2)
    assert _shapes.to_tuple("f", "stride", (1, 2), 2) == (1, 2)
    assert _shapes.to_tuple("f", "stride", np.int64(3), 1) == (3,)


def test_check_label_values():
    _shapes.check_label_values("f", "labels", np.array([0, 9, 3], np.uint8), 10)   # in range
    _shapes.check_label_values("f", "labels", np.zeros(0, np.int32), 10)           # empty
    labels = np.array([3, 10, 1, -2, 12], np.int64)
    with pytest.raises(ValueError, match=r"^f: train labels must lie in 0\.\.9 \(10 classes\); "
                                         r"got values from -2 to 12: 10 at index 1 "
                                         r"\(3 such labels\)$"):
        _shapes.check_label_values("f", "train labels", labels, 10, context=" (10 classes)")
    with pytest.raises(ValueError, match=r"^g: y must lie in 0\.\.9; got values from -2 to 12: "
                                         r"10 at index 1 \(3 such labels\)$"):
        _shapes.check_label_values("g", "y", labels, 10)
