"""A child process for tests/test_parallel.py (not collected by pytest: its name has no test_).

JAX fixes its devices when it starts, so the multi-device runs happen in fresh processes with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set by the parent. Two modes:

    python tests/_parallel_child.py devices OUT_JSON RUN_DIR
        in one process with 4 forced CPU devices: train on 4 devices and on 1 device, record
        the step losses, the shardings the training step really received and returned, and
        run ``train.py`` with a batch that 4 does not divide; and one training step of a model
        with batch norm on 4 devices and on 1 (its running averages).
    python tests/_parallel_child.py process OUT_JSON RUN_DIR COORDINATOR NUM_PROCESSES ID
        one process of a multi-process run (2 forced CPU devices each), through train.py's own
        --coordinator / --num-processes / --process-id path.

Each writes one JSON file that the parent reads and asserts on.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import sys

import jax
import numpy as np

from conftest import ROOT, load_cli  # this script's folder, tests/, is on sys.path

# The run both modes train: 20 steps of batch 32 (5 epochs' worth would be slower; 1 epoch of
# 640 examples is exactly 20 steps), 50 test examples (not a multiple of 4: padded and masked).
N_TRAIN, N_TEST, BATCH, STEPS = 640, 50, 32, 20
ARGS = ["--n-train", str(N_TRAIN), "--n-test", str(N_TEST), "--batch-size", str(BATCH),
        "--epochs", "1"]


def sharding_of(a) -> dict:
    """What the tests assert about one array's placement."""
    return {
        "spec": str(a.sharding.spec),
        "mesh_size": int(a.sharding.mesh.devices.size),
        "replicated": bool(a.sharding.is_fully_replicated),
        "shard_shapes": sorted({tuple(s.data.shape) for s in a.addressable_shards}),
        "shard_rows": sorted((s.index[0].start or 0, s.index[0].stop or a.shape[0])
                             for s in a.addressable_shards) if a.ndim else [],
        "shape": list(a.shape),
    }


def spy_on_train_step(training, seen: list):
    """Wrap training.train_step (fit looks it up at call time) to record its first call;
    returns the real step, to put back."""
    real = training.train_step

    def spy(params, opt_state, batch, **kw):
        new_params, new_state, loss = real(params, opt_state, batch, **kw)
        if not seen:
            seen.append({
                "batch_x": sharding_of(batch[0]),
                "batch_y": sharding_of(batch[1]),
                "params_in": [sharding_of(p) for p in jax.tree_util.tree_leaves(params)],
                "params_out": [sharding_of(p) for p in jax.tree_util.tree_leaves(new_params)],
                "opt_state_out": [sharding_of(p) for p in
                                  jax.tree_util.tree_leaves(new_state)],
            })
        return new_params, new_state, loss

    training.train_step = spy
    return real


