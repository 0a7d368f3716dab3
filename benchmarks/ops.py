"""Speed of ``impl="manual"`` relative to ``impl="lax"`` on a grid of ops and whole networks.

    python benchmarks/ops.py                    # the whole grid (meant to take 10-15 min on
                                                # 2 cores; the run prints its wall time)
    python benchmarks/ops.py --quick            # 15 representative cases + LeNet-5 (~1 min)
    python benchmarks/ops.py --filter "1-D"     # the cases whose name contains "1-D"
    python benchmarks/ops.py --json ops.json    # every number, also to a file
    python benchmarks/ops.py --smoke            # tiny shapes, one case per section (seconds)
    python benchmarks/ops.py --smoke --quick    # the --quick cases on tiny shapes
    python benchmarks/ops.py --list             # the case list, nothing measured

The grid (``benchmarks/_grid.py``, issue 9 §2): convolutions (1-, 2-, 3-D; kernels 1 to 11 and
long 1-D kernels; channels 1 to 256; strides 1, 2, 4; dilation; groups and depthwise; batch 1,
32, 128; every conv layer of LeNet-5, the CIFAR stack and small_cnn), pooling, dense, and,
where this jaxcnn has them, conv_transpose and global / adaptive pooling. For each case:

- forward and forward+backward (the gradient of ``sum(out * cotangent)``, or of the loss for
  the dense + cross-entropy head, with respect to the input and every parameter), each impl
  jitted; the two impls are timed in alternating rounds in this one process (``--repeats``
  rounds, the order swapping each round; one sample is enough calls to last
  ``--min-sample-ms``); the table gives lax's median time and the median of the per-round
  ratios manual/lax (below 1: the manual path is faster);
- the first call (trace + compile + first run) of each impl's forward+backward, each on a
  fresh jit after ``jax.clear_caches()`` (the persistent compilation cache is off).

Then whole networks forward+backward (the gradient of the loss with respect to all params):
LeNet-5, the CIFAR stack, small_cnn (``benchmarks/_nets.py``) and ``jaxcnn.models.resnet``
where it exists. Last, the floors of issue 9 §2, checked on this run: PASS / FAIL each, with
the offending cases. Every timing blocks on its result, so the script runs as it is on any
backend (the header names it). A benchmark, not a test: the numbers depend on the machine and
its load; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _grid  # noqa: E402
import _nets  # noqa: E402
import _timing  # noqa: E402

from jaxcnn._io import atomic_write  # noqa: E402

IMPLS = ("lax", "manual")
SECTIONS = {"conv": "convolution", "conv_transpose": "transposed convolution",
            "pool": "pooling", "global pool": "global and adaptive pooling",
            "dense": "dense, activation and the dense + cross-entropy head"}

# The floors of issue 9 §2.
MAX_RATIO = 2.0          # every case: manual <= 2x lax, forward and forward+backward
MAX_MEDIAN = 1.0         # the median ratio over the grid, forward and forward+backward
FIRST_CALL_RATIO = 3.0   # first call <= 3x lax's ...
FIRST_CALL_EXTRA = 0.5   # ... or at most 0.5 s more
MAX_NETWORK = 0.8        # whole networks forward+backward: manual <= 0.8x lax


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a representative subset (about 15 cases + LeNet-5), about a minute")
    p.add_argument("--filter", metavar="SUBSTRING",
                   help="only the cases (and networks) whose name contains SUBSTRING")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per case (median)")
    p.add_argument("--min-sample-ms", type=float, default=20.0,
                   help="calls per sample so that one sample lasts at least this long")
    p.add_argument("--json", metavar="FILE", help="write every number to FILE as well")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes and 1 round, on one --quick case per section and LeNet-5 "
                        "(or on the cases --quick / --filter select): checks that the script "
                        "runs, measures nothing")
    p.add_argument("--list", action="store_true", help="print the selected cases and exit")
    p.add_argument("--reuse-host-memory", action="store_true",
                   help="call jaxcnn.reuse_host_memory first, as train.py does (by default the "
                        "ops run on glibc's default allocator, as in a user's own script)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1; got {args.repeats}")
    args.smoke_sample = args.smoke and not args.quick and args.filter is None
    if args.smoke:
        args.repeats, args.min_sample_ms = 1, 0.0
    return args


def selected(items, args, name=lambda c: c.name, quick=lambda c: c.quick, section=None):
    """The items ``--quick`` and ``--filter`` select; a bare ``--smoke`` takes the first quick
    item of each section (``section(item)``; all quick items where there is no section)."""
    chosen = [c for c in items if (not (args.quick or args.smoke_sample) or quick(c))
              and (args.filter is None or args.filter in name(c))]
    if args.smoke_sample and section is not None:
        firsts = {}
        for c in chosen:
            firsts.setdefault(section(c), c)
        chosen = list(firsts.values())
    return chosen


# --------------------------------------------------------------------------------------------
# Measuring one case.


def case_args(case, seed):
    """Arrays for ``case.op``: ``x`` ~ N(0, 1), weights ~ N(0, 1 / fan_in), biases ~ N(0, 0.01)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, shape in enumerate(case.shapes):
        scale = 1.0 if i == 0 else (0.1 if len(shape) == 1 else np.prod(shape[:-1]) ** -0.5)
        out.append(jnp.asarray(rng.normal(size=shape) * scale, jnp.float32))
    return tuple(out)


