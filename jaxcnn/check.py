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
end-to-end section (the LeNet-5 loss gradient, every layer manual vs every layer lax) and exits
1 if anything fails. Options: ``--op NAME`` (repeatable), ``--dtype {float64,float32}``,
``--quick``, ``--json FILE``, ``--explain`` (the lecture's worked example, with numbers).

:func:`check_vjp` runs the same comparisons for any new op with a hand-derived VJP.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import time
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from . import _io, _shapes
from .activations import (_log_softmax_manual_forward, _relu_manual_forward, log_softmax,
                          relu)
from .convolution import _conv_manual_forward, conv
from .linear import _dense_manual_forward, _flatten_manual_forward, dense, flatten
from .losses import _cross_entropy_manual_forward, cross_entropy
from .pooling import _avg_pool_manual_forward, _max_pool_manual_forward, avg_pool, max_pool

# One table of tolerances per dtype: (rtol, atol) for comparing two computations of the same
# quantity. The reasons are written down in the README ("Tolerances").
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

# The comparisons, in report order: JSON key -> column header.
COLUMNS = {
    "forward": "fwd",
    "reference_grad": "(b) jax.grad",
    "bypass_grad": "(c) bypass",
    "finite_diff": "(d) fin.diff",
    "adjoint": "(e) adjoint",
}
_NOT_APPLICABLE = "—"


# ============================================================================================
# Results: one comparison, one argument, one check.


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Largest absolute and relative error of one comparison, and whether it is in tolerance.

    ``rel_err = abs_err / scale`` where ``scale`` is the size of the reference quantity (the
    largest |element|, or for an inner product the sum of its |terms|, so that cancellation
    does not inflate it); it passes when ``abs_err <= atol + rtol * scale``.
    """

    abs_err: float
    rel_err: float
    ok: bool

    @classmethod
    def of(cls, abs_err, scale, tol) -> "Comparison":
        abs_err, scale = float(abs_err), float(scale)
        if abs_err == 0.0:
            rel = 0.0
        elif scale > 0.0 and np.isfinite(scale):
            rel = abs_err / scale
        else:
            rel = float("inf")
        ok = bool(abs_err <= tol["atol"] + tol["rtol"] * scale)   # False for NaN
        return cls(abs_err, rel, ok)

    @classmethod
    def between(cls, actual, expected, tol) -> "Comparison":
        """Elementwise ``actual`` vs ``expected``, scaled by ``max |expected|``."""
        a = np.asarray(actual, np.float64)
        e = np.asarray(expected, np.float64)
        if a.shape != e.shape:
            return cls(float("inf"), float("inf"), False)
        if a.size == 0:
            return cls(0.0, 0.0, True)
        return cls.of(np.max(np.abs(a - e)), np.max(np.abs(e)), tol)

    @staticmethod
    def worst(comparisons) -> "Comparison | None":
        cs = [c for c in comparisons if c is not None]
        if not cs:
            return None
        return Comparison(max(c.abs_err for c in cs), max(c.rel_err for c in cs),
                          all(c.ok for c in cs))

    def cell(self) -> str:
        mark = "" if self.ok else "!"
        return f"{_short(self.abs_err)}/{_short(self.rel_err)}{mark}"

    def to_dict(self) -> dict:
        return {"abs": _json_float(self.abs_err), "rel": _json_float(self.rel_err),
                "ok": self.ok}


def _short(v: float) -> str:
    if v == 0.0:
        return "0"
    if not np.isfinite(v):
        return str(v)
    return f"{v:.0e}"


def _json_float(v: float):
    return v if np.isfinite(v) else str(v)


@dataclasses.dataclass
class ArgCheck:
    """The comparisons of one differentiable argument (``None``: not applicable)."""

    name: str
    shape: tuple
    comparisons: dict

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons.values() if c is not None)

    @property
    def failed(self) -> list:
        return [k for k, c in self.comparisons.items() if c is not None and not c.ok]


@dataclasses.dataclass
class CheckResult:
    """What :func:`check_vjp` (and each row of the grid) found.

    ``bool(result)`` and ``result.ok`` are True when every comparison is within tolerance;
    ``str(result)`` is a table with one row per differentiable argument; ``failed_args`` names
    the arguments whose gradient is wrong.
    """

    title: str
    dtype: str
    forward: Comparison | None
    args: list
    skipped: dict = dataclasses.field(default_factory=dict)   # comparison -> reason
    error: str | None = None
    error_args: list = dataclasses.field(default_factory=list)
    fd_note: str = ""

    @property
    def ok(self) -> bool:
        return (self.error is None and (self.forward is None or self.forward.ok)
                and all(a.ok for a in self.args))

    def __bool__(self) -> bool:
        return self.ok

    @property
    def failed_args(self) -> list:
        names = [a.name for a in self.args if not a.ok]
        return names + [n for n in self.error_args if n not in names]

    def worst(self, key: str) -> Comparison | None:
        if key == "forward":
            return self.forward
        return Comparison.worst(a.comparisons.get(key) for a in self.args)

    def columns(self) -> list:
        """The gradient comparisons this check made (or declared not applicable)."""
        return [k for k in COLUMNS if k != "forward" and
                (k in self.skipped or any(k in a.comparisons for a in self.args))]

    def summary(self) -> str:
        if self.error is not None:
            who = f" (argument {', '.join(self.error_args)})" if self.error_args else ""
            return f"FAIL{who}: {self.error}"
        if self.ok:
            return "ok"
        parts = []
        if self.forward is not None and not self.forward.ok:
            parts.append("forward outputs differ")
        for a in self.args:
            if not a.ok:
                parts.append(f"{a.name}: " + ", ".join(COLUMNS[k] for k in a.failed))
        return "FAIL " + "; ".join(parts)

    def table(self) -> str:
        cols = self.columns()
        lines = [f"{self.title}  [{self.dtype}, backend {jax.default_backend()}]"]
        if self.fd_note:
            lines.append(f"  (d): {self.fd_note}")
        if self.forward is not None:
            lines.append(f"  forward output: max abs {_short(self.forward.abs_err)}, rel "
                         f"{_short(self.forward.rel_err)}  {'ok' if self.forward.ok else 'FAIL'}")
        header = ["argument", "shape"] + [COLUMNS[k] + " abs/rel" for k in cols] + ["result"]
        rows = []
        if not self.args:
            header = []
        for a in self.args:
            cells = [a.name, str(tuple(a.shape))]
            for k in cols:
                c = a.comparisons.get(k)
                cells.append(_NOT_APPLICABLE if c is None else c.cell())
            cells.append("ok" if a.ok else "FAIL")
            rows.append(cells)
        if header:
            lines += ["  " + line for line in _format_table(header, rows)]
        for k, reason in self.skipped.items():
            lines.append(f"  {COLUMNS[k]} not applicable: {reason}")
        lines.append("  " + self.summary())
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> dict:
        return {
            "title": self.title, "dtype": self.dtype, "ok": self.ok, "error": self.error,
            "forward": None if self.forward is None else self.forward.to_dict(),
            "args": [{"name": a.name, "shape": list(a.shape), "ok": a.ok,
                      "comparisons": {k: None if c is None else c.to_dict()
                                      for k, c in a.comparisons.items()}}
                     for a in self.args],
            "not_applicable": dict(self.skipped),
        }


def _format_table(header, rows) -> list:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return [fmt(header)] + [fmt(r) for r in rows]


# ============================================================================================
# The engine: (a) against (b)-(e) for one function and one set of arguments.


def _is_float_array(a) -> bool:
    dtype = getattr(a, "dtype", None)
    return (dtype is not None and getattr(a, "shape", None) is not None
            and jnp.issubdtype(dtype, jnp.floating))


def _fd_dtype(dtype) -> str:
    """Finite differences are taken in float64 whenever JAX allows it."""
    return "float64" if jax.config.jax_enable_x64 else np.dtype(dtype).name


def fd_tolerance(dtype) -> dict:
    """Tolerance of (d): the accuracy of the differences, and at least the dtype's own."""
    fd = FD_TOLERANCES[_fd_dtype(dtype)]
    own = TOLERANCES[np.dtype(dtype).name]
    return {"rtol": max(fd["rtol"], own["rtol"]), "atol": max(fd["atol"], own["atol"])}


def fd_note(dtype) -> str:
    fdt = _fd_dtype(dtype)
    return (f"central differences (f(x+hv) - f(x-hv))/2h of <u, F(x)> in {fdt}, "
            f"h = {FD_TOLERANCES[fdt]['step']:g}·max(1, max|x|); every element of arguments "
            f"with <= {FD_ELEMENTWISE_MAX} elements, {FD_DIRECTIONS} random directions "
            f"otherwise")


def _arg_names(fn, n: int) -> list:
    """The names of ``fn``'s first ``n`` positional parameters (``arg{i}`` when unknown)."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params]
    except (TypeError, ValueError):
        names = []
    return [names[i] if i < len(names) else f"arg{i}" for i in range(n)]


def _culprits(message: str, fn, args, names) -> list:
    """Name the argument a custom_vjp shape/type error points at (``output[k]``)."""
    m = re.search(r"output\[(\d+)\]", message)
    if not m:
        return []
    nondiff = tuple(getattr(fn, "nondiff_argnums", ()) or ())
    positions = [p for p in range(len(args)) if p not in nondiff]
    k = int(m.group(1))
    return [names[positions[k]]] if k < len(positions) else []


def _run(fn, refs: dict, smooth, args, names, *, title, skip=None, owner=None,
         seed=0) -> CheckResult:
    """Compare the VJP of ``fn`` (a) with ``refs`` (b, c), FD (d) and adjoint (e) of ``smooth``.

    ``fn``, every ``refs`` value and ``smooth`` take the same positional ``args``; the floating
    arrays among them are differentiated, everything else is passed through unchanged.
    ``refs`` maps ``"reference_grad"`` / ``"bypass_grad"`` to autodiff-able forwards.
    ``skip`` maps comparisons to the reason they do not apply (e.g. tied maxima). ``owner`` is
    the ``custom_vjp`` function itself when ``fn`` wraps it (to name the argument of a
    shape error by its ``nondiff_argnums``).
    """
    skip = dict(skip or {})
    owner = fn if owner is None else owner
    diff = [i for i, a in enumerate(args) if _is_float_array(a)]
    if not diff:
        raise TypeError(f"check_vjp: no floating-point array among the arguments of {title}; "
                        f"got types {[type(a).__name__ for a in args]}")
    dargs = tuple(jnp.asarray(args[i]) for i in diff)
    dnames = [names[i] for i in diff]
    dtype = np.dtype(jnp.result_type(*dargs)).name
    if dtype not in TOLERANCES:
        raise TypeError(f"check_vjp: arguments must be float32 or float64; got {dtype}")
    tol, ftol = TOLERANCES[dtype], fd_tolerance(dtype)
    fdt = jnp.dtype(_fd_dtype(dtype))
    do_fd, do_adj = "finite_diff" not in skip, "adjoint" not in skip
    refs = {k: f for k, f in refs.items() if k not in skip}

    def full(f):
        def g(*d):
            a = list(args)
            for i, v in zip(diff, d):
                a[i] = v
            return f(*a)
        return g

    rng = np.random.default_rng(seed)
    try:
        out_struct = jax.eval_shape(full(fn), *dargs)
    except Exception as err:  # noqa: BLE001 - reported, not raised: a check must not crash
        return CheckResult(title, dtype, None, [], skip, f"{type(err).__name__}: {err}",
                           _culprits(str(err), owner, args, names))
    leaves, treedef = jax.tree_util.tree_flatten(out_struct)
    u_np = [rng.standard_normal(s.shape).astype(s.dtype) for s in leaves]
    u = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in u_np])

    # (d) directions: one block per argument, zeros for the other arguments.
    blocks = []
    for a in dargs:
        n = int(np.prod(a.shape))
        if n <= FD_ELEMENTWISE_MAX:
            v = np.eye(n).reshape((n, *a.shape))
        else:
            v = rng.standard_normal((FD_DIRECTIONS, *a.shape))
            v /= np.max(np.abs(v.reshape(FD_DIRECTIONS, -1)), axis=1).reshape(-1, *[1] * a.ndim)
        blocks.append(v)
    total = sum(len(b) for b in blocks)
    steps = [FD_TOLERANCES[fdt.name]["step"] * max(1.0, float(np.max(np.abs(a)))) if a.size
             else 1.0 for a in dargs]
    fd_tangents, h_dir, start = [], [], 0
    for a, v, h in zip(dargs, blocks, steps):
        t = np.zeros((total, *a.shape), fdt)
        t[start:start + len(v)] = h * v
        fd_tangents.append(t)
        h_dir += [h] * len(v)
        start += len(v)
    # (e) one random tangent per argument, zeros for the other arguments.
    e_dirs = [rng.standard_normal(a.shape) for a in dargs]
    e_tangents = []
    for i, a in enumerate(dargs):
        t = np.zeros((len(dargs), *a.shape), a.dtype)
        t[i] = e_dirs[i]
        e_tangents.append(t)

    def compute(dargs, u, fd_tangents, e_tangents):
        res = {}
        y, vjp = jax.vjp(full(fn), *dargs)
        res["a"], res["y"] = vjp(u), {"a": y}
        for key, f in refs.items():
            y, vjp = jax.vjp(full(f), *dargs)
            res[key], res["y"][key] = vjp(u), y
        if do_fd:
            x64 = [a.astype(fdt) for a in dargs]
            u64 = jax.tree_util.tree_map(lambda v: v.astype(fdt), u)

            def scalar(*d):
                ys = jax.tree_util.tree_leaves(full(smooth)(*d))
                return sum(jnp.vdot(uu, yy.astype(fdt))
                           for uu, yy in zip(jax.tree_util.tree_leaves(u64), ys))

            both = [jnp.concatenate([t, -t]) for t in fd_tangents]
            vals = jax.vmap(lambda *t: scalar(*[a + ti for a, ti in zip(x64, t)]))(*both)
            res["fd"] = vals[:total] - vals[total:]
        if do_adj:
            res["jv"] = jax.vmap(lambda *t: jax.jvp(full(smooth), dargs, t)[1])(*e_tangents)
        return res

    try:
        r = jax.device_get(_jit_once(compute, dargs, u, fd_tangents, e_tangents))
    except Exception as err:  # noqa: BLE001
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return CheckResult(title, dtype, None, [], skip, msg,
                           _culprits(str(err), owner, args, names), fd_note(dtype))

    forward = Comparison.worst(
        Comparison.worst(Comparison.between(p, q, tol) for p, q in
                         zip(jax.tree_util.tree_leaves(r["y"]["a"]),
                             jax.tree_util.tree_leaves(r["y"][k])))
        for k in refs) if refs else None
    a_cot = [np.asarray(c, np.float64) for c in r["a"]]
    u_leaves = [np.asarray(v, np.float64) for v in u_np]
    fd = None if not do_fd else np.asarray(r["fd"], np.float64) / (2 * np.asarray(h_dir))
    checks, start = [], 0
    for i, (name, a) in enumerate(zip(dnames, dargs)):
        comps = {}
        for key in ("reference_grad", "bypass_grad"):
            if key in refs:
                comps[key] = Comparison.between(a_cot[i], r[key][i], tol)
            elif key in skip:
                comps[key] = None
        v = blocks[i].reshape(len(blocks[i]), -1)
        if do_fd:
            terms = v * a_cot[i].reshape(1, -1)              # <a, v> term by term
            predicted = terms.sum(axis=1)
            measured = fd[start:start + len(v)]
            comps["finite_diff"] = Comparison.of(np.max(np.abs(measured - predicted)),
                                                 np.max(np.sum(np.abs(terms), axis=1)), ftol)
        else:
            comps["finite_diff"] = None
        start += len(v)
        if do_adj:
            jv = [np.asarray(l[i], np.float64) for l in jax.tree_util.tree_leaves(r["jv"])]
            lhs_terms = np.concatenate([(j * uu).ravel() for j, uu in zip(jv, u_leaves)])
            rhs_terms = (e_dirs[i] * a_cot[i]).ravel()
            scale = max(np.sum(np.abs(lhs_terms)), np.sum(np.abs(rhs_terms)))
            comps["adjoint"] = Comparison.of(abs(lhs_terms.sum() - rhs_terms.sum()), scale, tol)
        else:
            comps["adjoint"] = None
        checks.append(ArgCheck(name, tuple(a.shape), comps))
    return CheckResult(title, dtype, forward, checks, skip, None, [],
                       fd_note(dtype) if do_fd else "")


def _jit_once(f, *args):
    """Compile ``f`` for ``args`` with the default options of whatever backend runs, and run it
    once (one compilation per configuration, not cached: each is used once)."""
    return jax.jit(f).lower(*args).compile()(*args)


# ============================================================================================
# The public helper.


def check_vjp(fn: Callable, reference: Callable, *args, **static) -> CheckResult:
    """Check a hand-derived VJP against autodiff, finite differences and the adjoint test.

    ``fn(*args, **static)`` is the function under test, with its backward registered by
    ``jax.custom_vjp``; ``reference(*args, **static)`` computes the same forward with ops JAX
    can differentiate. The floating-point arrays among ``args`` are differentiated (integer
    arrays, None and other values are passed through). For each of them, the cotangent of
    ``fn``'s VJP for a random output cotangent ``u`` is compared with

    - ``jax.grad`` through ``reference`` (column "(b) jax.grad"),
    - central finite differences of ``reference`` (column "(d) fin.diff"), taken in float64
      when ``jax_enable_x64`` is on (recommended), every element of small arguments and random
      directions of large ones,
    - the adjoint test ``<J·v, u> = <v, Jᵀ·u>``, ``J·v`` by forward mode through
      ``reference`` (column "(e) adjoint"),

    and the two forward outputs are compared too. Tolerances: :data:`TOLERANCES` and
    :data:`FD_TOLERANCES` for the arguments' dtype. Reference functions must be smooth at the
    given point (no ties in a max, no relu input at exactly 0): finite differences are
    meaningless there.

    Returns a :class:`CheckResult`: ``bool(result)`` (or ``result.ok``) is True when everything
    agrees, ``print(result)`` shows one row per differentiable argument, and
    ``result.failed_args`` names the arguments with a wrong gradient. A backward rule that
    returns a cotangent of the wrong shape is reported as a failure naming that argument.

    Example::

        import jax, jax.numpy as jnp
        import jaxcnn as jc

        jax.config.update("jax_enable_x64", True)

        @jax.custom_vjp
        def prelu(x, a):                   # y = max(x, 0) + a·min(x, 0)
            return jnp.maximum(x, 0) + a * jnp.minimum(x, 0)

        def prelu_fwd(x, a):
            return prelu(x, a), (x, a)

        def prelu_bwd(res, dy):            # the hand-derived backward
            x, a = res
            return dy * jnp.where(x > 0, 1.0, a), jnp.sum(dy * jnp.minimum(x, 0))

        prelu.defvjp(prelu_fwd, prelu_bwd)

        reference = lambda x, a: jnp.where(x > 0, x, a * x)
        result = jc.check_vjp(prelu, reference, jnp.linspace(-2.0, 2.0, 8), jnp.asarray(0.1))
        print(result)                      # one row per argument: x and a
        assert result                      # bool(result) is result.ok
    """
    names = _arg_names(fn, len(args))
    f = (lambda *a: fn(*a, **static)) if static else fn
    ref = (lambda *a: reference(*a, **static)) if static else reference
    return _run(f, {"reference_grad": ref}, ref, args, names, owner=fn,
                title=f"check_vjp({_name(fn)}, {_name(reference)})")


def _name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


# ============================================================================================
# The grid: one case per configuration, for every op with a manual VJP.

OPS = ("conv", "max_pool", "avg_pool", "dense", "relu", "flatten", "log_softmax",
       "cross_entropy")

_TIES = ("tied maxima: the derivative is undefined there and every subgradient is valid, so "
         "(c) (which splits ties), (d) and (e) do not apply; (b) pins the tie rule (the first "
         "maximum, as jax.grad of reduce_window picks)")
_RELU_ZERO = ("relu at exactly 0: not differentiable; (b) pins the convention relu'(0) = 0, "
              "(c) (jnp.maximum gives 1/2), (d) and (e) do not apply")


@dataclasses.dataclass
class Case:
    """One configuration of one op: arguments and the three forwards to compare."""

    op: str
    label: str
    args: tuple           # floating arrays are differentiated; the rest is passed through
    names: tuple
    manual: Callable      # public op, impl="manual": the custom VJP under test (a)
    lax: Callable         # public op, impl="lax": jax.grad through it is (b)
    forward: Callable     # manual forward without the custom VJP: (c), (d), (e)
    quick: bool = False
    skip: dict = dataclasses.field(default_factory=dict)


def _rng(op, label):
    return np.random.default_rng(zlib.crc32(f"{op}|{label}".encode()))


def _unique(rng, shape, dtype):
    """Distinct, well-separated values (a shuffled grid spanning [-2, 2]): no near-ties, so
    max pooling is differentiable and finite differences with h ≈ 1e-6 never swap a maximum."""
    n = int(np.prod(shape))
    gap = 4.0 / max(n - 1, 1)
    return (rng.permutation(n) * gap - 2.0).reshape(shape).astype(dtype)


def _conv_case(label, x_shape, k_shape, bias=True, quick=False, dtype="float64", **st):
    rng = _rng("conv", label)
    st = {"stride": 1, "padding": "VALID", "dilation": 1, "groups": 1, **st}
    x = rng.standard_normal(x_shape).astype(dtype)
    k = rng.standard_normal(k_shape).astype(dtype)
    b = rng.standard_normal(k_shape[-1]).astype(dtype) if bias else None
    cfg = _shapes.conv_config(x.shape, k.shape, None if b is None else b.shape, **st)
    return Case("conv", label, (x, k, b), ("x", "kernel", "bias"),
                lambda x, k, b: conv(x, k, b, impl="manual", **st),
                lambda x, k, b: conv(x, k, b, impl="lax", **st),
                lambda x, k, b: _conv_manual_forward(x, k, b, cfg, st["groups"]), quick)


def _max_pool_case(label, x_shape, window, quick=False, dtype="float64", tied_x=None, **st):
    """Unique inputs; or ``tied_x``, an input with tied maxima, where only (b) applies."""
    ties = tied_x is not None
    x = np.asarray(tied_x, dtype) if ties else _unique(_rng("max_pool", label), x_shape, dtype)
    cfg = _shapes.pool_config(x.shape, window, stride=st.get("stride"),
                              padding=st.get("padding", "VALID"), fn="max_pool")
    skip = ({k: _TIES for k in ("bypass_grad", "finite_diff", "adjoint")} if ties else {})
    return Case("max_pool", label, (x,), ("x",),
                lambda x: max_pool(x, window, impl="manual", **st),
                lambda x: max_pool(x, window, impl="lax", **st),
                lambda x: _max_pool_manual_forward(x, cfg), quick, skip)


def _avg_pool_case(label, x_shape, window, quick=False, dtype="float64", **st):
    rng = _rng("avg_pool", label)
    x = rng.standard_normal(x_shape).astype(dtype)
    cip = st.get("count_include_pad", True)
    cfg = _shapes.pool_config(x.shape, window, stride=st.get("stride"),
                              padding=st.get("padding", "VALID"), fn="avg_pool")
    return Case("avg_pool", label, (x,), ("x",),
                lambda x: avg_pool(x, window, impl="manual", **st),
                lambda x: avg_pool(x, window, impl="lax", **st),
                lambda x: _avg_pool_manual_forward(x, cfg, cip), quick)


def _dense_case(label, x_shape, w_shape, bias=True, quick=False, dtype="float64"):
    rng = _rng("dense", label)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[-1]).astype(dtype) if bias else None
    return Case("dense", label, (x, w, b), ("x", "w", "b"),
                lambda x, w, b: dense(x, w, b, impl="manual"),
                lambda x, w, b: dense(x, w, b, impl="lax"),
                _dense_manual_forward, quick)


def _unary_case(op, label, x, fn, forward, quick=False, skip=None):
    return Case(op, label, (x,), ("x",), lambda x: fn(x, impl="manual"),
                lambda x: fn(x, impl="lax"), forward, quick, dict(skip or {}))


def _cross_entropy_case(label, n, classes, quick=False, dtype="float64"):
    rng = _rng("cross_entropy", label)
    logits = (2 * rng.standard_normal((n, classes))).astype(dtype)
    labels = rng.integers(0, classes, n).astype(np.int32)
    return Case("cross_entropy", label, (logits, labels), ("logits", "labels"),
                lambda z, y: cross_entropy(z, y, impl="manual"),
                lambda z, y: cross_entropy(z, y, impl="lax"),
                _cross_entropy_manual_forward, quick)


def grid(dtype: str = "float64", ops=OPS, quick: bool = False) -> list:
    """The configurations of the report (``quick``: the representative subset)."""
    f = dtype
    cases = []
    if "conv" in ops:
        cases += [
            _conv_case("2D lecture: 3×3 ⋆ 2×2 + B", (1, 3, 3, 1), (2, 2, 1, 1), quick=True,
                       dtype=f),
            _conv_case("2D s2 SAME", (2, 7, 7, 3), (3, 3, 3, 4), stride=2, padding="SAME",
                       dtype=f),
            _conv_case("2D s2 VALID, remainder r=1", (2, 6, 6, 2), (3, 3, 2, 3), stride=2,
                       dtype=f),
            _conv_case("2D s3 VALID, odd/even, r=(1,2)", (1, 9, 8, 2), (2, 3, 2, 2), stride=3,
                       dtype=f),
            _conv_case("2D padding 1, dilation 2", (2, 7, 6, 2), (3, 3, 2, 3), padding=1,
                       dilation=2, dtype=f),
            _conv_case("2D uneven pads, s(2,1), dil (2,1)", (1, 8, 7, 2), (3, 2, 2, 2),
                       padding=((0, 2), (1, 0)), stride=(2, 1), dilation=(2, 1), quick=True,
                       dtype=f),
            _conv_case("2D padding 3 > window 2 (bwd crops)", (1, 4, 5, 2), (2, 2, 2, 2),
                       padding=3, dtype=f),
            _conv_case("2D groups 2, SAME", (2, 6, 6, 4), (3, 3, 2, 6), groups=2,
                       padding="SAME", dtype=f),
            _conv_case("2D depthwise ×2, s2 SAME", (2, 6, 5, 3), (3, 3, 1, 6), groups=3,
                       stride=2, padding="SAME", quick=True, dtype=f),
            _conv_case("2D no bias, batch 3", (3, 5, 5, 2), (3, 3, 2, 2), bias=False, dtype=f),
            _conv_case("2D 1×1 kernel, s2", (1, 5, 5, 3), (1, 1, 3, 2), stride=2, dtype=f),
            _conv_case("1D s2 SAME", (3, 11, 2), (3, 2, 4), stride=2, padding="SAME", dtype=f),
            _conv_case("1D dil 3, pads (2,1), groups 2", (2, 12, 4), (3, 2, 4), dilation=3,
                       padding=((2, 1),), groups=2, dtype=f),
            _conv_case("3D s(2,1,2), padding 1, groups 2", (1, 5, 6, 5, 4), (2, 3, 2, 2, 4),
                       stride=(2, 1, 2), padding=1, groups=2, quick=True, dtype=f),
            _conv_case("3D s2 SAME, batch 2", (2, 5, 4, 6, 2), (3, 3, 3, 2, 2), stride=2,
                       padding="SAME", dtype=f),
        ]
    if "max_pool" in ops:
        rng = _rng("max_pool", "ties")
        after_relu = np.maximum(rng.standard_normal((2, 6, 6, 2)), 0)
        plateau = np.zeros((1, 5, 5, 1))
        plateau[0, 2:4, 1:3, 0] = 1.0
        cases += [
            _max_pool_case("2×2 s2 (lecture)", (2, 6, 6, 3), 2, quick=True, dtype=f),
            _max_pool_case("2×2 s2, remainder r=(1,1)", (1, 5, 7, 2), 2, dtype=f),
            _max_pool_case("3×3 s2 SAME, overlapping", (2, 7, 6, 2), 3, stride=2,
                           padding="SAME", quick=True, dtype=f),
            _max_pool_case("3×3 s1, overlapping", (1, 6, 6, 2), 3, stride=1, dtype=f),
            _max_pool_case("2×3 s(1,2), pads ((1,0),(0,1))", (2, 5, 6, 1), (2, 3),
                           stride=(1, 2), padding=((1, 0), (0, 1)), dtype=f),
            _max_pool_case("1D window 3, s2, padding 1", (3, 10, 2), (3,), stride=2,
                           padding=1, dtype=f),
            _max_pool_case("3D 2×2×2", (1, 4, 5, 4, 2), 2, dtype=f),
            _max_pool_case("ties: constant input", (1, 4, 4, 2), 2,
                           tied_x=np.ones((1, 4, 4, 2)), quick=True, dtype=f),
            _max_pool_case("ties: after relu (many zeros)", (2, 6, 6, 2), 2,
                           tied_x=after_relu, dtype=f),
            _max_pool_case("ties: 3×3 s1 over a 2×2 plateau", (1, 5, 5, 1), 3, stride=1,
                           tied_x=plateau, dtype=f),
        ]
    if "avg_pool" in ops:
        cases += [
            _avg_pool_case("2×2 s2 (lecture)", (2, 6, 6, 3), 2, quick=True, dtype=f),
            _avg_pool_case("3×3 s1, overlapping", (1, 6, 6, 2), 3, stride=1, dtype=f),
            _avg_pool_case("3×3 s2 SAME, count_include_pad=False", (2, 7, 6, 2), 3, stride=2,
                           padding="SAME", count_include_pad=False, quick=True, dtype=f),
            _avg_pool_case("3×3 s2 SAME, count_include_pad=True", (2, 7, 6, 2), 3, stride=2,
                           padding="SAME", dtype=f),
            _avg_pool_case("3×3 s2, pads ((1,0),(0,2)), exclude pad", (1, 5, 7, 2), 3,
                           stride=2, padding=((1, 0), (0, 2)), count_include_pad=False,
                           dtype=f),
            _avg_pool_case("1D window 4, s3, remainder r=1", (2, 11, 2), (4,), stride=3,
                           dtype=f),
            _avg_pool_case("3D 2×2×2, padding 1, exclude pad", (1, 4, 5, 3, 2), 2,
                           padding=1, count_include_pad=False, dtype=f),
        ]
    if "dense" in ops:
        cases += [
            _dense_case("x(4,5)·W(5,3) + b", (4, 5), (5, 3), quick=True, dtype=f),
            _dense_case("batch dims x(2,3,5)", (2, 3, 5), (5, 4), dtype=f),
            _dense_case("no bias, square W(6,6)", (3, 6), (6, 6), bias=False, dtype=f),
        ]
    if "relu" in ops:
        rng = _rng("relu", "inputs")
        away = lambda s: (np.sign(z := rng.standard_normal(s)) * (0.05 + np.abs(z))).astype(f)
        zeros = np.array([[-1.0, 0.0, 2.0, 0.0], [0.0, 3.0, -2.0, 0.0]], f)
        cases += [
            _unary_case("relu", "x(3,7), |x| >= 0.05", away((3, 7)), relu,
                        _relu_manual_forward, quick=True),
            _unary_case("relu", "x(2,4,4,3)", away((2, 4, 4, 3)), relu, _relu_manual_forward),
            _unary_case("relu", "ties: x = 0 exactly", zeros, relu, _relu_manual_forward,
                        skip={k: _RELU_ZERO for k in ("bypass_grad", "finite_diff", "adjoint")}),
        ]
    if "flatten" in ops:
        rng = _rng("flatten", "inputs")
        cases += [
            _unary_case("flatten", "x(2,3,4,2)", rng.standard_normal((2, 3, 4, 2)).astype(f),
                        flatten, _flatten_manual_forward, quick=True),
            _unary_case("flatten", "x(3,5), already flat", rng.standard_normal((3, 5)).astype(f),
                        flatten, _flatten_manual_forward),
        ]
    if "log_softmax" in ops:
        rng = _rng("log_softmax", "inputs")
        cases += [
            _unary_case("log_softmax", "x(4,10)", (2 * rng.standard_normal((4, 10))).astype(f),
                        log_softmax, _log_softmax_manual_forward, quick=True),
            _unary_case("log_softmax", "x(2,3,5)", rng.standard_normal((2, 3, 5)).astype(f),
                        log_softmax, _log_softmax_manual_forward),
            _unary_case("log_softmax", "large logits x + 100",
                        (100 + rng.standard_normal((3, 6))).astype(f), log_softmax,
                        _log_softmax_manual_forward),
        ]
    if "cross_entropy" in ops:
        cases += [
            _cross_entropy_case("logits(8,10)", 8, 10, quick=True, dtype=f),
            _cross_entropy_case("logits(1,3), batch 1", 1, 3, dtype=f),
        ]
    return [c for c in cases if c.quick] if quick else cases


def run_case(case: Case) -> CheckResult:
    refs = {"reference_grad": case.lax, "bypass_grad": case.forward}
    return _run(case.manual, refs, case.forward, case.args, case.names,
                title=f"{case.op}: {case.label}", skip=case.skip)


# ============================================================================================
# End to end: the LeNet-5 loss, every layer manual vs every layer lax, parameter by parameter.

def lenet5_loss(params, x, labels, impl: str):
    """The loss of :func:`jaxcnn.models.lenet5` (the model ``train.py`` trains), every layer
    on ``impl``, followed by the cross-entropy on ``impl``."""
    from .models import lenet5

    _, apply = lenet5()
    return cross_entropy(apply(params, x, impl=impl), labels, impl=impl)


def _lenet5_batch(n: int = 16):
    """A real batch: the embedded synthetic digits (jaxcnn.data), else structured rings."""
    try:
        from .data import synthetic_digits
        images, labels = synthetic_digits(n, seed=0)
        return (np.asarray(images, np.float64)[..., None] / 255.0,
                np.asarray(labels, np.int32), "jaxcnn.data.synthetic_digits(16, seed=0)")
    except (ImportError, AttributeError):
        labels = np.arange(n, dtype=np.int32) % 10
        yy, xx = np.mgrid[:28, :28] - 13.5
        r = np.hypot(yy, xx)
        images = np.stack([np.exp(-((r - 3 - c) ** 2) / 2.0) for c in labels])[..., None]
        return images, labels, "structured rings (jaxcnn.data not available)"


def run_end_to_end(dtype: str = "float64") -> tuple[list, str]:
    """Rows (one per parameter) comparing the two gradients of the LeNet-5 loss."""
    from .models import lenet5

    tol = TOLERANCES[dtype]
    _, params = lenet5().init(jax.random.PRNGKey(5), (16, 28, 28, 1))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    images, labels, source = _lenet5_batch()
    x = jnp.asarray(images.astype(dtype))
    y = jnp.asarray(labels)
    grads = {}
    for impl in ("manual", "lax"):
        f = jax.value_and_grad(lambda p, x, y, impl=impl: lenet5_loss(p, x, y, impl))
        grads[impl] = jax.device_get(_jit_once(f, params, x, y))
    fwd = Comparison.between(grads["manual"][0], grads["lax"][0], tol)
    results = []
    manual = jax.tree_util.tree_flatten_with_path(grads["manual"][1])[0]
    for (path, gm), gl in zip(manual, jax.tree_util.tree_leaves(grads["lax"][1])):
        name = jax.tree_util.keystr(path)
        c = Comparison.between(gm, gl, tol)
        results.append(CheckResult(f"lenet5: {name} {gm.shape}", dtype, fwd,
                                   [ArgCheck(name, gm.shape, {"reference_grad": c})]))
    return results, source


# ============================================================================================
# --explain: the lecture's worked example, with numbers.


def _n(v) -> str:
    v = float(v)
    s = str(int(round(v))) if abs(v - round(v)) < 1e-12 else f"{v:g}"
    return s


def _p(v) -> str:
    """A number as a factor: negative numbers in parentheses."""
    s = _n(v)
    return f"({s})" if s.startswith("-") else s


def _matrix(m, indent="    ") -> list:
    m = np.asarray(m)
    cells = [[_n(v) for v in row] for row in m]
    w = max(len(c) for row in cells for c in row)
    return [indent + "[ " + "  ".join(c.rjust(w) for c in row) + " ]" for row in cells]


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


class _Explainer:
    """Prints the worked examples, checking every hand-computed number against jax.grad."""

    def __init__(self, out):
        self.out = out
        self.all_ok = True

    def say(self, *lines):
        for line in lines:
            self.out(line)

    def check(self, hand, by_jax) -> str:
        ok = bool(np.allclose(np.asarray(hand, np.float64), np.asarray(by_jax, np.float64),
                              rtol=1e-12, atol=1e-12))
        self.all_ok &= ok
        return _mark(ok)

    def matrix_check(self, title, hand, by_jax, who="jax.grad"):
        mark = self.check(hand, by_jax)
        left, right = _matrix(hand, ""), _matrix(by_jax, "")
        w = max(len(s) for s in left)
        self.say(f"  {title}" + " " * max(1, w + 6 - len(title)) + f"{who} gives:")
        for i, (a, b) in enumerate(zip(left, right)):
            tail = f"   {mark}" if i == len(left) // 2 else ""
            self.say("    " + a.ljust(w) + "    " + b + tail)


def _conv_grads(X, K, B, stride, impl="lax"):
    """jax.grad of L = ½ Σ z² for the 2-D single-channel convolution, and Z."""
    def loss(x, k, b):
        z = conv(x[None, :, :, None], k[:, :, None, None], b[None], stride=stride, impl=impl)
        return 0.5 * jnp.sum(z ** 2), z[0, :, :, 0]
    (_, z), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(X, jnp.float64), jnp.asarray(K, jnp.float64), jnp.asarray(B, jnp.float64))
    return np.asarray(z), [np.asarray(v) for v in g]


def _explain_conv(e: _Explainer, X, K, B, s: int):
    X, K = np.asarray(X, np.float64), np.asarray(K, np.float64)
    H, W = X.shape
    k = K.shape[0]
    oh, ow = (H - k) // s + 1, (W - k) // s + 1
    r = (H - k) % s
    at = lambda i, j, m, n: (s * i + m, s * j + n)   # 0-based input index read by z_ij, K_mn
    Z = np.array([[sum(X[at(i, j, m, n)] * K[m, n] for m in range(k) for n in range(k)) + B
                   for j in range(ow)] for i in range(oh)])
    z_jax, (gx, gk, gb) = _conv_grads(X, K, B, s)
    _, (mx, mk, mb) = _conv_grads(X, K, B, s, impl="manual")
    e.say("  X =", *_matrix(X), "  K =", *_matrix(K), f"  B = {_n(B)}", "")
    xi = "(i+m-1)(j+n-1)" if s == 1 else f"({s}(i-1)+m)({s}(j-1)+n)"
    e.say(f"  Forward, Z = X ⋆ K + B (stride {s}): z_ij = Σ_mn x_{xi} · K_mn + B")
    if s > 1:
        e.say(f"  Output size: floor(({H} - {k}) / {s}) + 1 = {oh}; the stride remainder r = "
              f"({H} - {k}) mod {s} = {r}: the last {r} row(s) and column(s) of X are read by "
              f"no window.")
    for i in range(oh):
        for j in range(ow):
            terms = " + ".join(f"{_p(X[at(i, j, m, n)])}·{_p(K[m, n])}"
                               for m in range(k) for n in range(k))
            e.say(f"    z_{i + 1}{j + 1} = {terms} + {_p(B)} = {_n(Z[i, j])}")
    e.matrix_check("Z =", Z, z_jax, who='impl="lax" forward')
    dZ = Z
    e.say("", "  Loss: L = ½ Σ_ij z_ij², so dL/dz_ij = z_ij:", "  dL/dZ =", *_matrix(dZ), "")

    e.say("  dL/dK_mn = Σ_ij dL/dz_ij · ∂z_ij/∂K_mn, and ∂z_ij/∂K_mn = x_" + xi
          + " (the input that K_mn multiplies in z_ij):")
    dK = np.zeros_like(K)
    for m in range(k):
        for n in range(k):
            parts = [(i, j) for i in range(oh) for j in range(ow)]
            sym = " + ".join(f"dL/dz_{i + 1}{j + 1}·∂z_{i + 1}{j + 1}/∂K_{m + 1}{n + 1}"
                             for i, j in parts)
            xs = " + ".join(f"dL/dz_{i + 1}{j + 1}·x_{at(i, j, m, n)[0] + 1}"
                            f"{at(i, j, m, n)[1] + 1}" for i, j in parts)
            dK[m, n] = sum(dZ[i, j] * X[at(i, j, m, n)] for i, j in parts)
            nums = " + ".join(f"{_p(dZ[i, j])}·{_p(X[at(i, j, m, n)])}" for i, j in parts)
            e.say(f"    dL/dK_{m + 1}{n + 1} = {sym}",
                  f"             = {xs}",
                  f"             = {nums} = {_n(dK[m, n])}"
                  f"      jax.grad: {_n(gk[m, n])}  {e.check(dK[m, n], gk[m, n])}")
    D = np.zeros(((oh - 1) * s + 1, (ow - 1) * s + 1))   # dL/dZ dilated by the stride
    D[::s, ::s] = dZ
    if s > 1:
        e.say(f"  In one line: dL/dK = X' ⋆ dilate(dL/dZ), where dilate puts {s - 1} zero(s) "
              f"between the entries of dL/dZ (the stride) and X' is X without its last {r} "
              f"row(s) and column(s) (the remainder, which no window reads):", *_matrix(D))
    e.matrix_check("dL/dK =", dK, gk)
    dB = dZ.sum()
    e.say("", "  dL/dB = Σ_ij dL/dz_ij · ∂z_ij/∂B = Σ_ij dL/dz_ij · 1 = "
          + " + ".join(_p(v) for v in dZ.ravel())
          + f" = {_n(dB)}      jax.grad: {_n(gb)}  {e.check(dB, gb)}", "")

    R = K[::-1, ::-1]
    e.say("  dL/dx_pq = Σ_ij dL/dz_ij · ∂z_ij/∂x_pq: x_pq meets K_mn in every window that "
          "covers it. Written as one operation, that sum is the full convolution of the "
          "zero-padded dL/dZ with K rotated by 180°:")
    e.say("  rot180(K) (flip rows and columns):", *_matrix(R))
    what = "dL/dZ"
    if s > 1:
        e.say(f"  Stride {s}: first dilate dL/dZ with {s - 1} zero(s) between entries:",
              *_matrix(D))
        what = "the dilated dL/dZ"
    lo, hi = k - 1, k - 1 + r
    P = np.pad(D, ((lo, hi), (lo, hi)))
    pad_txt = f"{lo} zero(s) on every side" if lo == hi else (
        f"{lo} zero(s) before and {hi} = k-1+r after (the remainder row/column gets gradient 0)")
    e.say(f"  Zero-pad {what} by k-1 = {lo}: {pad_txt}:", *_matrix(P))
    dX = np.array([[sum(P[p + m, q + n] * R[m, n] for m in range(k) for n in range(k))
                    for q in range(W)] for p in range(H)])
    e.say("  dL/dx_pq = Σ_mn padded[p+m-1, q+n-1] · rot180(K)_mn  (a 2×2 window of the padded "
          "dL/dZ, slid with stride 1):")
    shown = ([(p, q) for p in range(H) for q in range(W)] if s == 1 else
             [(0, 0), (1, 2), (H - 1, W - 1)])
    if s > 1:
        e.say(f"  (three of the {H * W} elements; the whole matrix follows)")
    for p, q in shown:
        nums = " + ".join(f"{_p(P[p + m, q + n])}·{_p(R[m, n])}"
                          for m in range(k) for n in range(k))
        e.say(f"    dL/dx_{p + 1}{q + 1} = {nums} = {_n(dX[p, q])}"
              f"      jax.grad: {_n(gx[p, q])}  {e.check(dX[p, q], gx[p, q])}")
    if s > 1:
        e.say(f"  Row {H} and column {W} are the stride remainder: no window read them, so "
              "their gradient is 0.")
    if s == 1:
        c = (1, 1)   # the centre element: every window covers it
        covering = [(i, j, c[0] - i, c[1] - j) for i in range(oh) for j in range(ow)
                    if 0 <= c[0] - i < k and 0 <= c[1] - j < k]
        chain = sum(dZ[i, j] * K[m, n] for i, j, m, n in covering)
        e.say("  Check one by the chain rule directly: x_22 is covered by all four windows,",
              "    dL/dx_22 = " + " + ".join(f"dL/dz_{i + 1}{j + 1}·K_{m + 1}{n + 1}"
                                            for i, j, m, n in covering)
              + " = " + " + ".join(f"{_p(dZ[i, j])}·{_p(K[m, n])}" for i, j, m, n in covering)
              + f" = {_n(chain)}      jax.grad: {_n(gx[c])}  {e.check(chain, gx[c])}")
    e.matrix_check("dL/dX =", dX, gx)
    ok = e.check(np.concatenate([mx.ravel(), mk.ravel(), mb.ravel()]),
                 np.concatenate([gx.ravel(), gk.ravel(), gb.ravel()]))
    e.say(f'  The registered backward (impl="manual", jax.custom_vjp) gives the same dL/dX, '
          f"dL/dK, dL/dB: {ok}", "")


def _explain_pool(e: _Explainer, X, kind: str):
    X = np.asarray(X, np.float64)
    op = max_pool if kind == "max" else avg_pool

    def loss(x, impl):
        z = op(x[None, :, :, None], 2, impl=impl)   # 2×2 window, stride 2 (the default)
        return 0.5 * jnp.sum(z ** 2), z[0, :, :, 0]

    (_, z_jax), gx = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(X), "lax")
    mx = jax.grad(lambda x: loss(x, "manual")[0])(jnp.asarray(X))
    H, W = X.shape
    Z = np.zeros((H // 2, W // 2))
    dX = np.zeros_like(X)
    e.say("  X =", *_matrix(X))
    word = "max" if kind == "max" else "mean"
    e.say(f"  Z_ij = {word} of window ij (2×2, stride 2); L = ½ Σ z_ij², so dL/dz_ij = z_ij.")
    for i in range(H // 2):
        for j in range(W // 2):
            win = X[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            cells = [(2 * i + a, 2 * j + b) for a in range(2) for b in range(2)]
            names = ", ".join(f"x_{p + 1}{q + 1}={_n(X[p, q])}" for p, q in cells)
            if kind == "max":
                p, q = cells[int(np.argmax(win.ravel()))]
                Z[i, j] = X[p, q]
                dX[p, q] += Z[i, j]
                e.say(f"    window {i + 1}{j + 1} ({names}): z_{i + 1}{j + 1} = {_n(Z[i, j])}, "
                      f"the max is x_{p + 1}{q + 1}, so dL/dx_{p + 1}{q + 1} = dL/dz_{i + 1}"
                      f"{j + 1} = {_n(Z[i, j])}; the other three get 0")
            else:
                Z[i, j] = win.mean()
                for p, q in cells:
                    dX[p, q] += Z[i, j] / 4
                e.say(f"    window {i + 1}{j + 1} ({names}): z_{i + 1}{j + 1} = "
                      f"({' + '.join(_p(v) for v in win.ravel())}) / 4 = {_n(Z[i, j])}; each of "
                      f"the four gets dL/dz_{i + 1}{j + 1} / 4 = {_n(Z[i, j] / 4)}")
    e.matrix_check("Z =", Z, z_jax, who='impl="lax" forward')
    e.matrix_check("dL/dX =", dX, gx)
    e.say(f'  The registered backward (impl="manual") gives the same dL/dX: '
          f"{e.check(mx, gx)}", "")


def explain(out: Callable[[str], Any] = print) -> bool:
    """Print the lecture's worked example with numbers; True when every ✓ holds."""
    e = _Explainer(out)
    e.say("The lecture's worked example, every number checked against jax.grad",
          "(1-based indices as in the lecture; ⋆ is cross-correlation, what CNNs call "
          "convolution; jax.grad differentiates impl=\"lax\", the reference).", "")
    e.say("1. Convolution, stride 1: X 3×3, K 2×2, bias B, Z = X ⋆ K + B is 2×2.")
    _explain_conv(e, [[1, 2, 0], [3, 1, 2], [0, 1, 3]], [[1, -1], [2, 0]], 1.0, 1)
    e.say("2. Convolution, stride 2: X 5×5, K 2×2, B; dL/dZ is dilated before the full "
          "convolution.")
    _explain_conv(e, [[1, 0, 2, 1, 3], [0, 1, 1, 2, 0], [2, 1, 0, 1, 1], [1, 3, 1, 0, 2],
                      [0, 1, 2, 1, 1]], [[1, -1], [2, 0]], 1.0, 2)
    pool_x = [[1, 7, 2, 0], [3, 5, 4, 6], [8, 2, 0, 4], [9, 1, 3, 5]]
    e.say("3. Max pooling, 2×2 window, stride 2: the gradient goes to the max of each window.")
    _explain_pool(e, pool_x, "max")
    e.say("4. Average pooling, 2×2 window, stride 2: the gradient is spread evenly, 1/4 each.")
    _explain_pool(e, pool_x, "avg")
    e.say("All hand-derived numbers agree with jax.grad." if e.all_ok else
          "Some hand-derived numbers DISAGREE with jax.grad (✗ above).")
    return e.all_ok


# ============================================================================================
# The report and the command line.


def header(dtype: str) -> list:
    devices = jax.devices()
    names = ", ".join(str(d) for d in devices[:4]) + (", ..." if len(devices) > 4 else "")
    return [
        f"jaxcnn derivation check: backend {jax.default_backend()} "
        f"({len(devices)} device{'s' if len(devices) != 1 else ''}: {names}), "
        f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, dtype {dtype}",
        "(a) = the custom VJP (impl=\"manual\", the lecture's backward), compared with:",
        "  fwd  forward output, impl=\"manual\" vs impl=\"lax\"",
        "  (b)  jax.grad through impl=\"lax\"",
        "  (c)  jax.grad through the manual forward, custom VJP bypassed",
        f"  (d)  {fd_note(dtype)}",
        "  (e)  adjoint test <J·v, u> (forward mode through the manual forward) vs <v, Jᵀ·u>",
        f"Each cell: largest abs/rel error, '!' when out of tolerance. Tolerances ({dtype}): "
        f"rtol {TOLERANCES[dtype]['rtol']:g}, atol {TOLERANCES[dtype]['atol']:g}; (d) rtol "
        f"{fd_tolerance(dtype)['rtol']:g}, atol {fd_tolerance(dtype)['atol']:g}.",
    ]


def _row(section: str, op: str, label: str, result: CheckResult) -> dict:
    return {"section": section, "op": op, "config": label, "ok": result.ok,
            "summary": result.summary(),
            "worst": {k: (None if (c := result.worst(k)) is None else c.to_dict())
                      for k in COLUMNS},
            "not_applicable": dict(result.skipped), "detail": result.to_dict()}


def _cells(result: CheckResult) -> list:
    cells = []
    for k in COLUMNS:
        c = result.worst(k)
        cells.append(_NOT_APPLICABLE if c is None else c.cell())
    if not result.ok:
        note = result.summary()
    elif result.skipped:
        note = "(c)-(e) n/a, see below"
    else:
        note = ""
    return cells + ["ok" if result.ok else "FAIL", note]


def _atomic_write_json(path: str, payload: dict):
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    _io.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m jaxcnn.check",
        description="Prove every hand-derived gradient of jaxcnn equal to jax.grad, to "
                    "autodiff of the manual forward, to finite differences and to the adjoint "
                    "test, on this machine's backend.")
    p.add_argument("--op", action="append", choices=OPS, metavar="NAME",
                   help=f"check only this op (repeatable): {', '.join(OPS)}")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--quick", action="store_true",
                   help="a representative subset (one or a few configurations per op)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON (atomically)")
    p.add_argument("--explain", action="store_true",
                   help="print the lecture's worked example with numbers, checked by jax.grad")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """The command line; returns the exit code (0: everything agrees, 1: something failed)."""
    args = _parse(argv)
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        if args.explain:
            return 0 if explain() else 1
        return _report(args)
    finally:
        jax.config.update("jax_enable_x64", previous)


