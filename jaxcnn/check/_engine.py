"""The comparison engine: a custom VJP (a) against autodiff, finite differences and the adjoint.

For one function and one set of arguments, :func:`compare` takes the cotangent of the custom
VJP (a) for a random output cotangent ``u`` and compares it, argument by argument, with (b, c)
the VJPs of reference forwards, (d) central finite differences of a smooth forward and (e) the
adjoint identity ``<J·v, u> = <v, Jᵀ·u>``. :func:`check_vjp` is its public door; every row of
the grid goes through it too. Everything is computed in one jitted call.
"""

from __future__ import annotations

import inspect
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .results import ArgCheck, CheckResult, Comparison
from .tolerances import (FD_DIRECTIONS, FD_ELEMENTWISE_MAX, FD_TOLERANCES, TOLERANCES, fd_dtype,
                         fd_note, fd_tolerance)


def check_vjp(func: Callable, reference: Callable, *args, **static) -> CheckResult:
    """Check a hand-derived VJP against autodiff, finite differences and the adjoint test.

    ``func(*args, **static)`` is the function under test, with its backward registered by
    ``jax.custom_vjp``; ``reference(*args, **static)`` computes the same forward with ops JAX
    can differentiate. The floating-point arrays among ``args`` are differentiated (integer
    arrays, None and other values are passed through). For each of them, the cotangent of
    ``func``'s VJP for a random output cotangent ``u`` is compared with

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
    names = _arg_names(func, len(args))
    under_test = (lambda *a: func(*a, **static)) if static else func
    ref = (lambda *a: reference(*a, **static)) if static else reference
    return compare(under_test, {"reference_grad": ref}, ref, args, names, owner=func,
                   title=f"check_vjp({_name(func)}, {_name(reference)})")


def compare(func, refs: dict, smooth, args, names, *, title, skip=None, owner=None,
            seed=0) -> CheckResult:
    """Compare the VJP of ``func`` (a) with ``refs`` (b, c), FD (d) and adjoint (e) of ``smooth``.

    ``func``, every ``refs`` value and ``smooth`` take the same positional ``args``; the
    floating arrays among them are differentiated, everything else is passed through unchanged.
    ``refs`` maps ``"reference_grad"`` / ``"bypass_grad"`` to autodiff-able forwards.
    ``skip`` maps comparisons to the reason they do not apply (e.g. tied maxima). ``owner`` is
    the ``custom_vjp`` function itself when ``func`` wraps it (to name the argument of a
    shape error by its ``nondiff_argnums``).
    """
    skip = dict(skip or {})
    owner = func if owner is None else owner
    diff = _differentiable_positions(args, title)
    dargs = tuple(jnp.asarray(args[i]) for i in diff)
    dtype = _dtype_of(dargs)
    refs = {k: f for k, f in refs.items() if k not in skip}
    on_diff = lambda f: _of_differentiable(f, args, diff)
    rng = np.random.default_rng(seed)
    try:
        out_struct = jax.eval_shape(on_diff(func), *dargs)
    except Exception as err:  # noqa: BLE001 - reported, not raised: a check must not crash
        return CheckResult(title, dtype, None, [], skip, f"{type(err).__name__}: {err}",
                           _culprits(str(err), owner, args, names))
    probes = _draw_probes(out_struct, dargs, rng, jnp.dtype(fd_dtype(dtype)))
    compute = _computation(on_diff(func), {k: on_diff(f) for k, f in refs.items()},
                           on_diff(smooth), "finite_diff" not in skip, "adjoint" not in skip)
    try:
        found = jax.device_get(jit_once(compute, dargs, probes.u, probes.fd_tangents,
                                        probes.adjoint_tangents))
    except Exception as err:  # noqa: BLE001
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return CheckResult(title, dtype, None, [], skip, msg,
                           _culprits(str(err), owner, args, names), fd_note(dtype))
    forward = _forward_comparison(found, refs, TOLERANCES[dtype])
    checks = _argument_checks(found, probes, dargs, [names[i] for i in diff], skip, dtype)
    return CheckResult(title, dtype, forward, checks, skip, None, [],
                       fd_note(dtype) if "fd" in found else "")


def jit_once(f, *args):
    """Compile ``f`` for ``args`` with the default options of whatever backend runs, and run it
    once (one compilation per configuration, not cached: each is used once)."""
    return jax.jit(f).lower(*args).compile()(*args)


# --------------------------------------------------------------------------------------------
# The arguments: which are differentiated, under which names, in which dtype.


def _is_float_array(a) -> bool:
    dtype = getattr(a, "dtype", None)
    return (dtype is not None and getattr(a, "shape", None) is not None
            and jnp.issubdtype(dtype, jnp.floating))


def _differentiable_positions(args, title) -> list:
    """The positions of the floating-point arrays among ``args`` (at least one)."""
    diff = [i for i, a in enumerate(args) if _is_float_array(a)]
    if not diff:
        raise TypeError(f"check_vjp: no floating-point array among the arguments of {title}; "
                        f"got types {[type(a).__name__ for a in args]}")
    return diff


def _dtype_of(dargs) -> str:
    dtype = np.dtype(jnp.result_type(*dargs)).name
    if dtype not in TOLERANCES:
        raise TypeError(f"check_vjp: arguments must be float32 or float64; got {dtype}")
    return dtype


def _of_differentiable(f, args, diff):
    """``f`` as a function of the differentiable arguments only (the others held fixed)."""
    def of_diff(*d):
        a = list(args)
        for i, v in zip(diff, d):
            a[i] = v
        return f(*a)
    return of_diff


def _arg_names(func, n: int) -> list:
    """The names of ``func``'s first ``n`` positional parameters (``arg{i}`` when unknown)."""
    try:
        params = [p for p in inspect.signature(func).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params]
    except (TypeError, ValueError):
        names = []
    return [names[i] if i < len(names) else f"arg{i}" for i in range(n)]


