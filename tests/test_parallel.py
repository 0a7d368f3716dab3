"""Tests for jaxcnn.parallel and data-parallel training: one device, four, two processes.

JAX fixes its devices when it starts, so the multi-device runs happen in child processes
(``tests/_parallel_child.py``), on CPU, with ``XLA_FLAGS=--xla_force_host_platform_device_count``:
one process with 4 devices, and a two-process run on 127.0.0.1 (JAX's distributed runtime, a
local coordinator, 2 devices each). The three children start together, once per session, and
the tests assert on what they report. The rest runs in this (single-device) process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxcnn import parallel, training

from conftest import ROOT, closed_port_url, free_port, start_early, started_early

CHILD = ROOT / "tests" / "_parallel_child.py"
STEPS, BATCH = 20, 32  # the children's run: tests/_parallel_child.py
CHILD_TIMEOUT = 600  # seconds; a hung distributed run fails the test instead of the session


def child_env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"  # the forced host devices are CPU devices
    env["JAXCNN_MIRRORS"] = closed_port_url()  # nothing may be downloaded
    env.pop(parallel.COORDINATOR_ENV, None)
    return env


def finish(proc, name, log):
    try:
        proc.wait(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{name} did not finish in {CHILD_TIMEOUT} s; its output:\n"
                    f"{log.read_text()}")
    out = log.read_text()
    if proc.returncode != 0:
        pytest.fail(f"{name} exited with {proc.returncode}; its output:\n{out}")
    return out


@start_early("children")
def start_children(tmp_path_factory):
    """Start the 4-device child and the two processes of the distributed run, all at once
    (at the session's first test: see conftest.start_early); each writes its output to
    ``NAME.txt``."""
    tmp = tmp_path_factory.mktemp("parallel")
    coordinator = f"127.0.0.1:{free_port()}"
    commands = {
        "devices": ([str(CHILD), "devices", str(tmp / "devices.json"), str(tmp / "runs")],
                    child_env(4)),
    }
    for pid in (0, 1):
        commands[f"process{pid}"] = (
            [str(CHILD), "process", str(tmp / f"process{pid}.json"), str(tmp / "distributed"),
             coordinator, "2", str(pid)], child_env(2))
    procs = {}
    for name, (args, env) in commands.items():
        with open(tmp / f"{name}.txt", "w") as log:
            procs[name] = subprocess.Popen([sys.executable, *args], stdout=log,
                                           stderr=subprocess.STDOUT, env=env, cwd=tmp)
    return (tmp, procs), list(procs.values())


@pytest.fixture(scope="session")
def children(tmp_path_factory):
    """The 4-device child and the two processes of the distributed run, finished."""
    tmp, procs = started_early("children", tmp_path_factory)
    outputs = {name: finish(proc, name, tmp / f"{name}.txt") for name, proc in procs.items()}
    results = {name: json.loads((tmp / f"{name}.json").read_text()) for name in procs}
    return {"results": results, "outputs": outputs, "dir": tmp}


def assert_replicated(placements, mesh_size, what):
    assert placements, what
    for p in placements:
        assert p["spec"] == "P()" and p["replicated"], (what, p)
        assert p["mesh_size"] == mesh_size, (what, p)


# --------------------------------------------------------------------------------------------
# Four devices in one process.


def test_four_devices_and_one_device_give_the_same_losses(children):
    runs = children["results"]["devices"]["runs"]
    four, one = np.array(runs["4"]["losses"]), np.array(runs["1"]["losses"])
    assert len(four) == len(one) == STEPS
    assert np.all(np.isfinite(four)) and np.ptp(four) > 0   # 20 real, different losses
    np.testing.assert_allclose(four, one, rtol=1e-5)
    assert runs["4"]["test_accuracy"] == runs["1"]["test_accuracy"]
    np.testing.assert_allclose(runs["4"]["test_loss"], runs["1"]["test_loss"], rtol=1e-5)
    assert len(runs["4"]["summary_devices"]) == 4 and len(runs["1"]["summary_devices"]) == 1


def test_batches_are_split_over_the_devices(children):
    step = children["results"]["devices"]["runs"]["4"]["first_step"]
    for name, shape in (("batch_x", [BATCH, 28, 28, 1]), ("batch_y", [BATCH])):
        placed = step[name]
        assert placed["spec"] == "P('data',)" and placed["mesh_size"] == 4, placed
        assert not placed["replicated"] and placed["shape"] == shape, placed
        assert placed["shard_shapes"] == [[BATCH // 4, *shape[1:]]], placed
        assert placed["shard_rows"] == [[0, 8], [8, 16], [16, 24], [24, 32]], placed


def test_params_and_optimizer_state_stay_replicated(children):
    runs = children["results"]["devices"]["runs"]
    for n in ("4", "1"):
        step = runs[n]["first_step"]
        assert_replicated(step["params_in"], int(n), f"params into the step, {n} devices")
        assert_replicated(step["params_out"], int(n), f"params out of the step, {n} devices")
        assert_replicated(step["opt_state_out"], int(n), f"optimizer state, {n} devices")
        assert_replicated(runs[n]["final_params"], int(n), f"params after fit, {n} devices")


def test_batch_norm_in_a_sharded_step_uses_the_global_batch_statistics(children):
    """One train-mode step (jaxcnn.training.train_step with model_state) of a model with batch
    norm, its batch split 8 rows per device: the running averages come back replicated and
    equal to those of one device, whereas one device's share alone would move them far off."""
    r = children["results"]["devices"]["stateful"]
    assert r["batch_x"]["shard_shapes"] == [[BATCH // 4, 28, 28, 1]], r["batch_x"]
    assert r["moved"] > 1e-2 and r["shard_vs_global"] > 1e-2, r     # the check can fail
    assert r["state_diff"] < 1e-5 and r["params_diff"] < 1e-5 and r["loss_diff"] < 1e-5, r
    assert_replicated(r["state_out"], 4, "model state after the step")


def test_eval_only_on_any_number_of_devices_reports_the_training_runs_accuracy(children):
    result = children["results"]["devices"]
    trained = result["runs"]["4"]
    for n in ("4", "2"):
        summary = result["eval_only"][n]
        assert summary["test_accuracy"] == trained["test_accuracy"], n
        np.testing.assert_allclose(summary["test_loss"], trained["test_loss"], rtol=1e-5)


def test_a_batch_that_the_devices_do_not_divide_is_refused(children):
    bad = children["results"]["devices"]["bad_batch"]
    assert bad["code"] == 1
    assert ("fit: batch_size (30) must be divisible by the number of devices (4: 4 cpu "
            "devices), since every device takes an equal share of each batch; use batch_size "
            "28 or 32, or another number of devices") in bad["stderr"], bad["stderr"]
    assert "Traceback" not in bad["stderr"]
    assert not bad["out_exists"]  # refused before anything was written


# --------------------------------------------------------------------------------------------
# Two processes, two devices each.


def test_two_processes_give_the_same_losses_as_one(children):
    results = children["results"]
    four = np.array(results["devices"]["runs"]["4"]["losses"])
    one = np.array(results["devices"]["runs"]["1"]["losses"])
    for pid in (0, 1):
        r = results[f"process{pid}"]
        assert r["initialized"] and r["process_count"] == 2 and r["process_index"] == pid, r
        assert r["device_count"] == 4 and r["local_device_count"] == 2, r
        assert len(r["losses"]) == STEPS
        np.testing.assert_allclose(r["losses"], four, rtol=1e-5, err_msg=f"process {pid}")
        np.testing.assert_allclose(r["losses"], one, rtol=1e-5, err_msg=f"process {pid}")
        np.testing.assert_allclose(r["test_loss"], results["devices"]["runs"]["4"]["test_loss"],
                                   rtol=1e-5)
    # Both processes hold the same replicated params.
    assert results["process0"]["host_param_sum"] == results["process1"]["host_param_sum"]


def test_each_process_feeds_only_its_own_rows(children):
    results = children["results"]
    assert results["process0"]["rows"] == [0, BATCH // 2]
    assert results["process1"]["rows"] == [BATCH // 2, BATCH]
    for pid, rows in ((0, [[0, 8], [8, 16]]), (1, [[16, 24], [24, 32]])):
        step = results[f"process{pid}"]["first_step"]
        assert step["batch_x"]["shard_rows"] == rows, step["batch_x"]
        assert step["batch_x"]["mesh_size"] == 4 and step["batch_x"]["shape"][0] == BATCH
        assert_replicated(step["params_out"], 4, f"params out of the step, process {pid}")


def test_only_process_zero_prints_and_writes(children):
    out = children["dir"] / "distributed"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1  # written once, not twice
    assert (out / "checkpoint.npz").is_file() and (out / "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and len(summary["devices"]) == 4
    assert "epoch 1/1" in children["outputs"]["process0"]
    assert "4 cpu devices in 2 processes" in children["outputs"]["process0"]
    assert "epoch 1/1" not in children["outputs"]["process1"]
    assert "training:" not in children["outputs"]["process1"]


# --------------------------------------------------------------------------------------------
# Two processes that must stop together: a failure in one of them, a SIGTERM.

TRAIN = ROOT / "train.py"
SMALL_RUN = ["--n-train", "640", "--n-test", "50", "--batch-size", str(BATCH)]


def start_pair(tmp, name, args_of):
    """Start the two processes of a distributed ``train.py`` run; ``args_of(pid)`` gives each
    its own arguments. Their output goes to ``tmp / f"{name}{pid}.txt"``."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for pid in (0, 1):
        log = open(tmp / f"{name}{pid}.txt", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(TRAIN), *args_of(pid), "--coordinator", coordinator,
             "--num-processes", "2", "--process-id", str(pid)],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(2), cwd=tmp))
        log.close()
    return procs


def wait_pair(tmp, name, procs):
    """Exit codes and outputs of a pair; a pair that hangs fails the test (and is killed)."""
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=CHILD_TIMEOUT))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{name}: the processes did not stop within {CHILD_TIMEOUT} s")
    return codes, [(tmp / f"{name}{pid}.txt").read_text() for pid in (0, 1)]


# Three two-process runs that must stop together (about 25 s: under -m slow, with the other
# long tests; the default run keeps the four-device and two-process equivalence above).
@pytest.fixture(scope="session")
def stops(children):
    """Three two-process runs at once: process 0 cannot write its checkpoint; the two processes
    find different checkpoints in --out; process 1 gets SIGTERM after the first epoch."""
    tmp = children["dir"]
    unwritable = tmp / "unwritable"
    (unwritable / training.CHECKPOINT).mkdir(parents=True)  # a directory where the file goes
    stale = tmp / "stale"  # the 1-device run's checkpoint: same epoch and step, other params
    stale.mkdir()
    (stale / training.CHECKPOINT).write_bytes(
        (tmp / "runs" / "devices1" / training.CHECKPOINT).read_bytes())
    preempt = tmp / "preempt"
    pairs = {
        "unwritable": start_pair(tmp, "unwritable", lambda pid: [
            *SMALL_RUN, "--epochs", "2", "--out", str(unwritable)]),
        "stale": start_pair(tmp, "stale", lambda pid: [
            *SMALL_RUN, "--eval-only", "--out", str(tmp / "distributed" if pid == 0 else stale)]),
        "preempt": start_pair(tmp, "preempt", lambda pid: [
            *SMALL_RUN, "--epochs", "50", "--out", str(preempt)]),
    }
    metrics = preempt / training.METRICS
    for _ in range(CHILD_TIMEOUT * 10):  # SIGTERM to process 1 once epoch 1 is on disk
        if metrics.exists() and metrics.read_text().strip():
            break
        time.sleep(0.1)
    pairs["preempt"][1].send_signal(signal.SIGTERM)
    return {"dir": tmp, **{name: wait_pair(tmp, name, procs) for name, procs in pairs.items()}}


@pytest.mark.slow
def test_when_process_zero_cannot_write_every_process_stops(stops):
    (code0, code1), (out0, out1) = stops["unwritable"]
    assert (code0, code1) == (1, 1), (out0, out1)
    assert re.search(r"train\.py: error: fit: could not write \S*unwritable/checkpoint\.npz after "
                     r"epoch 1: \[Errno 21\] Is a directory: .*; training stopped and no "
                     r"checkpoint had been written yet", out0), out0
    assert ("train.py: error: fit: writing epoch 1's metrics and checkpoint in "
            in out1 and "failed in process 0 (its own error says why); every process stops"
            in out1), out1


@pytest.mark.slow
def test_processes_that_read_different_checkpoints_refuse_to_go_on(stops):
    for code, out in zip(*stops["stale"]):
        assert code == 1, out
        assert re.search(r"train\.py: error: fit: the processes read different checkpoints at "
                         r".*process 0: epoch 1, step 20, params checksum [0-9a-f]{8}; process "
                         r"1: epoch 1, step 20, params checksum [0-9a-f]{8}\); every process "
                         r"needs the same checkpoint", out), out


@pytest.mark.slow
def test_a_sigterm_stops_every_process_at_the_same_step(stops):
    codes, outs = stops["preempt"]
    assert codes == [143, 143], outs
    steps = [re.search(r"train\.py: fit: preempted at step (\d+) \(epoch (\d+)", out)
             for out in outs]
    assert all(steps), outs
    assert steps[0].groups() == steps[1].groups()          # the same step in both
    epoch = int(steps[0].group(2))
    assert 1 < epoch < 50                                  # it stopped early, after epoch 1
    assert "continue with the same options and --resume" in outs[0]
    # The epochs before the stop are on disk, written once; the checkpoint is the last of them.
    preempt = stops["dir"] / "preempt"
    records = [json.loads(line) for line in (preempt / training.METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, epoch))
    with np.load(preempt / training.CHECKPOINT) as f:
        assert json.loads(str(f["__meta__"]))["epoch"] == epoch - 1


# --------------------------------------------------------------------------------------------
# In this process (one CPU device).


def test_data_mesh_over_every_device_by_default():
    mesh = parallel.data_mesh()
    assert mesh.axis_names == (parallel.AXIS,) and mesh.devices.size == jax.device_count()
    assert parallel.data_mesh(1).devices.size == 1


@pytest.mark.parametrize("devices, error, match", [
    (0, ValueError, r"data_mesh: devices must lie in 1\.\.1 \(the devices JAX sees: 1 cpu "
                    r"device\); got 0"),
    (2, ValueError, r"data_mesh: devices must lie in 1\.\.1 .*; got 2"),
    ("2", TypeError, r"data_mesh: devices must be an int or None; got str '2'"),
    (True, TypeError, r"data_mesh: devices must be an int or None; got bool True"),
])
def test_data_mesh_errors(devices, error, match):
    with pytest.raises(error, match=match):
        parallel.data_mesh(devices)


def test_one_process_holds_every_row_and_the_data_lands_sharded():
    mesh = parallel.data_mesh(1)
    assert parallel.process_rows(mesh, 24) == slice(0, 24)
    x = np.arange(24.0, dtype=np.float32).reshape(6, 4)
    a = parallel.shard(mesh, x, 6)
    assert a.sharding == parallel.batch_sharding(mesh) and np.array_equal(np.asarray(a), x)
    tree = {"w": np.ones((2, 3), np.float32), "b": jax.numpy.zeros(3)}
    rep = parallel.replicate(tree, mesh)
    assert all(leaf.sharding == parallel.replicated(mesh) for leaf in jax.tree.leaves(rep))
    back = parallel.host(rep)
    assert isinstance(back["w"], np.ndarray) and np.array_equal(back["w"], tree["w"])


SRUN_4 = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "4",
          "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}


@pytest.fixture
def clean_env(monkeypatch):
    """No distributed setting of any launcher in the environment."""
    for var in [parallel.COORDINATOR_ENV, *(v for req, _ in parallel.LAUNCHERS.values()
                                            for v in req)]:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_initialize_does_nothing_without_settings(clean_env):
    assert parallel.launcher() is None
    assert parallel.initialize() is False
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        clean_env.setenv(var, SRUN_4[var])   # an sbatch script's shell: no job step
    assert parallel.launcher() is None and parallel.initialize() is False
    clean_env.setenv("SLURM_STEP_NODELIST", "node01")
    clean_env.setenv("SLURM_NTASKS", "1")    # a one-task srun step is an ordinary single run
    assert parallel.launcher() is None and parallel.initialize() is False
    assert jax.process_count() == 1


@pytest.mark.parametrize("env, name", [
    (SRUN_4, "SLURM (srun)"),
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2"},
     "Open MPI (mpirun)"),
    ({parallel.COORDINATOR_ENV: "10.0.0.1:1234"}, None),
])
def test_initialize_starts_for_the_environment_jax_reads(clean_env, env, name):
    """One of several srun / mpirun tasks, or $JAX_COORDINATOR_ADDRESS: initialize calls
    jax.distributed.initialize (here too late, in a process that already used JAX: its error
    proves the call)."""
    for var, value in env.items():
        clean_env.setenv(var, value)
    assert parallel.launcher() == name
    with pytest.raises(RuntimeError, match=r"initialize: starting JAX's distributed runtime "
                                           r"with coordinator .*must be called before"):
        parallel.initialize()
    assert jax.process_count() == 1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(coordinator="localhost", num_processes=2, process_id=0), ValueError,
     r"initialize: coordinator must be 'host:port' with a port in 1\.\.65535; got 'localhost'"),
    (dict(coordinator="localhost:0", num_processes=2, process_id=0), ValueError,
     r"coordinator must be 'host:port'.*got 'localhost:0'"),
    (dict(coordinator=1234, num_processes=2, process_id=0), TypeError,
     r"initialize: coordinator must be a 'host:port' string; got int 1234"),
    (dict(coordinator="h:1", num_processes=0, process_id=0), ValueError,
     r"initialize: num_processes must be >= 1; got 0"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), ValueError,
     r"initialize: process_id must lie in 0\.\.num_processes-1 \(0\.\.1\); got 2"),
    (dict(coordinator="h:1", num_processes="2", process_id=0), TypeError,
     r"initialize: num_processes must be an int; got str '2'"),
    (dict(process_id=-1), ValueError, r"initialize: process_id must be >= 0; got -1"),
])
def test_initialize_rejects_bad_settings_before_starting_anything(kwargs, error, match):
    with pytest.raises(error, match=match):
        parallel.initialize(**kwargs)
    assert jax.process_count() == 1


def test_fit_with_more_devices_than_there_are(tmp_path):
    config = training.TrainConfig(devices=2, n_train=64, n_test=10, out=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"data_mesh: devices must lie in 1\.\.1"):
        training.fit(config)
    assert not (tmp_path / "r").exists()


def test_initialize_after_jax_has_started_says_so():
    jax.devices()  # this process has used JAX: too late to join a distributed run
    with pytest.raises(RuntimeError, match=r"initialize: starting JAX's distributed runtime with "
                                           r"coordinator 127\.0\.0\.1:1 failed: .*must be "
                                           r"called before"):
        parallel.initialize("127.0.0.1:1", 2, 0)
    assert jax.process_count() == 1
