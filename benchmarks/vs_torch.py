"""The training step of jaxcnn (manual and lax) against PyTorch eager, and where jaxcnn's
manual step spends its time.

A benchmark only: PyTorch is not a dependency of jaxcnn. Whoever runs this installs a CPU build
of it beside jaxcnn, best in a separate virtual environment, for instance::

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install torch==2.13.0      # a CPU build
    /tmp/venv-torch/bin/pip install -e .                # jaxcnn, from the repository root
    /tmp/venv-torch/bin/python benchmarks/vs_torch.py [--smoke]

What it measures (issue 9 §3), for LeNet-5, the CIFAR stack and small_cnn
(``benchmarks/_nets.py``; the PyTorch models are built from the same layer specs, and their
parameter counts are checked equal): one training step (Adam, lr 1e-3, float32, mean
cross-entropy, batch 128, one fixed random batch) of

- jaxcnn ``impl="manual"`` and ``impl="lax"``: the jitted ``jaxcnn.training.train_step``
  (called in :func:`jaxcnn_step` only, to adapt in one place);
- PyTorch eager with ``channels_last`` and with NCHW (``torch.contiguous_format``),
  ``torch.set_num_threads(--threads)``, default the number of cores;

in alternating rounds in this one process (``--rounds`` rounds of ``--steps`` steps each, the
order rotating; each round ends with ``jax.block_until_ready``, PyTorch on the CPU being
synchronous), medians of the per-round times. It prints ms/step, images/s, and the ratios
jaxcnn manual / PyTorch channels_last and manual / lax (median of the per-round ratios).

Then a profile of the jaxcnn manual step, per network: every layer's forward and backward
(each jitted at the very shapes it sees inside the network; the backward is the layer's VJP
applied to a cotangent, with the forward's residuals as inputs; the first layer's backward
computes only the parameters' gradient, as in the step), timed interleaved with the step
itself, their sum, and the rest of the step (loss, optimizer, copies, barriers). Last, the
floors of issue 9 §3: LeNet-5 <= 1.6x PyTorch channels_last, the CIFAR stack <= 1.8x.

``--smoke`` runs the comparison of every network and the profile of the first one on a batch of
4, with 1 round of 2 steps: a check that the script runs, not a measurement.

A benchmark, not a test. Both frameworks use every core, so run it on a quiet machine: on a
loaded one PyTorch's OpenMP threads (``--threads`` equal to the cores) slow down far more than
XLA's (seen on a shared 2-core VM: PyTorch's LeNet-5 step 10-100x slower than on the quiet
machine, even in a process of its own), and the ratios then measure the load. The profile's
per-layer calls each pay a dispatch that the step does not, so on small layers their sum
overstates the layers' share a little.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _nets  # noqa: E402
import _timing  # noqa: E402

from jaxcnn import nn, training  # noqa: E402
from jaxcnn._io import atomic_write  # noqa: E402

CONTESTANTS = ("jaxcnn manual", "jaxcnn lax", "torch channels_last", "torch NCHW")
FLOORS = {"LeNet-5": 1.6, "CIFAR stack": 1.8}  # issue 9 §3: manual / torch channels_last
LR = 1e-3


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds (median)")
    p.add_argument("--steps", type=int, default=10, help="training steps per round")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads (default: the number of cores)")
    p.add_argument("--filter", metavar="SUBSTRING", help="only the networks whose name has it")
    p.add_argument("--no-profile", action="store_true", help="skip the per-layer profile")
    p.add_argument("--min-sample-ms", type=float, default=20.0,
                   help="profile: calls per sample so that one sample lasts at least this long")
    p.add_argument("--json", metavar="FILE", help="write every number to FILE as well")
    p.add_argument("--smoke", action="store_true",
                   help="batch 4, 1 round of 2 steps: checks that the script runs")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default allocator (by default the process calls "
                        "jaxcnn.reuse_host_memory first, as train.py does; see the README)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.rounds, args.steps, args.min_sample_ms = 4, 1, 2, 0.0
    return args


def import_torch():
    try:
        import torch
    except ImportError:
        sys.exit("vs_torch.py: PyTorch is not installed. It is not a dependency of jaxcnn: "
                 "install a CPU build for this benchmark, e.g. `pip install torch==2.13.0` in "
                 "a separate virtual environment that also has jaxcnn (`pip install -e .`); "
                 "see the docstring of benchmarks/vs_torch.py")
    return torch


# --------------------------------------------------------------------------------------------
# The contestants: each a function run(steps) that does `steps` training steps and waits.


def jaxcnn_step(params, opt_state, batch, *, apply, optimizer, impl):
    """The project's jitted training step; the one place to adapt if its signature changes."""
    return training.train_step(params, opt_state, batch, apply=apply, optimizer=optimizer,
                               impl=impl)


def jaxcnn_runner(apply, params, batch, impl):
    optimizer = training.make_optimizer("adam", LR)
    state = [params, optimizer.init(params)]

    def run(steps):
        p, o = state
        for _ in range(steps):
            p, o, loss = jaxcnn_step(p, o, batch, apply=apply, optimizer=optimizer, impl=impl)
        jax.block_until_ready((p, o, loss))
        state[:] = [p, o]

    return run