def stateful_step():
    """One train-mode step of conv -> batch norm -> dense, its batch split over the 4 devices,
    against the same step on one device: the new running averages, the params, and how far
    the statistics of one device's share of the batch are from the global ones."""
    from jaxcnn import data, nn, parallel, training

    init, apply = nn.serial(nn.Conv(4, 3, stride=2, use_bias=False), nn.BatchNorm(), nn.Relu,
                            nn.Flatten, nn.Dense(10))
    _, params, state = init(jax.random.key(0), (-1, 28, 28, 1), with_state=True)
    ds = data.load_dataset("synthetic", n_train=BATCH, n_test=1, seed=0)
    x = ds.train_x + np.arange(BATCH, dtype=np.float32)[:, None, None, None] / 8  # shards differ
    opt = training.make_optimizer("adam", 2e-3)
    step = dict(apply=apply, optimizer=opt, impl="manual")
    mesh = parallel.data_mesh(4)
    p, o, s = parallel.replicate((params, opt.init(params), state), mesh)
    batch = (parallel.shard(mesh, x, BATCH), parallel.shard(mesh, ds.train_y, BATCH))
    keys = training._step_keys(0, mesh)
    p4, _, loss4, s4 = training.train_step(p, o, batch, model_state=s,
                                           rng=jax.random.fold_in(keys, 0), **step)
    p1, _, loss1, s1 = training.train_step(params, opt.init(params), (x, ds.train_y),
                                           model_state=state, rng=training.step_key(0, 0), **step)
    share = (x[:BATCH // 4], ds.train_y[:BATCH // 4])               # device 0's rows alone
    shard0 = training.train_step(params, opt.init(params), share, model_state=state,
                                 rng=training.step_key(0, 0), **step)[3]

    def diff(a, b):
        return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
                   for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

    return {"state_diff": diff(s4, s1), "params_diff": diff(p4, p1),
            "loss_diff": abs(float(loss4) - float(loss1)), "shard_vs_global": diff(shard0, s1),
            "moved": diff(s1, state), "batch_x": sharding_of(batch[0]),
            "state_out": [sharding_of(a) for a in jax.tree_util.tree_leaves(s4)]}


def devices_mode(out_json, run_dir):
    from jaxcnn import training

    cli = load_cli()
    assert jax.device_count() == 4, jax.devices()
    seen = {}
    result = {"device_count": jax.device_count()}
    for n in (4, 1):
        record = []
        real = spy_on_train_step(training, record)
        config = cli.parse_args([*ARGS, "--devices", str(n), "--out", f"{run_dir}/devices{n}"])
        fit = training.fit(config)
        training.train_step = real
        seen[n] = {"losses": fit.losses.tolist(), "first_step": record[0],
                   "final_params": [sharding_of(p) for p in jax.tree_util.tree_leaves(fit.params)],
                   "test_loss": fit.history[-1]["test_loss"],
                   "test_accuracy": fit.history[-1]["test_accuracy"],
                   "summary_devices": fit.summary["devices"]}
    result["runs"] = seen
    # The 4-device checkpoint, evaluated on 4 devices and on 2 (params read back and replicated).
    result["eval_only"] = {}
    for n in (4, 2):
        config = cli.parse_args([*ARGS, "--devices", str(n), "--out", f"{run_dir}/devices4",
                                 "--eval-only"])
        result["eval_only"][n] = training.fit(config).summary
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([*ARGS, "--batch-size", "30", "--out", f"{run_dir}/bad"])
    result["bad_batch"] = {"code": code, "stderr": err.getvalue(),
                           "out_exists": pathlib.Path(f"{run_dir}/bad").exists()}
    result["stateful"] = stateful_step()
    pathlib.Path(out_json).write_text(json.dumps(result))


def process_mode(out_json, run_dir, coordinator, num_processes, process_id):
    from jaxcnn import parallel, training

    cli = load_cli()
    argv = [*ARGS, "--out", run_dir, "--coordinator", coordinator,
            "--num-processes", num_processes, "--process-id", process_id]
    config, distributed = cli.parse_command_line(argv)
    started = parallel.initialize(distributed.coordinator, distributed.num_processes,
                                  distributed.process_id)
    mesh = parallel.data_mesh()
    record = []
    spy_on_train_step(training, record)
    fit = training.fit(config)
    result = {
        "initialized": started,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "rows": [parallel.process_rows(mesh, BATCH).start, parallel.process_rows(mesh, BATCH).stop],
        "losses": fit.losses.tolist(),
        "first_step": record[0],
        "test_loss": fit.history[-1]["test_loss"],
        "test_accuracy": fit.history[-1]["test_accuracy"],
        "host_param_sum": float(sum(np.sum(a) for a in
                                    jax.tree_util.tree_leaves(parallel.host(fit.params)))),
    }
    pathlib.Path(out_json).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    mode, *rest = sys.argv[1:]
    {"devices": devices_mode, "process": process_mode}[mode](*rest)
