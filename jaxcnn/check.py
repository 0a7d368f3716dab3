"""Derivation checks: the hand-derived VJPs against jax.grad, autodiff and finite differences.

(The command-line tool and ``check_vjp`` are being built; the tolerance table below is the one
place every check and every test takes its tolerances from.)
"""

from __future__ import annotations

# One table of tolerances per dtype: (rtol, atol) for comparing two computations of the same
# quantity. The reasons are written down in the README ("Tolerances").
TOLERANCES = {
    # float64 carries ~16 digits; manual and lax sum the same products in a different order, so
    # they differ by a few ulps times the number of terms: 1e-10 leaves 4+ orders of headroom.
    "float64": {"rtol": 1e-10, "atol": 1e-10},
    # float32 carries ~7 digits; sums of a few hundred terms lose 2 of them.
    "float32": {"rtol": 1e-5, "atol": 1e-5},
}