def forward(case, impl):
    return jax.jit(partial(case.op, impl=impl))


def forward_backward(case, impl):
    """Jitted ``(*inputs, cotangent) -> gradient of sum(op(*inputs) * cotangent)`` with
    respect to every input (for a scalar output, the cotangent is 1: the loss itself)."""
    n = len(case.shapes)

    def loss(*a):
        return jnp.sum(case.op(*a[:n], impl=impl) * a[n])

    return jax.jit(jax.grad(loss, argnums=tuple(range(n))))


def measure_case(case, args, seed):
    """Times of one case (see the module docstring); ``{"error": ...}`` if it fails."""
    try:
        inputs = case_args(case, seed)
        out = jax.eval_shape(forward(case, "lax"), *inputs)
        cot = jnp.asarray(np.random.default_rng(seed + 1).normal(size=out.shape)
                          if out.shape else 1.0, jnp.float32)
        fb_inputs = (*inputs, cot)
        first = {}
        for impl in IMPLS:  # lax first: its function is cheap to compile again afterwards
            first[impl], _ = _timing.first_call(lambda impl=impl: forward_backward(case, impl),
                                                fb_inputs)
        times = {}
        for mode, make, a in (("fwd", forward, inputs), ("fwd+bwd", forward_backward,
                                                          fb_inputs)):
            funcs = {impl: make(case, impl) for impl in IMPLS}
            for f in funcs.values():
                jax.block_until_ready(f(*a))  # compile (again, after clear_caches) and warm up
            times[mode] = _timing.interleaved({impl: (f, a) for impl, f in funcs.items()},
                                              repeats=args.repeats,
                                              min_seconds=args.min_sample_ms / 1e3)
    except Exception as e:  # noqa: BLE001 - a case that fails is reported, the run goes on
        return _error(e)
    return _summary(times, first)


def _error(e):
    first_line = (str(e).splitlines() or [""])[0]
    return {"error": f"{type(e).__name__}: {first_line[:300]}"}


def _summary(times, first):
    r = {"first_call_s": first}
    for mode, t in times.items():
        r[mode] = {"lax_ms": 1e3 * _timing.median(t["lax"]),
                   "manual_ms": 1e3 * _timing.median(t["manual"]),
                   "ratio": _timing.median(_timing.ratios(t, "manual", "lax")),
                   "rounds_ms": {impl: [1e3 * v for v in t[impl]] for impl in IMPLS}}
    return r