def _name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


def _culprits(message: str, owner, args, names) -> list:
    """Name the argument a custom_vjp shape/type error points at (``output[k]``)."""
    m = re.search(r"output\[(\d+)\]", message)
    if not m:
        return []
    nondiff = tuple(getattr(owner, "nondiff_argnums", ()) or ())
    positions = [p for p in range(len(args)) if p not in nondiff]
    k = int(m.group(1))
    return [names[positions[k]]] if k < len(positions) else []


# --------------------------------------------------------------------------------------------
# The random probes: the output cotangent u, the (d) and the (e) directions.


class _Probes(NamedTuple):
    u_leaves: list          # the output cotangent u, as numpy leaves
    u: object               # ... and as the output's pytree of jax arrays
    fd_blocks: list         # per argument: its (d) directions, (count, *shape)
    fd_tangents: list       # per argument: h·v for every (d) direction, zeros for the others
    fd_steps: np.ndarray    # h of every (d) direction, in order
    adjoint_dirs: list      # per argument: its (e) direction v
    adjoint_tangents: list  # per argument: one row per argument, v in its own row


def _draw_probes(out_struct, dargs, rng, fd_dt) -> _Probes:
    """Draw u, then the (d) directions, then the (e) directions, in that order from ``rng``."""
    leaves, treedef = jax.tree_util.tree_flatten(out_struct)
    u_leaves = [rng.standard_normal(s.shape).astype(s.dtype) for s in leaves]
    u = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in u_leaves])
    blocks, tangents, steps = _fd_directions(dargs, rng, fd_dt)
    adjoint_dirs, adjoint_tangents = _adjoint_directions(dargs, rng)
    return _Probes(u_leaves, u, blocks, tangents, steps, adjoint_dirs, adjoint_tangents)


def _fd_directions(dargs, rng, fd_dt):
    """(d): every element of small arguments, random directions (max |v_k| = 1) of large ones;
    one block of directions per argument, zeros for the other arguments."""
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
    steps = [FD_TOLERANCES[fd_dt.name]["step"] * max(1.0, float(np.max(np.abs(a)))) if a.size
             else 1.0 for a in dargs]
    tangents, step_of_direction, start = [], [], 0
    for a, v, h in zip(dargs, blocks, steps):
        t = np.zeros((total, *a.shape), fd_dt)
        t[start:start + len(v)] = h * v
        tangents.append(t)
        step_of_direction += [h] * len(v)
        start += len(v)
    return blocks, tangents, np.asarray(step_of_direction)


def _adjoint_directions(dargs, rng):
    """(e): one random tangent per argument, zeros for the other arguments."""
    dirs = [rng.standard_normal(a.shape) for a in dargs]
    tangents = []
    for i, a in enumerate(dargs):
        t = np.zeros((len(dargs), *a.shape), a.dtype)
        t[i] = dirs[i]
        tangents.append(t)
    return dirs, tangents


# --------------------------------------------------------------------------------------------
# The one jitted computation: every VJP, the finite differences and the forward-mode products.


