"""The command line ``python -m jaxcnn.check``: the grid, the end-to-end section, the report.

Prints a header (backend, devices, versions, what (a)-(e) are and the tolerances), one row per
configuration of the grid, the end-to-end section of every model, a ``N passed, M failed``
line, and exits 1 if anything fails. ``--json FILE`` also writes the rows (atomically);
``--explain`` prints the lecture's worked example instead. float64 is enabled for the run and
restored afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jaxlib

from .._io import atomic_write
from .end_to_end import MODELS, run_model
from .explain import explain
from .grid import OPS, grid, run_case
from .results import COLUMNS, NOT_APPLICABLE, CheckResult, format_table
from .tolerances import FD_TOLERANCES, TOLERANCES, fd_dtype, fd_note, fd_tolerance

# op (as wide as the longest op name), configuration, comparisons, result
_WIDTHS = [max(map(len, OPS)), 40] + [12] * len(COLUMNS) + [6]


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


def header(dtype: str) -> list:
    """The report's first lines: where it runs, what (a)-(e) are, the tolerances."""
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


def _report(args) -> int:
    t0 = time.perf_counter()
    ops = tuple(args.op) if args.op else tuple(OPS)
    lines = header(args.dtype)
    for line in lines:
        print(line)
    print()
    rows = _report_grid(args.dtype, ops, args.quick)
    sources = []
    if not args.op:
        for model in MODELS.values():
            model_rows, source = _report_end_to_end(model, args.dtype)
            rows += model_rows
            sources += [source] if source is not None else []
    passed = sum(r["ok"] for r in rows)
    failed = len(rows) - passed
    elapsed = time.perf_counter() - t0
    print(f"\n{passed} passed, {failed} failed  ({elapsed:.1f} s)")
    if args.json:
        report = {
            "header": lines, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax_version": jax.__version__,
            "dtype": args.dtype, "quick": args.quick, "ops": list(ops),
            "tolerances": TOLERANCES[args.dtype], "fd_tolerances": fd_tolerance(args.dtype),
            "fd_step": FD_TOLERANCES[fd_dtype(args.dtype)]["step"],
            "end_to_end_batch": "; ".join(sources) or None,
            "rows": rows, "passed": passed, "failed": failed, "seconds": elapsed,
        }
        text = json.dumps(report, indent=2, allow_nan=False) + "\n"
        atomic_write(args.json, lambda f: f.write(text.encode("utf-8")))
    return 1 if failed else 0


def _report_grid(dtype: str, ops, quick: bool) -> list:
    """Run and print the grid, one line per case; returns the JSON rows."""
    print(_grid_line(["op", "configuration"] + list(COLUMNS.values()) + ["result"]))
    rows, skipped_reasons = [], {}
    for case in grid(dtype, ops, quick):
        result = run_case(case)
        rows.append(_row("grid", case.op, case.label, result))
        print(_grid_line([case.op, case.label] + _cells(result)), flush=True)
        for reason in result.skipped.values():
            skipped_reasons.setdefault(reason, None)
    for reason in skipped_reasons:
        print(f"  n/a: {reason}")
    return rows


def _grid_line(cells) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, _WIDTHS + [0])).rstrip()


def _cells(result: CheckResult) -> list:
    cells = []
    for k in COLUMNS:
        c = result.worst(k)
        cells.append(NOT_APPLICABLE if c is None else c.cell())
    if not result.ok:
        note = result.summary()
    elif result.skipped:
        columns = [COLUMNS[k].split()[0] for k in COLUMNS if k in result.skipped]
        note = f"{', '.join(columns)} n/a, see below"
    else:
        note = ""
    return cells + ["ok" if result.ok else "FAIL", note]


def _report_end_to_end(model, dtype: str) -> tuple[list, str | None]:
    """Run and print one model's end-to-end section; returns the JSON rows and the batch's
    source (None when the section crashed: that is reported as a failed row)."""
    print(f"\nEnd to end: gradient of {model.loss_name}, every layer impl=\"manual\" vs every "
          "layer impl=\"lax\", parameter by parameter")
    try:
        results, batch = run_model(model, dtype)
    except Exception as err:  # noqa: BLE001 - a crash is a failure of the check, reported
        error = CheckResult(model.name, dtype, None, [], error=f"{type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}")
        print("  " + error.summary())
        return [_row("end_to_end", model.name, "loss gradient", error)], None
    print(f"  batch: {len(batch.labels)} images from {batch.source}; fwd = the loss value")
    rows, table = [], []
    for res in results:
        arg = res.args[0]
        label = f"{arg.name} {tuple(arg.shape)}"
        rows.append(_row("end_to_end", model.name, label, res))
        table.append([model.name, label, res.forward.cell(),
                      arg.comparisons["reference_grad"].cell(), "ok" if res.ok else "FAIL"])
    for line in format_table(["", "parameter", "fwd", "(b) jax.grad", "result"], table):
        print("  " + line)
    return rows, batch.source


def _row(section: str, op: str, label: str, result: CheckResult) -> dict:
    """One row of the JSON report."""
    return {"section": section, "op": op, "config": label, "ok": result.ok,
            "summary": result.summary(),
            "worst": {k: (None if (c := result.worst(k)) is None else c.to_dict())
                      for k in COLUMNS},
            "not_applicable": dict(result.skipped), "detail": result.to_dict()}


if __name__ == "__main__":
    sys.exit(main())