def measure_network(whole, args):
    """Forward+backward of a whole network, both impls, like :func:`measure_case`."""
    try:
        first, funcs = {}, {}
        for impl in IMPLS:
            first[impl], funcs[impl] = _timing.first_call(lambda impl=impl: whole.make(impl),
                                                          whole.args)
        for f in funcs.values():
            jax.block_until_ready(f(*whole.args))
        times = _timing.interleaved({impl: (f, whole.args) for impl, f in funcs.items()},
                                    repeats=args.repeats, min_seconds=args.min_sample_ms / 1e3)
    except Exception as e:  # noqa: BLE001
        return _error(e)
    return _summary({"fwd+bwd": times}, first)


# --------------------------------------------------------------------------------------------
# The report.


def case_row(name, r):
    if "error" in r:
        return f"| {name} | ERROR: {r['error']} | | | | | |"
    f, fb, first = r["fwd"], r["fwd+bwd"], r["first_call_s"]
    return (f"| {name} | {f['lax_ms']:.3f} | {f['ratio']:.2f}x | {fb['lax_ms']:.3f} | "
            f"{fb['ratio']:.2f}x | {first['lax']:.2f} | {first['manual']:.2f} |")


CASE_HEADER = ("| case | lax ms fwd | manual/lax fwd | lax ms fwd+bwd | manual/lax fwd+bwd | "
               "first call lax s | first call manual s |\n|---|---:|---:|---:|---:|---:|---:|")


def network_row(name, r):
    if "error" in r:
        return f"| {name} | ERROR: {r['error']} | | | | |"
    fb, first = r["fwd+bwd"], r["first_call_s"]
    return (f"| {name} | {fb['lax_ms']:.2f} | {fb['manual_ms']:.2f} | {fb['ratio']:.2f}x | "
            f"{first['lax']:.2f} | {first['manual']:.2f} |")


NETWORK_HEADER = ("| network, fwd+bwd (grad of the loss w.r.t. all params) | lax ms | manual ms "
                  "| manual/lax | first call lax s | first call manual s |\n"
                  "|---|---:|---:|---:|---:|---:|")


def floors(results, networks) -> list[dict]:
    """The floors of issue 9 §2 on this run: ``[{"floor", "ok", "value", "offenders"}]``.

    A case or network that failed to run fails every floor it takes part in; a floor with
    nothing to check in this run (say, no network selected) has ``ok`` None."""
    out = _case_floors(results) if results else [
        _floor(f"the per-op floors ({len(results)} cases run)", [], ok=None)]
    bad = [f"{n} (error)" if "error" in r else f"{n} ({r['fwd+bwd']['ratio']:.2f}x)"
           for n, r in networks.items()
           if "error" in r or not r["fwd+bwd"]["ratio"] <= MAX_NETWORK]
    out.append(_floor(f"whole networks: manual/lax fwd+bwd <= {MAX_NETWORK}", bad,
                      ok=None if not networks else not bad))
    return out


def _case_floors(results) -> list[dict]:
    ok = {n: r for n, r in results.items() if "error" not in r}
    broken = [f"{n} (error)" for n, r in results.items() if "error" in r]
    out = []
    for mode in ("fwd", "fwd+bwd"):
        bad = [f"{n} ({r[mode]['ratio']:.2f}x)" for n, r in ok.items()
               if not r[mode]["ratio"] <= MAX_RATIO]
        out.append(_floor(f"every case: manual/lax {mode} <= {MAX_RATIO}", bad + broken))
    for mode in ("fwd", "fwd+bwd"):
        med = _timing.median([r[mode]["ratio"] for r in ok.values()])
        out.append(_floor(f"median over the grid of manual/lax {mode} <= {MAX_MEDIAN}",
                          broken + ([] if med <= MAX_MEDIAN else [f"median {med:.2f}x"]),
                          value=med))
    bad = []
    for n, r in ok.items():
        lax_s, man_s = r["first_call_s"]["lax"], r["first_call_s"]["manual"]
        if not (man_s <= FIRST_CALL_RATIO * lax_s or man_s <= lax_s + FIRST_CALL_EXTRA):
            bad.append(f"{n} ({man_s:.2f} s vs {lax_s:.2f} s)")
    out.append(_floor(f"every case: first call manual <= {FIRST_CALL_RATIO}x lax's or <= "
                      f"lax's + {FIRST_CALL_EXTRA} s", bad + broken))
    return out