def _computation(func, refs: dict, smooth, do_fd: bool, do_adjoint: bool):
    """The function of (dargs, u, fd_tangents, adjoint_tangents) that computes everything.

    Returns a dict: ``"a"`` the VJP of ``func``, one entry per ``refs`` key with its VJP,
    ``"y"`` every forward output, ``"fd"`` the differences f(x+hv) - f(x-hv) of ``<u, smooth>``
    and ``"jv"`` the forward-mode products ``J·v`` of ``smooth``.
    """
    def compute(dargs, u, fd_tangents, adjoint_tangents):
        found = {}
        y, vjp = jax.vjp(func, *dargs)
        found["a"], found["y"] = vjp(u), {"a": y}
        for key, f in refs.items():
            y, vjp = jax.vjp(f, *dargs)
            found[key], found["y"][key] = vjp(u), y
        if do_fd:
            found["fd"] = _central_differences(smooth, dargs, u, fd_tangents)
        if do_adjoint:
            found["jv"] = jax.vmap(lambda *t: jax.jvp(smooth, dargs, t)[1])(*adjoint_tangents)
        return found
    return compute


def _central_differences(smooth, dargs, u, fd_tangents):
    """``<u, smooth(x + h v)> - <u, smooth(x - h v)>`` for every direction, in the tangents'
    dtype (float64 whenever JAX allows it)."""
    fd_dt = fd_tangents[0].dtype
    x_fd = [a.astype(fd_dt) for a in dargs]
    u_fd = jax.tree_util.tree_map(lambda v: v.astype(fd_dt), u)

    def scalar(*d):
        ys = jax.tree_util.tree_leaves(smooth(*d))
        return sum(jnp.vdot(uu, yy.astype(fd_dt))
                   for uu, yy in zip(jax.tree_util.tree_leaves(u_fd), ys))

    total = fd_tangents[0].shape[0]
    both = [jnp.concatenate([t, -t]) for t in fd_tangents]
    vals = jax.vmap(lambda *t: scalar(*[a + ti for a, ti in zip(x_fd, t)]))(*both)
    return vals[:total] - vals[total:]


# --------------------------------------------------------------------------------------------
# Turning what was computed into comparisons.


def _forward_comparison(found, refs, tol) -> Comparison | None:
    """The forward output of (a) against every reference's (None when there is none)."""
    if not refs:
        return None
    leaves = jax.tree_util.tree_leaves
    return Comparison.worst(
        Comparison.worst(Comparison.between(p, q, tol)
                         for p, q in zip(leaves(found["y"]["a"]), leaves(found["y"][k])))
        for k in refs)


def _argument_checks(found, probes: _Probes, dargs, dnames, skip, dtype) -> list:
    """One :class:`ArgCheck` per differentiable argument: (b), (c), (d), (e) in that order."""
    tol, ftol = TOLERANCES[dtype], fd_tolerance(dtype)
    a_cot = [np.asarray(c, np.float64) for c in found["a"]]
    fd = None
    if "fd" in found:
        fd = np.asarray(found["fd"], np.float64) / (2 * probes.fd_steps)
    checks, start = [], 0
    for i, (name, a) in enumerate(zip(dnames, dargs)):
        comps = {}
        for key in ("reference_grad", "bypass_grad"):
            if key in found:
                comps[key] = Comparison.between(a_cot[i], found[key][i], tol)
            elif key in skip:
                comps[key] = None
        v = probes.fd_blocks[i].reshape(len(probes.fd_blocks[i]), -1)
        comps["finite_diff"] = (None if fd is None else
                                _fd_comparison(v, a_cot[i], fd[start:start + len(v)], ftol))
        start += len(v)
        comps["adjoint"] = (None if "jv" not in found else
                            _adjoint_comparison(i, found["jv"], probes, a_cot[i], tol))
        checks.append(ArgCheck(name, tuple(a.shape), comps))
    return checks


def _fd_comparison(directions, cotangent, measured, ftol) -> Comparison:
    """(d): ``<a, v>`` predicted by the cotangent against the measured differences, scaled by
    the sum of |terms| of the inner product."""
    terms = directions * cotangent.reshape(1, -1)              # <a, v> term by term
    predicted = terms.sum(axis=1)
    return Comparison.of(np.max(np.abs(measured - predicted)),
                         np.max(np.sum(np.abs(terms), axis=1)), ftol)


def _adjoint_comparison(i, jv, probes: _Probes, cotangent, tol) -> Comparison:
    """(e) for argument ``i``: ``<J·v, u>`` (forward mode) against ``<v, Jᵀ·u>``."""
    jv_i = [np.asarray(leaf[i], np.float64) for leaf in jax.tree_util.tree_leaves(jv)]
    u_leaves = [np.asarray(v, np.float64) for v in probes.u_leaves]
    lhs_terms = np.concatenate([(j * uu).ravel() for j, uu in zip(jv_i, u_leaves)])
    rhs_terms = (probes.adjoint_dirs[i] * cotangent).ravel()
    scale = max(np.sum(np.abs(lhs_terms)), np.sum(np.abs(rhs_terms)))
    return Comparison.of(abs(lhs_terms.sum() - rhs_terms.sum()), scale, tol)
