"""Derivation checks: the hand-derived VJPs against jax.grad, autodiff and finite differences.

``python -m jaxcnn.check`` proves, on the machine and backend it runs on, that every backward
pass written from the lecture's formulas (``impl="manual"``, registered with ``jax.custom_vjp``)
computes the gradient. For every op and every configuration of a deliberate grid it takes the
cotangent of (a) the custom VJP and compares it, argument by argument, with

- (b) ``jax.grad`` through ``impl="lax"`` (lax primitives, JAX's own autodiff),
- (c) ``jax.grad`` through the manual forward with the custom VJP bypassed,
- (d) central finite differences of the manual forward (every element of small arguments,
  random directions for larger ones; the step is printed in the header),
- (e) the dot-product (adjoint) test ``<J·v, u> = <v, Jᵀ·u>``, with ``J·v`` by forward mode
  through the manual forward and ``Jᵀ·u`` from the custom VJP,

and the forward outputs of both impls. It prints one row per configuration, a summary line, an
end-to-end section per model (the LeNet-5 loss gradient and the ResNet's in train mode, every
layer manual vs every layer lax) and exits 1 if anything fails. Options: ``--op NAME``
(repeatable), ``--dtype {float64,float32}``, ``--quick``, ``--json FILE``, ``--explain`` (the
lecture's worked example, with numbers).

:func:`check_vjp` runs the same comparisons for any new op with a hand-derived VJP.

The modules: ``tolerances`` (every tolerance table), ``results`` (what a check found, as
tables), ``_engine`` (the comparisons, and ``check_vjp``), ``grid`` (the configurations of each
op), ``end_to_end`` (whole-model gradients), ``explain`` (the worked example) and ``__main__``
(the command line and its report).
"""

from ._engine import check_vjp
from .results import COLUMNS, ArgCheck, CheckResult, Comparison
from .tolerances import BFLOAT16_TOLERANCES, FD_TOLERANCES, TOLERANCES, fd_tolerance

__all__ = [
    "check_vjp",
    "CheckResult",
    "ArgCheck",
    "Comparison",
    "COLUMNS",
    "TOLERANCES",
    "FD_TOLERANCES",
    "BFLOAT16_TOLERANCES",
    "fd_tolerance",
]