def _floor(text, offenders, value=None, ok=True):
    return {"floor": text, "ok": ok and not offenders, "value": value, "offenders": offenders}


def print_floors(report, args, n_cases, n_nets):
    subset = args.quick or args.filter is not None or args.smoke_sample
    print(f"\n## Floors (issue 9 §2), on the {n_cases} cases and {n_nets} networks of this run"
          + (" (a subset: the floors are defined on the whole grid)" if subset else "")
          + (" (smoke: tiny shapes, the numbers mean nothing)" if args.smoke else ""))
    print()
    for f in report:
        value = "" if f["value"] is None else f" ({f['value']:.2f}x)"
        verdict = "NOT RUN" if f["ok"] is None else "PASS" if f["ok"] else "FAIL"
        print(f"- {verdict} {f['floor']}{value}")
        for o in f["offenders"]:
            print(f"    - {o}")


# --------------------------------------------------------------------------------------------


def main(argv=None):
    started = time.perf_counter()
    args = parse(argv)
    if args.reuse_host_memory:  # before the first computation
        _timing.reuse_host_memory()
    _timing.no_persistent_cache()
    cases = selected(_grid.cases(smoke=args.smoke), args, section=lambda c: c.section)
    if args.list:
        for c in cases:
            print(f"{c.section:<15} {c.macs / 1e6:>9.1f} M MACs  {c.name}")
        print(f"{len(cases)} cases; not in this jaxcnn (skipped): "
              f"{', '.join(_grid.missing_ops()) or 'none'}")
        return 0
    machine = _timing.machine()
    print(f"# benchmarks/ops.py: manual vs lax\n\n{_timing.machine_line(machine)}; float32; "
          f"median of {args.repeats} interleaved rounds; "
          + ("; ".join(f"{k}={v}" for k, v in (("quick", args.quick), ("filter", args.filter),
                                                 ("smoke", args.smoke)) if v)
             or "the whole grid"))
    if _grid.missing_ops():
        print(f"\nNot in this jaxcnn yet, so not measured: {', '.join(_grid.missing_ops())}.")
    results, records = {}, []
    for i, case in enumerate(cases):
        if i == 0 or cases[i - 1].section != case.section:
            print(f"\n## {SECTIONS[case.section]}\n\n{CASE_HEADER}", flush=True)
        results[case.name] = r = measure_case(case, args, seed=i)
        records.append({"section": case.section, "name": case.name,
                        "shapes": case.shapes, "macs": case.macs, **r})
        print(case_row(case.name, r), flush=True)
    networks = run_networks(args)
    report = floors(results, networks)
    print_floors(report, args, len(results), len(networks))
    print(f"\nran in {time.perf_counter() - started:.0f} s")
    if args.json:
        doc = {"machine": machine, "args": vars(args), "cases": records,
               "networks": networks, "floors": report}
        atomic_write(args.json, lambda f: f.write(json.dumps(doc, indent=1).encode()))
        print(f"\nwrote {args.json}")
    return 0


def run_networks(args) -> dict:
    wholes = selected(_nets.whole_networks(2 if args.smoke else 128), args,
                      name=lambda w: w.name, quick=lambda w: w.name == "LeNet-5")
    networks = {}
    if wholes:
        print(f"\n## whole networks, batch {2 if args.smoke else 128}\n\n{NETWORK_HEADER}")
    for whole in wholes:
        networks[whole.name] = r = measure_network(whole, args)
        print(network_row(whole.name, r), flush=True)
    return networks


if __name__ == "__main__":
    sys.exit(main())
