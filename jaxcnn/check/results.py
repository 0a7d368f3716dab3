"""What a derivation check found: one comparison, one argument, one check, and their tables.

:class:`Comparison` is one error measurement against its tolerance, :class:`ArgCheck` the
comparisons of one differentiable argument, :class:`CheckResult` a whole check (what
``check_vjp`` returns and what each row of the report holds), printed as a table.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# The comparisons, in report order: JSON key -> column header.
COLUMNS = {
    "forward": "fwd",
    "reference_grad": "(b) jax.grad",
    "bypass_grad": "(c) bypass",
    "finite_diff": "(d) fin.diff",
    "adjoint": "(e) adjoint",
}
NOT_APPLICABLE = "—"


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
        return f"{short_float(self.abs_err)}/{short_float(self.rel_err)}{mark}"

    def to_dict(self) -> dict:
        return {"abs": _json_float(self.abs_err), "rel": _json_float(self.rel_err),
                "ok": self.ok}


def short_float(v: float) -> str:
    """An error in one significant digit (``3e-16``), ``0`` when exact."""
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
            lines.append(f"  forward output: max abs {short_float(self.forward.abs_err)}, rel "
                         f"{short_float(self.forward.rel_err)}  "
                         f"{'ok' if self.forward.ok else 'FAIL'}")
        if self.args:
            header = ["argument", "shape"] + [COLUMNS[k] + " abs/rel" for k in cols] + ["result"]
            lines += ["  " + line for line in format_table(header, self._arg_rows(cols))]
        for k, reason in self.skipped.items():
            lines.append(f"  {COLUMNS[k]} not applicable: {reason}")
        lines.append("  " + self.summary())
        return "\n".join(lines)

    __str__ = table

    def _arg_rows(self, cols) -> list:
        rows = []
        for a in self.args:
            cells = [a.name, str(tuple(a.shape))]
            for k in cols:
                c = a.comparisons.get(k)
                cells.append(NOT_APPLICABLE if c is None else c.cell())
            rows.append(cells + ["ok" if a.ok else "FAIL"])
        return rows

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


def format_table(header, rows) -> list:
    """Left-aligned columns, two spaces apart, as wide as their widest cell."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return [fmt(header)] + [fmt(r) for r in rows]
