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
