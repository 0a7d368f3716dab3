"""Images per second of the jitted training step, manual vs lax (LeNet-5, Adam).

    python benchmarks/train.py [--batch-size 128] [--steps 20] [--runs 5] [--model lenet5]

After one warm-up step (the compilation, timed separately), each impl runs ``--runs`` timed
runs of ``--steps`` steps on one fixed random batch; each run ends with
``block_until_ready``. The table gives the median images per second and the manual/lax
ratio. A benchmark, not a test: the numbers depend on the machine and on its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxcnn import models, reuse_host_memory, training  # noqa: E402

IMPLS = ("manual", "lax")


def time_step(apply, params, optimizer, batch, *, impl, steps, runs):
    """(compile seconds, [images per second of each timed run])."""
    opt_state = optimizer.init(params)
    started = time.perf_counter()
    params, opt_state, loss = training.train_step(params, opt_state, batch, apply=apply,
                                                  optimizer=optimizer, impl=impl)
    loss.block_until_ready()
    compile_seconds = time.perf_counter() - started
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(steps):
            params, opt_state, loss = training.train_step(params, opt_state, batch, apply=apply,
                                                          optimizer=optimizer, impl=impl)
        loss.block_until_ready()
        rates.append(steps * len(batch[0]) / (time.perf_counter() - started))
    return compile_seconds, rates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=tuple(models.MODELS), default="lenet5")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per timed run")
    p.add_argument("--runs", type=int, default=5, help="timed runs (the median is reported)")
    args = p.parse_args(argv)
    reused = reuse_host_memory()  # as train.py does; before the first computation

    rng = np.random.default_rng(0)
    batch = (rng.random((args.batch_size, 28, 28, 1), np.float32),
             rng.integers(0, 10, args.batch_size).astype(np.int32))
    init, apply = models.MODELS[args.model]()
    _, params = init(jax.random.key(0), (-1, 28, 28, 1))
    optimizer = training.make_optimizer("adam", 1e-3)

    print(f"{args.model}, batch {args.batch_size}, Adam; median of {args.runs} runs of "
          f"{args.steps} steps; jax {jax.__version__} on {jax.default_backend()} "
          f"({os.cpu_count()} cores); host memory {'reused' if reused else 'not reused'} "
          f"between runs")
    print(f"{'impl':<8} {'img/s (median)':>15} {'min':>8} {'max':>8} {'ms/step':>9} "
          f"{'compile s':>10}")
    medians = {}
    for impl in IMPLS:
        compile_s, rates = time_step(apply, params, optimizer, batch, impl=impl,
                                     steps=args.steps, runs=args.runs)
        medians[impl] = statistics.median(rates)
        print(f"{impl:<8} {medians[impl]:>15.0f} {min(rates):>8.0f} {max(rates):>8.0f} "
              f"{1000 * args.batch_size / medians[impl]:>9.1f} {compile_s:>10.1f}", flush=True)
    print(f"manual/lax throughput ratio: {medians['manual'] / medians['lax']:.2f}")


if __name__ == "__main__":
    main()
