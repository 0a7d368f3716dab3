"""Images per second of the data-parallel training step on 1, 2 and 4 forced CPU devices.

    python benchmarks/devices.py [--devices 1 2 4] [--impl manual] [--batch-size 128]
                                 [--steps 10] [--runs 5] [--dtype float32]

The script re-runs itself in a child process with
``XLA_FLAGS=--xla_force_host_platform_device_count=<largest>``: JAX fixes its devices at start.
In that one process, for each device count ``n`` the jitted step of ``jaxcnn.training`` runs on
a mesh of the first ``n`` devices (params replicated, each batch split ``n`` ways), exactly as
``train.py --devices n`` does. The timed runs of the device counts are interleaved, so slow
phases of a shared machine hit all of them alike; the table gives the median images per second
and the ratio to 1 device, all measured in this one run.

On a CPU the forced devices share the same cores: the ratio measures what splitting the batch
and all-reducing the gradients costs, not a speed-up. On a machine with several GPUs or TPU
cores the same step runs on real devices (``--devices`` of ``train.py``). A benchmark, not a
test: the numbers depend on the machine and on its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CHILD_FLAG = "--child"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--impl", choices=("manual", "lax"), default="manual")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=10, help="steps per timed run")
    p.add_argument("--runs", type=int, default=5, help="timed runs per device count (median)")
    p.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for n in args.devices:
        if n < 1 or args.batch_size % n:
            p.error(f"--batch-size ({args.batch_size}) must be divisible by every --devices "
                    f"value; got {n}")
    return args


def main(argv=None):
    args = parse(argv)
    if not args.child:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                            f"{max(args.devices)}").strip()
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, os.path.abspath(__file__), *argv, CHILD_FLAG],
                               env=env)
    return measure(args)


def measure(args):
    import jax
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from jaxcnn import models, parallel, training

    rng = np.random.default_rng(0)
    x = rng.random((args.batch_size, 28, 28, 1), np.float32)
    y = rng.integers(0, 10, args.batch_size).astype(np.int32)
    init, apply = models.MODELS[args.model]()
    _, params0 = init(jax.random.key(0), (-1, 28, 28, 1))
    optimizer = training.make_optimizer("adam", 1e-3)
    step = dict(apply=apply, optimizer=optimizer, impl=args.impl, dtype=args.dtype)

    state, compile_seconds = {}, {}
    for n in args.devices:
        mesh = parallel.data_mesh(n)
        params, opt_state = parallel.replicate((params0, optimizer.init(params0)), mesh)
        batch = (parallel.shard(mesh, x, args.batch_size), parallel.shard(mesh, y, args.batch_size))
        started = time.perf_counter()
        params, opt_state, loss = training.train_step(params, opt_state, batch, **step)
        loss.block_until_ready()
        compile_seconds[n] = time.perf_counter() - started
        state[n] = (params, opt_state, batch)

    rates = {n: [] for n in args.devices}
    for _ in range(args.runs):
        for n in args.devices:  # interleaved: every device count sees the same machine load
            params, opt_state, batch = state[n]
            started = time.perf_counter()
            for _ in range(args.steps):
                params, opt_state, loss = training.train_step(params, opt_state, batch, **step)
            loss.block_until_ready()
            rates[n].append(args.steps * args.batch_size / (time.perf_counter() - started))
            state[n] = (params, opt_state, batch)

    print(f"{args.model}, impl {args.impl}, {args.dtype}, global batch {args.batch_size}, "
          f"Adam; median of {args.runs} runs of {args.steps} steps; jax {jax.__version__}, "
          f"{jax.device_count()} forced CPU devices on {os.cpu_count()} cores")
    print(f"{'devices':>7} {'per device':>10} {'img/s (median)':>15} {'min':>8} {'max':>8} "
          f"{'ms/step':>8} {'vs 1 device':>12} {'compile s':>10}")
    base = statistics.median(rates[min(args.devices)])
    for n in args.devices:
        median = statistics.median(rates[n])
        print(f"{n:>7} {args.batch_size // n:>10} {median:>15.0f} {min(rates[n]):>8.0f} "
              f"{max(rates[n]):>8.0f} {1000 * args.batch_size / median:>8.1f} "
              f"{median / base:>11.2f}x {compile_seconds[n]:>10.1f}", flush=True)
    print("The forced devices share the machine's cores: this is the overhead of splitting the "
          "batch and all-reducing the gradients, not a speed-up.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