def torch_model(torch, net: _nets.Net):
    """The network's layer specs as a ``torch.nn.Sequential`` (NCHW semantics)."""
    h, w, c = net.input_shape
    layers, features = [], None
    for kind, *a in net.spec:
        if kind == "conv":
            c_out, k, padding = a
            if padding == "SAME" and k % 2 == 0:
                raise ValueError(f"vs_torch.py: SAME needs an odd kernel in PyTorch; got {k}")
            layers.append(torch.nn.Conv2d(c, c_out, k, padding=k // 2 if padding == "SAME"
                                          else 0))
            c, h, w = c_out, *((h, w) if padding == "SAME" else (h - k + 1, w - k + 1))
        elif kind == "max_pool":
            layers.append(torch.nn.MaxPool2d(a[0]))
            h, w = h // a[0], w // a[0]
        elif kind == "relu":
            layers.append(torch.nn.ReLU())
        elif kind == "flatten":
            layers.append(torch.nn.Flatten())
            features = c * h * w
        elif kind == "dense":
            layers.append(torch.nn.Linear(features, a[0]))
            features = a[0]
        else:
            raise ValueError(f"vs_torch.py: no PyTorch layer for the spec {kind!r}")
    return torch.nn.Sequential(*layers)


def torch_runner(torch, net, x, y, memory_format):
    model = torch_model(torch, net).to(memory_format=memory_format)
    x = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    x = x.contiguous(memory_format=memory_format)
    y = torch.from_numpy(np.asarray(y).astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def run(steps):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()

    return run, sum(p.numel() for p in model.parameters())


def contestants(torch, net, batch_size):
    """``{name: run}`` for one network, after checking both frameworks' parameter counts."""
    pair = _nets.model(net)
    params = _nets.init(pair, net)
    x, y = _nets.batch(net, batch_size)
    runs = {"jaxcnn manual": jaxcnn_runner(pair.apply, params, (x, y), "manual"),
            "jaxcnn lax": jaxcnn_runner(pair.apply, params, (x, y), "lax")}
    for name, fmt in (("torch channels_last", torch.channels_last),
                      ("torch NCHW", torch.contiguous_format)):
        runs[name], count = torch_runner(torch, net, x, y, fmt)
        if count != nn.count_params(params):
            raise RuntimeError(f"vs_torch.py: {net.name} has {nn.count_params(params)} params "
                               f"in jaxcnn but {count} in PyTorch; the models differ")
    return runs


# --------------------------------------------------------------------------------------------
# The comparison.


def compare(torch, net, args) -> dict:
    """First steps, then ``args.rounds`` alternating rounds; times in seconds per step."""
    runs = contestants(torch, net, args.batch)
    first = {}
    for name, run in runs.items():
        started = time.perf_counter()
        run(1)  # jaxcnn: trace, compile and run; PyTorch: its first (slower) step
        first[name] = time.perf_counter() - started
    times = _timing.interleaved({name: (lambda run=run: run(args.steps), ())
                                 for name, run in runs.items()},
                                repeats=args.rounds, min_seconds=0.0)
    times = {name: [t / args.steps for t in ts] for name, ts in times.items()}
    return {"first_step_s": first, "step_ms": {n: 1e3 * _timing.median(t) for n, t in
                                               times.items()},
            "rounds_ms": {n: [1e3 * v for v in t] for n, t in times.items()},
            "manual_vs_torch_cl": _timing.median(
                _timing.ratios(times, "jaxcnn manual", "torch channels_last")),
            "manual_vs_lax": _timing.median(_timing.ratios(times, "jaxcnn manual",
                                                           "jaxcnn lax"))}


def print_comparison(net, r, batch):
    print(f"\n## {net.name}: training step, batch {batch}\n")
    print("| implementation | ms/step | images/s | step time vs torch channels_last | "
          "rounds min-max ms | first step s |\n|---|---:|---:|---:|---:|---:|")
    base = r["step_ms"]["torch channels_last"]
    for name in CONTESTANTS:
        ms, rounds = r["step_ms"][name], r["rounds_ms"][name]
        print(f"| {name} | {ms:.2f} | {1e3 * batch / ms:.0f} | {ms / base:.2f}x | "
              f"{min(rounds):.2f}-{max(rounds):.2f} | {r['first_step_s'][name]:.2f} |")
    print(f"\njaxcnn manual / torch channels_last: {r['manual_vs_torch_cl']:.2f}x; "
          f"jaxcnn manual / jaxcnn lax: {r['manual_vs_lax']:.2f}x (medians of per-round "
          f"ratios)", flush=True)


# --------------------------------------------------------------------------------------------
# The profile of the manual step.


def layer_calls(net, params, x):
    """``[(label, forward (f, args), backward (f, args))]`` for every layer of the network at
    the shapes it sees inside it, ``impl="manual"``."""
    out, h = [], x
    for i, (spec, p) in enumerate(zip(net.spec, params)):
        apply = _nets.layer(spec).apply
        fwd = jax.jit(lambda p, h, apply=apply: apply(p, h, impl="manual"))
        if i == 0:  # the step never needs the gradient of the images
            y, vjp = jax.vjp(lambda p, h=h, apply=apply: apply(p, h, impl="manual"), p)
        else:
            y, vjp = jax.vjp(lambda p, h, apply=apply: apply(p, h, impl="manual"), p, h)
        cot = jnp.asarray(np.random.default_rng(i).normal(size=y.shape), y.dtype)
        bwd = jax.jit(lambda vjp, cot: vjp(cot))
        out.append((_nets.label(spec, h.shape), (fwd, (p, h)), (bwd, (vjp, cot))))
        h = y
    return out, h


def profile(net, args) -> dict:
    pair = _nets.model(net)
    params = _nets.init(pair, net)
    x, y = _nets.batch(net, args.batch)
    layers, logits = layer_calls(net, params, x)
    whole = pair.apply(params, x, impl="manual")
    if not np.allclose(np.asarray(logits), np.asarray(whole), rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"vs_torch.py: the layers of {net.name} do not compute its model")
    step = jaxcnn_runner(pair.apply, params, (x, y), "manual")
    calls = {"step": (lambda: step(1), ())}
    for i, (_, fwd, bwd) in enumerate(layers):
        calls[(i, "fwd")], calls[(i, "bwd")] = fwd, bwd
    for f, a in calls.values():
        jax.block_until_ready(f(*a))  # compile and warm up
    times = _timing.interleaved(calls, repeats=args.rounds, min_seconds=args.min_sample_ms /
                                1e3, same_inner=False)
    ms = {k: 1e3 * _timing.median(v) for k, v in times.items()}
    rows = [{"layer": label, "fwd_ms": ms[(i, "fwd")], "bwd_ms": ms[(i, "bwd")]}
            for i, (label, _, _) in enumerate(layers)]
    return {"step_ms": ms["step"], "layers": rows}


def print_profile(net, r, batch):
    step = r["step_ms"]
    total = sum(row["fwd_ms"] + row["bwd_ms"] for row in r["layers"])
    print(f"\n## {net.name}: where the jaxcnn manual step spends its time, batch {batch}\n")
    print("| layer (input shape) | fwd ms | bwd ms | fwd+bwd ms | share of the step |\n"
          "|---|---:|---:|---:|---:|")
    for row in r["layers"]:
        both = row["fwd_ms"] + row["bwd_ms"]
        print(f"| {row['layer']} | {row['fwd_ms']:.3f} | {row['bwd_ms']:.3f} | {both:.3f} | "
              f"{100 * both / step:.1f}% |")
    print(f"| sum of the layers | | | {total:.3f} | {100 * total / step:.1f}% |")
    print(f"| outside the layers (loss, optimizer, copies, barriers) | | | {step - total:.3f} "
          f"| {100 * (step - total) / step:.1f}% |")
    print(f"| the training step | | | {step:.3f} | 100% |", flush=True)


# --------------------------------------------------------------------------------------------


def print_floors(results, args):
    print("\n## Floors (issue 9 §3): jaxcnn manual / PyTorch channels_last step time"
          + (" (smoke: the numbers mean nothing)" if args.smoke else "") + "\n")
    for name, limit in FLOORS.items():
        if name not in results:
            print(f"- not run: {name} (<= {limit}x)")
            continue
        ratio = results[name]["manual_vs_torch_cl"]
        print(f"- {'PASS' if ratio <= limit else 'FAIL'} {name}: {ratio:.2f}x <= {limit}x")


def main(argv=None):
    started = time.perf_counter()
    args = parse(argv)
    if not args.default_malloc:  # the whole process, torch too; before the first computation
        _timing.reuse_host_memory()
    torch = import_torch()
    torch.set_num_threads(args.threads)
    machine = {**_timing.machine(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads()}
    print(f"# benchmarks/vs_torch.py: training step, jaxcnn vs PyTorch\n\n"
          f"{_timing.machine_line(machine)}; torch {machine['torch']} with "
          f"{machine['torch_threads']} threads; Adam lr {LR}, float32, batch {args.batch}; "
          f"median of {args.rounds} alternating rounds of {args.steps} steps"
          + ("; smoke" if args.smoke else ""))
    if jax.default_backend() != "cpu":
        print(f"\nNote: JAX runs on {jax.default_backend()} and PyTorch on the CPU, so the "
              f"comparison is not like for like; JAX_PLATFORMS=cpu makes it so.")
    nets = [n for n in _nets.NETS if args.filter is None or args.filter in n.name]
    results, profiles = {}, {}
    for net in nets:
        results[net.name] = compare(torch, net, args)
        print_comparison(net, results[net.name], args.batch)
    for net in ([] if args.no_profile else nets[:1] if args.smoke else nets):
        profiles[net.name] = profile(net, args)
        print_profile(net, profiles[net.name], args.batch)
    print_floors(results, args)
    print(f"\nran in {time.perf_counter() - started:.0f} s")
    if args.json:
        doc = {"machine": machine, "args": vars(args), "steps": results, "profiles": profiles}
        atomic_write(args.json, lambda f: f.write(json.dumps(doc, indent=1).encode()))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