def _report(args) -> int:
    t0 = time.perf_counter()
    ops = tuple(args.op) if args.op else OPS
    lines = header(args.dtype)
    for line in lines:
        print(line)
    print()
    widths = [13, 40] + [12] * len(COLUMNS) + [6]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths + [0])).rstrip()
    print(fmt(["op", "configuration"] + list(COLUMNS.values()) + ["result"]))
    rows, skipped_reasons = [], {}
    for case in grid(args.dtype, ops, args.quick):
        result = run_case(case)
        rows.append(_row("grid", case.op, case.label, result))
        print(fmt([case.op, case.label] + _cells(result)), flush=True)
        for reason in result.skipped.values():
            skipped_reasons.setdefault(reason, None)
    for reason in skipped_reasons:
        print(f"  n/a: {reason}")
    e2e_source = None
    if not args.op:
        print("\nEnd to end: gradient of the LeNet-5 loss, every layer impl=\"manual\" vs every "
              "layer impl=\"lax\", parameter by parameter")
        try:
            e2e, e2e_source = run_end_to_end(args.dtype)
        except Exception as err:  # noqa: BLE001 - a crash is a failure of the check, reported
            error = CheckResult("lenet5", args.dtype, None, [], error=f"{type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}")
            rows.append(_row("end_to_end", "lenet5", "loss gradient", error))
            print("  " + error.summary())
        else:
            print(f"  batch: 16 images from {e2e_source}; fwd = the loss value")
            e_table = []
            for res in e2e:
                arg = res.args[0]
                label = f"{arg.name} {tuple(arg.shape)}"
                rows.append(_row("end_to_end", "lenet5", label, res))
                e_table.append(["lenet5", label, res.forward.cell(),
                                arg.comparisons["reference_grad"].cell(),
                                "ok" if res.ok else "FAIL"])
            for line in _format_table(["", "parameter", "fwd", "(b) jax.grad", "result"],
                                      e_table):
                print("  " + line)
    passed = sum(r["ok"] for r in rows)
    failed = len(rows) - passed
    elapsed = time.perf_counter() - t0
    print(f"\n{passed} passed, {failed} failed  ({elapsed:.1f} s)")
    if args.json:
        _atomic_write_json(args.json, {
            "header": lines, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax_version": jax.__version__,
            "dtype": args.dtype, "quick": args.quick, "ops": list(ops),
            "tolerances": TOLERANCES[args.dtype], "fd_tolerances": fd_tolerance(args.dtype),
            "fd_step": FD_TOLERANCES[_fd_dtype(args.dtype)]["step"],
            "end_to_end_batch": e2e_source,
            "rows": rows, "passed": passed, "failed": failed, "seconds": elapsed,
        })
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
