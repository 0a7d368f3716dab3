"""The ResNet's training step, manual vs lax, and a short training run with its running stats.

Uses only :mod:`jaxcnn.nn` (``init(..., with_state=True)``, :func:`jaxcnn.nn.apply_model` in
train and eval mode), not ``jaxcnn.training``:

1. step time of ``models.resnet()`` at batch 64 (Adam), ``impl="manual"`` and ``impl="lax"``
   timed in alternating rounds in one process (median ms per step of each), and the time of
   3 epochs of 60,000 images that follows from it;
2. a training run on a subset of the embedded digits (``--n-train``, default 4,000) with
   ``--impl`` (default manual), evaluated in eval mode (running averages) after each epoch.

    python benchmarks/resnet.py [--rounds 5] [--steps 10] [--n-train 4000] [--epochs 4]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcnn as jc
from jaxcnn import data, models, nn


def make_step(apply, optimizer):
    @partial(jax.jit, static_argnames=("impl",))
    def step(params, state, opt_state, x, y, key, *, impl):
        def loss(p):
            logits, new_state = nn.apply_model(apply, p, state, x, train=True, rng=key,
                                               impl=impl)
            return jc.cross_entropy(logits, y, impl=impl), new_state

        (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, value

    return step


def make_eval(apply):
    @partial(jax.jit, static_argnames=("impl",))
    def correct(params, state, x, y, *, impl):
        logits, _ = nn.apply_model(apply, params, state, x, train=False, impl=impl)
        return jnp.sum(jnp.argmax(logits, -1) == y)

    def accuracy(params, state, xs, ys, impl, batch=500):
        hits = sum(int(correct(params, state, xs[i:i + batch], ys[i:i + batch], impl=impl))
                   for i in range(0, len(xs), batch))
        return hits / len(xs)

    return accuracy


def time_steps(apply, params, state, ds, rounds, steps, batch):
    optimizer = optax.adam(1e-3)
    step = make_step(apply, optimizer)
    x = jnp.asarray(ds.train_x[:batch])
    y = jnp.asarray(ds.train_y[:batch])
    key = jax.random.key(0)
    carry = {}
    for impl in ("manual", "lax"):             # compile both first
        t = time.perf_counter()
        out = step(params, state, optimizer.init(params), x, y, key, impl=impl)
        jax.block_until_ready(out)
        print(f"compile + first step {impl}: {time.perf_counter() - t:.1f} s")
        carry[impl] = out[:3]
    wall = {"manual": [], "lax": []}
    cpu = {"manual": [], "lax": []}
    for _ in range(rounds):                    # alternating rounds: the same machine load
        for impl in ("manual", "lax"):
            p, s, o = carry[impl]
            t, c = time.perf_counter(), time.process_time()
            for _ in range(steps):
                p, s, o, loss = step(p, s, o, x, y, key, impl=impl)
            jax.block_until_ready(loss)
            wall[impl].append((time.perf_counter() - t) / steps)
            cpu[impl].append((time.process_time() - c) / steps)
            carry[impl] = (p, s, o)
    median = lambda times: {i: 1e3 * float(np.median(t)) for i, t in times.items()}  # noqa
    return median(wall), median(cpu)


def train(apply, params, state, ds, impl, epochs, batch, lr):
    steps_per_epoch = len(ds.train_x) // batch
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch))
    step, accuracy = make_step(apply, optimizer), make_eval(apply)
    opt_state = optimizer.init(params)
    key = jax.random.key(1)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for i, (x, y) in enumerate(data.batches(ds.train_x, ds.train_y, batch, epoch=epoch)):
            params, state, opt_state, loss = step(
                params, state, opt_state, x, y, jax.random.fold_in(key, i), impl=impl)
        acc = accuracy(params, state, ds.test_x, ds.test_y, impl)
        print(f"epoch {epoch + 1}/{epochs}  last loss {float(loss):.4f}  test acc (eval mode) "
              f"{100 * acc:.2f}%  {time.perf_counter() - t0:.0f} s")
    return acc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--impl", default="manual", choices=("manual", "lax"))
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    reused = jc.reuse_host_memory()  # as train.py does; before the first computation

    init, apply = models.resnet()
    _, params, state = init(jax.random.key(0), (-1, 28, 28, 1), with_state=True)
    print(f"resnet: {nn.count_params(params):,} params, {nn.count_params(state):,} state "
          f"values; jax {jax.__version__} on {jax.default_backend()}; host memory "
          f"{'reused' if reused else 'not reused'} between runs")
    ds = data.load_dataset("synthetic", n_train=args.n_train, n_test=args.n_test)
    if not args.skip_timing:
        ms, cpu = time_steps(apply, params, state, ds, args.rounds, args.steps, args.batch)
        for impl, t in ms.items():
            est = t * 3 * (60000 // args.batch) / 60e3
            print(f"{impl:6s}: {t:6.1f} ms/step wall, {cpu[impl]:6.1f} ms/step CPU (process "
                  f"time, all threads; median of {args.rounds} rounds of {args.steps}), batch "
                  f"{args.batch}: 3 epochs of 60k ≈ {est:.1f} min")
        print(f"manual/lax step time: {ms['manual'] / ms['lax']:.2f} wall, "
              f"{cpu['manual'] / cpu['lax']:.2f} CPU")
    train(apply, params, state, ds, args.impl, args.epochs, args.batch, args.lr)


if __name__ == "__main__":
    main()
