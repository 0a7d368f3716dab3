"""Tolerances of the derivation checks: one table per dtype, and the finite-difference settings.

The one place for every tolerance of the project: the check tool, ``check_vjp`` and the tests
(``tests/conftest.py``) read these tables. The reasons are written down in the README
("Tolerances").
"""

from __future__ import annotations

import jax
import numpy as np

# One table of tolerances per dtype: (rtol, atol) for comparing two computations of the same
# quantity.
TOLERANCES = {
    # float64 carries ~16 digits; manual and lax sum the same products in a different order, so
    # they differ by a few ulps times the number of terms: 1e-10 leaves 4+ orders of headroom.
    "float64": {"rtol": 1e-10, "atol": 1e-10},
    # float32 carries ~7 digits; sums of a few hundred terms lose 2 of them.
    "float32": {"rtol": 1e-5, "atol": 1e-5},
}

# bfloat16 compute (``train.py --dtype bfloat16``) held against float32. bfloat16 keeps 8
# significant bits: eps = 2**-7 ≈ 7.8e-3, and one rounding errs by at most eps/2 relative.
BFLOAT16_TOLERANCES = {
    # One op, products accumulated in float32 and rounded once, on inputs that bfloat16 holds
    # exactly: each element within eps/2 of the float32 result; rtol eps leaves a factor 2.
    "op": {"rtol": 2.0 ** -7, "atol": 1e-6},
    # A whole network's loss gradient (every layer's activations and cotangents rounded), per
    # parameter: ||g_bf16 - g_f32|| / ||g_f32||. JAX's own default gradient tolerance for
    # bfloat16 (jax._src.public_test_util.default_gradient_tolerance); measured on LeNet-5:
    # at most 0.054.
    "network_grad_rel_l2": 1e-1,
}

# Finite differences, per dtype in which they are *taken*: the relative step and the accuracy
# that step allows. Central differences (f(x + h v) - f(x - h v)) / 2h err by
# h²·|f'''|/6 (truncation) plus ~eps·|f|/h (rounding of f), with h = step · max(1, max|x|).
# When float64 is available (the command line always enables it) differences are taken in
# float64 whatever the dtype under test, and (d) must then also meet that dtype's TOLERANCES.
FD_TOLERANCES = {
    # h = 1e-6: rounding eps/h ≈ 1e-16/1e-6 = 1e-10 relative, truncation h² ≈ 1e-12 (zero for
    # the linear ops: conv, pooling, dense, flatten). Measured worst over the grid: ~1e-9.
    # rtol 1e-6 leaves 2-3 orders of headroom; atol covers gradients that are exactly zero.
    "float64": {"step": 1e-6, "rtol": 1e-6, "atol": 1e-8},
    # Only used when float64 is disabled (check_vjp without jax_enable_x64): eps ≈ 1.2e-7, so
    # h = 1e-2 balances rounding (eps/h ≈ 1e-5, times the terms of the sum) and truncation
    # (h² ≈ 1e-4 for curved functions); three digits at best: rtol 1e-2.
    "float32": {"step": 1e-2, "rtol": 1e-2, "atol": 1e-3},
}

FD_ELEMENTWISE_MAX = 64   # arguments with at most this many elements: FD of every element
FD_DIRECTIONS = 6         # larger arguments: this many random directions (max |v_k| = 1)


def fd_dtype(dtype) -> str:
    """The dtype finite differences are taken in: float64 whenever JAX allows it."""
    return "float64" if jax.config.jax_enable_x64 else np.dtype(dtype).name


def fd_tolerance(dtype) -> dict:
    """Tolerance of (d): the accuracy of the differences, and at least the dtype's own."""
    fd = FD_TOLERANCES[fd_dtype(dtype)]
    own = TOLERANCES[np.dtype(dtype).name]
    return {"rtol": max(fd["rtol"], own["rtol"]), "atol": max(fd["atol"], own["atol"])}


def fd_note(dtype) -> str:
    """One line saying how (d) takes its differences for ``dtype`` (step, directions)."""
    taken_in = fd_dtype(dtype)
    return (f"central differences (f(x+hv) - f(x-hv))/2h of <u, F(x)> in {taken_in}, "
            f"h = {FD_TOLERANCES[taken_in]['step']:g}·max(1, max|x|); every element of "
            f"arguments with <= {FD_ELEMENTWISE_MAX} elements, {FD_DIRECTIONS} random "
            f"directions otherwise")
