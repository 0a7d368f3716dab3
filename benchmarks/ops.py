"""Speed of ``impl="manual"`` relative to ``impl="lax"``, per layer and per whole network.

Run: ``python benchmarks/ops.py [--repeats 7] [--batch 128]``. Everything is jitted; each
timing is the median of ``--repeats`` runs after a warm-up run. The printed ratio is
``time(manual) / time(lax)`` measured in this one run (< 1 means the manual path is faster).
Prints a markdown table (copied into the README).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxcnn as jc


def _median_time(f, args, repeats):
    jax.block_until_ready(f(*args))                           # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _layer_cases(batch, rng):
    """(network, layer name, op(x, *params, impl), x, params) for every layer of both nets."""
    def arr(*shape, scale=0.1):
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    cases = []
    # LeNet-5 on 28x28x1.
    cases += [
        ("LeNet-5", "conv 5x5 1->6 SAME", lambda x, k, b, impl: jc.conv(x, k, b, padding="SAME", impl=impl),
         arr(batch, 28, 28, 1, scale=1), (arr(5, 5, 1, 6), arr(6))),
        ("LeNet-5", "relu 28x28x6", lambda x, impl: jc.relu(x, impl=impl), arr(batch, 28, 28, 6, scale=1), ()),
        ("LeNet-5", "max_pool 2x2 /2 28x28x6", lambda x, impl: jc.max_pool(x, 2, impl=impl),
         arr(batch, 28, 28, 6, scale=1), ()),
        ("LeNet-5", "conv 5x5 6->16 VALID", lambda x, k, b, impl: jc.conv(x, k, b, impl=impl),
         arr(batch, 14, 14, 6, scale=1), (arr(5, 5, 6, 16), arr(16))),
        ("LeNet-5", "max_pool 2x2 /2 10x10x16", lambda x, impl: jc.max_pool(x, 2, impl=impl),
         arr(batch, 10, 10, 16, scale=1), ()),
        ("LeNet-5", "dense 400->120", lambda x, w, b, impl: jc.dense(x, w, b, impl=impl),
         arr(batch, 400, scale=1), (arr(400, 120), arr(120))),
        ("LeNet-5", "dense 120->84", lambda x, w, b, impl: jc.dense(x, w, b, impl=impl),
         arr(batch, 120, scale=1), (arr(120, 84), arr(84))),
        ("LeNet-5", "dense 84->10 + cross_entropy",
         lambda x, w, b, impl: jc.cross_entropy(jc.dense(x, w, b, impl=impl), jnp.arange(batch) % 10, impl=impl),
         arr(batch, 84, scale=1), (arr(84, 10), arr(10))),
    ]
    # CIFAR-size stack on 32x32x3.
    for n, (h, cin, cout) in enumerate([(32, 3, 32), (16, 32, 64), (8, 64, 128)]):
        cases.append(("CIFAR stack", f"conv 3x3 {cin}->{cout} SAME {h}x{h}",
                      lambda x, k, b, impl: jc.conv(x, k, b, padding="SAME", impl=impl),
                      arr(batch, h, h, cin, scale=1), (arr(3, 3, cin, cout), arr(cout))))
        cases.append(("CIFAR stack", f"max_pool 2x2 /2 {h}x{h}x{cout}",
                      lambda x, impl: jc.max_pool(x, 2, impl=impl), arr(batch, h, h, cout, scale=1), ()))
    cases.append(("CIFAR stack", "dense 2048->10 + cross_entropy",
                  lambda x, w, b, impl: jc.cross_entropy(jc.dense(x, w, b, impl=impl), jnp.arange(batch) % 10, impl=impl),
                  arr(batch, 2048, scale=1), (arr(2048, 10), arr(10))))
    return cases


def _forward(op, impl):
    return jax.jit(lambda x, *p: op(x, *p, impl=impl))


def _forward_backward(op, impl):
    def loss(x, *p):
        y = op(x, *p, impl=impl)
        return jnp.sum(y * jnp.cos(y)) if y.ndim else y   # a non-trivial cotangent
    return jax.jit(lambda x, *p: jax.grad(loss, argnums=tuple(range(1 + len(p))))(x, *p))


# --- whole networks -------------------------------------------------------------------------


def _lenet(params, x, labels, impl):
    h = jc.relu(jc.conv(x, *params["c1"], padding="SAME", impl=impl), impl=impl)
    h = jc.max_pool(h, 2, impl=impl)
    h = jc.relu(jc.conv(h, *params["c2"], impl=impl), impl=impl)
    h = jc.flatten(jc.max_pool(h, 2, impl=impl), impl=impl)
    h = jc.relu(jc.dense(h, *params["d1"], impl=impl), impl=impl)
    h = jc.relu(jc.dense(h, *params["d2"], impl=impl), impl=impl)
    return jc.cross_entropy(jc.dense(h, *params["d3"], impl=impl), labels, impl=impl)


def _cifar(params, x, labels, impl):
    h = x
    for name in ("c1", "c2", "c3"):
        h = jc.relu(jc.conv(h, *params[name], padding="SAME", impl=impl), impl=impl)
        h = jc.max_pool(h, 2, impl=impl)
    return jc.cross_entropy(jc.dense(jc.flatten(h, impl=impl), *params["d"], impl=impl), labels, impl=impl)


def _net_cases(batch, rng):
    def arr(*shape, scale):
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    def layer(*shape):
        fan_in = int(np.prod(shape[:-1]))
        return (arr(*shape, scale=np.sqrt(2 / fan_in)), jnp.zeros(shape[-1], jnp.float32))

    labels = jnp.arange(batch) % 10
    lenet = {"c1": layer(5, 5, 1, 6), "c2": layer(5, 5, 6, 16), "d1": layer(400, 120),
             "d2": layer(120, 84), "d3": layer(84, 10)}
    cifar = {"c1": layer(3, 3, 3, 32), "c2": layer(3, 3, 32, 64), "c3": layer(3, 3, 64, 128),
             "d": layer(2048, 10)}
    return [("LeNet-5", _lenet, lenet, arr(batch, 28, 28, 1, scale=1), labels),
            ("CIFAR stack", _cifar, cifar, arr(batch, 32, 32, 3, scale=1), labels)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)

    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
          f"batch {args.batch}, float32, median of {args.repeats} runs after warm-up")
    print()
    print("| network | layer | fwd lax ms | fwd manual/lax | fwd+bwd lax ms | fwd+bwd manual/lax |")
    print("|---|---|---:|---:|---:|---:|")
    worst = 0.0
    for net, name, op, x, params in _layer_cases(args.batch, rng):
        row = []
        for make in (_forward, _forward_backward):
            t_lax = _median_time(make(op, "lax"), (x, *params), args.repeats)
            t_man = _median_time(make(op, "manual"), (x, *params), args.repeats)
            row += [t_lax * 1e3, t_man / t_lax]
            worst = max(worst, t_man / t_lax)
        print(f"| {net} | {name} | {row[0]:.2f} | {row[1]:.2f}x | {row[2]:.2f} | {row[3]:.2f}x |", flush=True)
    print()
    print("| network (whole fwd+bwd, grad of the loss w.r.t. all parameters) | lax ms | manual ms | manual/lax |")
    print("|---|---:|---:|---:|")
    for net, fn, params, x, labels in _net_cases(args.batch, rng):
        times = {}
        for impl in ("lax", "manual"):
            step = jax.jit(jax.grad(lambda p, x, y, impl=impl: fn(p, x, y, impl)))
            times[impl] = _median_time(step, (params, x, labels), args.repeats)
        print(f"| {net} | {times['lax'] * 1e3:.1f} | {times['manual'] * 1e3:.1f} | "
              f"{times['manual'] / times['lax']:.2f}x |", flush=True)
    print()
    print(f"worst per-op ratio: {worst:.2f}x")


if __name__ == "__main__":
    main()
