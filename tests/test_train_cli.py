"""Tests for train.py: the command line, end to end on IDX files this test writes itself.

One run goes through a real ``python train.py`` subprocess (MNIST-format files in a temporary
--data-dir); the error paths call ``train.main(argv)`` in this process. Four more processes,
started together, test what needs a real process: a lock held by another process, kill -9
during and right after a checkpoint write, SIGTERM. No test touches the internet: the download
mirrors point at a closed port on 127.0.0.1.
"""

import gzip
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxcnn import _io, _report, _rundir, training

from conftest import (IDX_NAMES as IDX, ROOT, closed_port_url, load_cli, start_early,
                      started_early, write_idx_files)

N_TRAIN, N_TEST = 256, 100
# Tiny settings shared with tests/test_training.py (same compiled step and evaluation).
TINY = ["--epochs", "1", "--batch-size", "32", "--lr", "0.002", "--impl", "lax"]


cli = load_cli()


pytestmark = pytest.mark.usefixtures("offline")   # conftest: no internet, cache in tmp_path


def write_mnist(directory, *, n_train=N_TRAIN, n_test=N_TEST, seed=0, labels=None):
    """Four gzipped IDX files: noisy images with a bright block whose place gives the label."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8) if labels is None else labels
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(y % 10):
            r, c = divmod(int(label), 5)
            x[i, 4 + 10 * r: 12 + 10 * r, 2 + 5 * c: 6 + 5 * c] = 255
        arrays[split + "_x"], arrays[split + "_y"] = x, np.asarray(y).astype(np.uint8)
    write_idx_files(directory, arrays)
    return directory


@start_early("mnist_run")
def start_mnist_run(tmp_path_factory):
    """Start one real `python train.py --dataset mnist` run on written IDX files (at the
    session's first test: see conftest.start_early); its output goes to files."""
    tmp = tmp_path_factory.mktemp("mnist")
    data_dir = write_mnist(tmp / "data")
    out = tmp / "run"
    env = {**os.environ, "JAXCNN_MIRRORS": closed_port_url(),
           "XDG_CACHE_HOME": str(tmp / "cache")}
    with open(tmp / "stdout.txt", "w") as stdout, open(tmp / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "train.py", "--dataset", "mnist", "--data-dir", str(data_dir),
             "--out", str(out), *TINY], cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
    return (proc, tmp, data_dir, out), [proc]


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """That run, finished: ``(CompletedProcess, data_dir, out)``."""
    proc, tmp, data_dir, out = started_early("mnist_run", tmp_path_factory)
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode,
                                       (tmp / "stdout.txt").read_text(),
                                       (tmp / "stderr.txt").read_text())
    return done, data_dir, out


def test_mnist_end_to_end(mnist_run):
    proc, _, out = mnist_run
    assert proc.returncode == 0, proc.stderr
    assert f"lenet5 (61,706 params, impl lax) on mnist ({N_TRAIN} train / {N_TEST} test)" in proc.stdout
    assert re.search(r"^epoch 1/1  train loss \d+\.\d{4}  test loss \d+\.\d{4}  test acc "
                     r"\d+\.\d\d%  \d+ img/s$", proc.stdout, re.M)
    assert re.search(r"^test accuracy \d+\.\d\d% after 1 epoch \(\d+\.\d s\); results in ", proc.stdout, re.M)
    assert proc.stderr.strip() == ""                    # no progress bar: not a terminal
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == N_TRAIN // 32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["dataset"] == "mnist" and summary["final"] == records[0]
    assert (N_TEST * summary["final"]["test_accuracy"]) % 1 == 0   # k out of all 100
    assert (out / "checkpoint.npz").is_file()
    have_matplotlib = importlib.util.find_spec("matplotlib") is not None
    for name in ("curves.png", "filters.png"):
        assert (out / name).is_file() == have_matplotlib
    assert (_report.PLOTS_SKIPPED in proc.stdout) != have_matplotlib


def test_eval_only_on_the_run(mnist_run, capsys):
    proc, data_dir, out = mnist_run
    assert proc.returncode == 0, proc.stderr
    code = cli.main(["--dataset", "mnist", "--data-dir", str(data_dir), "--out", str(out),
                     "--eval-only", *TINY])
    acc = json.loads((out / "summary.json").read_text())["final"]["test_accuracy"]
    assert code == 0
    assert f"test acc {100 * acc:.2f}% ({round(acc * N_TEST)}/{N_TEST})" in capsys.readouterr().out


def test_resume_with_another_model_is_refused(mnist_run, capsys):
    proc, data_dir, out = mnist_run
    assert proc.returncode == 0, proc.stderr
    code = cli.main(["--dataset", "mnist", "--data-dir", str(data_dir), "--out", str(out),
                     "--resume", "--model", "small_cnn", *TINY])
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"train.py: error: load_checkpoint: .*checkpoint.npz does not match the "
                     r"model: \['params'\]\[0\]\['bias'\] has shape \(6,\) in the checkpoint but "
                     r"\(32,\) in the model", err)


# ------------------------------------------------------------------------------------------
# The command line itself.


def test_defaults_are_the_train_config_defaults():
    assert cli.parse_args([]) == training.TrainConfig()
    assert cli.parse_command_line([]) == (training.TrainConfig(), cli.Distributed())
    assert cli.Distributed() == (None, None, None, False)   # single process: nothing to start


def test_options_reach_the_config():
    c = cli.parse_args(["--dataset", "fashion_mnist", "--data-dir", "/d", "--model", "small_cnn",
                        "--impl", "lax", "--epochs", "7", "--batch-size", "64", "--lr", "0.01",
                        "--optimizer", "momentum", "--seed", "3", "--out", "/o", "--resume",
                        "--n-train", "100", "--n-test", "50", "--devices", "2",
                        "--dtype", "bfloat16"])
    assert c == training.TrainConfig(
        dataset="fashion_mnist", data_dir="/d", model="small_cnn", impl="lax", epochs=7,
        batch_size=64, lr=0.01, optimizer="momentum", seed=3, out="/o", resume=True,
        n_train=100, n_test=50, devices=2, dtype="bfloat16")


def test_overwrite_reaches_the_config():
    assert cli.parse_args(["--overwrite"]) == training.TrainConfig(overwrite=True)


def test_each_model_gets_its_recipe_and_help_lists_them(capsys):
    for name, recipe in training.RECIPES.items():
        c = cli.parse_args(["--model", name])
        assert c == training.TrainConfig(model=name)
        assert (c.epochs, c.batch_size, c.lr) == recipe
    c = cli.parse_args(["--model", "resnet", "--batch-size", "32"])
    assert (c.epochs, c.batch_size, c.lr) == (2, 32, training.RECIPES["resnet"].lr)
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    out = capsys.readouterr().out
    for name, r in training.RECIPES.items():
        line = f"  {name:<10} --epochs {r.epochs} --batch-size {r.batch_size} --lr {r.lr:g}\n"
        assert line in out
    assert "(default: the model's recipe, below)" in out


def test_the_readme_states_the_resnet_recipe():
    """The README's ResNet section names the recipe of training.RECIPES, the one place."""
    r = training.RECIPES["resnet"]
    readme = (ROOT / "README.md").read_text()
    assert (f"`python train.py --model resnet` (its recipe: {r.epochs} epochs, batch "
            f"{r.batch_size}, Adam {r.lr:g} with cosine decay)") in readme


def test_distributed_options_are_kept_apart_from_the_config():
    config, dist = cli.parse_command_line(["--coordinator", "10.0.0.1:1234", "--num-processes",
                                           "4", "--process-id", "3", "--epochs", "2"])
    assert config == training.TrainConfig(epochs=2)
    assert dist == cli.Distributed("10.0.0.1:1234", 4, 3, False)
    assert cli.parse_command_line(["--distributed"])[1] == cli.Distributed(auto=True)


@pytest.mark.parametrize("argv, match", [
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"],
     r"initialize: coordinator must be 'host:port' with a port in 1\.\.65535; got 'nohost'"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "5"],
     r"initialize: process_id must lie in 0\.\.num_processes-1 \(0\.\.1\); got 5"),
])
def test_bad_distributed_settings_exit_1_before_anything_starts(argv, match, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert re.search(r"^train\.py: error: " + match, err, re.M), err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "cifar10"], r"argument --dataset: invalid choice: 'cifar10' \(choose from "
                               r"'?synthetic'?, '?mnist'?, '?fashion_mnist'?\)"),
    (["--model", "vgg"], r"argument --model: invalid choice: 'vgg' \(choose from '?lenet5'?, "
                         r"'?small_cnn'?, '?resnet'?\)"),
    (["--optimizer", "rmsprop"], r"argument --optimizer: invalid choice: 'rmsprop' \(choose "
                                 r"from '?adam'?, '?sgd'?, '?momentum'?\)"),
    (["--impl", "cuda"], r"argument --impl: invalid choice: 'cuda'"),
    (["--batch-size", "0"], r"TrainConfig: batch_size must be >= 1; got 0"),
    (["--batch-size", "-5"], r"TrainConfig: batch_size must be >= 1; got -5"),
    (["--lr", "-1"], r"TrainConfig: lr must be a finite number > 0; got -1.0"),
    (["--epochs", "two"], r"argument --epochs: invalid int value: 'two'"),
    (["--resume", "--eval-only"], r"argument --eval-only: not allowed with argument --resume"),
    (["--dtype", "float16"], r"argument --dtype: invalid choice: 'float16'"),
    (["--devices", "0"], r"TrainConfig: devices must be >= 1; got 0"),
    (["--process-id", "x"], r"argument --process-id: invalid int value: 'x'"),
    (["--resume", "--overwrite"], r"argument --overwrite: not allowed with argument --resume"),
    (["--lr", "1e39"], r"TrainConfig: lr must lie in .*, the positive range of float32 \(the "
                       r"dtype of the update\); got 1e\+39"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


# ------------------------------------------------------------------------------------------
# Data faults, reported by jaxcnn.data and passed through unchanged.


def run_mnist(data_dir, tmp_path, *extra):
    return cli.main(["--dataset", "mnist", "--data-dir", str(data_dir),
                     "--out", str(tmp_path / "run"), *TINY, *extra])


def test_missing_files_list_what_is_expected(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_mnist(empty, tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: load_dataset: the mnist files")
    for stem in IDX.values():
        assert f"{stem}.gz" in err
    assert str(empty) in err
    assert not (tmp_path / "run").exists()


def test_truncated_idx_file_is_named(tmp_path, capsys):
    data_dir = write_mnist(tmp_path / "data")
    path = data_dir / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    assert run_mnist(data_dir, tmp_path) == 1
    err = capsys.readouterr().err
    assert re.search(r"train.py: error: read_idx: .*train-images-idx3-ubyte.gz is truncated", err)


def test_labels_out_of_range_in_the_files(tmp_path, capsys):
    labels = np.zeros(N_TRAIN, np.uint8)
    labels[5] = 12
    data_dir = write_mnist(tmp_path / "data", n_test=N_TRAIN, labels=labels)
    assert run_mnist(data_dir, tmp_path) == 1
    err = capsys.readouterr().err
    assert re.search(r"labels-idx1-ubyte.gz must lie in 0\.\.9; got values from 0 to 12: 12 at index 5", err)


def test_batch_size_larger_than_the_training_set(tmp_path, capsys):
    data_dir = write_mnist(tmp_path / "data")
    assert run_mnist(data_dir, tmp_path, "--batch-size", "512") == 1
    assert ("train.py: error: fit: batch_size (512) must be <= the number of training examples "
            f"({N_TRAIN}) of mnist") in capsys.readouterr().err



# ------------------------------------------------------------------------------------------
# --out belongs to one run; kills, SIGTERM and Ctrl-C leave it consistent and say so.

SMALL = ["--n-train", "64", "--n-test", "20", "--batch-size", "32", "--impl", "lax"]
RUN = [*SMALL, "--epochs", "3"]     # the runs the killed children train: 2 steps per epoch

# A child that trains RUN and kills itself (SIGKILL, as kill -9 does) at one moment:
# "writing": halfway through writing epoch 2's checkpoint; "written": right after epoch 2's
# checkpoint, before its line of metrics.jsonl.
KILLED_CHILD = r"""
import os, signal, sys
from jaxcnn import _io, training
moment, out = sys.argv[1:]
real_write, real_append, checkpoints = _io.atomic_write, _io.append_line, []

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def atomic_write(path, write, **kwargs):
    if path.name == "checkpoint.npz":
        checkpoints.append(path)
        if moment == "writing" and len(checkpoints) == 2:
            def half(f):
                f.write(b"PK\x03\x04" + bytes(4096))
                f.flush()
                os.fsync(f.fileno())
                kill()
            return real_write(path, half, **kwargs)
    return real_write(path, write, **kwargs)

def append_line(path, line):
    if moment == "written" and '"epoch": 2,' in line:
        kill()
    return real_append(path, line)

_io.atomic_write, _io.append_line = atomic_write, append_line
training.fit(training.TrainConfig(n_train=64, n_test=20, batch_size=32, impl="lax", epochs=3,
                                  out=out))
"""
# A child that holds --out (the lock of a run) until it is killed.
HOLDER_CHILD = r"""
import sys, time
from jaxcnn import _rundir
with _rundir.claim("fit", sys.argv[1], resume=False, overwrite=False):
    print("holding", flush=True)
    time.sleep(600)
"""


def wait_for(condition, what, timeout=300):
    for _ in range(timeout * 20):
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """Four real processes at once: two kill themselves at chosen moments, one holds an --out,
    one `python train.py` gets SIGTERM after its first epoch."""
    tmp = tmp_path_factory.mktemp("processes")
    env = {**os.environ, "JAXCNN_MIRRORS": closed_port_url(), "XDG_CACHE_HOME": str(tmp)}
    spawn = dict(cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = {
        "writing": subprocess.Popen([sys.executable, "-c", KILLED_CHILD, "writing",
                                     str(tmp / "writing")], **spawn),
        "written": subprocess.Popen([sys.executable, "-c", KILLED_CHILD, "written",
                                     str(tmp / "written")], **spawn),
        "holder": subprocess.Popen([sys.executable, "-c", HOLDER_CHILD, str(tmp / "held")],
                                   **spawn),
        "terminated": subprocess.Popen([sys.executable, "train.py", *SMALL, "--epochs", "1000",
                                        "--out", str(tmp / "terminated")], **spawn),
    }
    try:
        metrics = tmp / "terminated" / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().strip(), "the first epoch")
        procs["terminated"].send_signal(signal.SIGTERM)
        results = {name: procs[name].communicate(timeout=300)
                   for name in ("writing", "written", "terminated")}
        assert procs["holder"].stdout.readline() == "holding\n"
        yield {"dir": tmp, "procs": procs, "results": results}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def saved(out):
    """The checkpoint's epoch and history, read without a template."""
    with np.load(out / "checkpoint.npz") as f:
        meta = json.loads(str(f["__meta__"]))
    return meta["epoch"], meta["history"]


def test_a_second_run_is_refused_while_another_holds_out(processes, capsys):
    out, holder = processes["dir"] / "held", processes["procs"]["holder"]
    assert cli.main([*SMALL, "--epochs", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"^train\.py: error: fit: {re.escape(str(out))} is in use by another run "
                     rf"\(pid {holder.pid} on \S+, since [\d:\- ]+\); two runs cannot share an "
                     rf"output directory: wait for that run to end, or choose another --out$",
                     err, re.M), err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]      # the refused run wrote nothing
    holder.kill()                                                 # kill -9 releases the lock
    holder.wait()
    with _rundir.claim("fit", out, resume=False, overwrite=False):
        assert f"pid {os.getpid()} " in (out / ".lock").read_text()


def test_kill_9_while_writing_a_checkpoint_then_the_next_run_cleans_up(processes, capsys):
    out = processes["dir"] / "writing"
    assert processes["procs"]["writing"].returncode == -signal.SIGKILL
    # On disk: epoch 1's checkpoint and metrics, and the half-written temporary file.
    epoch, history = saved(out)
    assert epoch == 1 and records(out) == history
    assert len(_io.leftover_temporaries(out, "checkpoint.npz")) == 1
    assert not (out / "summary.json").exists()
    # A new run is refused (the killed run's files are there), but removes the temporary file.
    assert cli.main([*RUN, "--out", str(out)]) == 1
    assert "holds another run's files (checkpoint.npz, metrics.jsonl)" in capsys.readouterr().err
    assert not _io.leftover_temporaries(out, "checkpoint.npz")
    # --resume finishes the run: every file agrees with the checkpoint.
    assert cli.main([*RUN, "--out", str(out), "--resume"]) == 0
    epoch, history = saved(out)
    summary = json.loads((out / "summary.json").read_text())
    assert epoch == 3 and records(out) == history and summary["final"] == history[-1]


def test_kill_9_between_checkpoint_and_metrics_leaves_them_consistent(processes):
    out = processes["dir"] / "written"
    assert processes["procs"]["written"].returncode == -signal.SIGKILL
    epoch, history = saved(out)
    assert epoch == 2 and records(out) == history[:1]   # metrics lists no epoch beyond it
    assert not (out / "summary.json").exists()
    assert cli.main([*RUN, "--out", str(out), "--resume"]) == 0
    epoch, history = saved(out)
    assert epoch == 3 and records(out) == history and [r["epoch"] for r in history] == [1, 2, 3]


def test_sigterm_to_a_single_process_says_what_is_kept_and_exits_143(processes):
    out = processes["dir"] / "terminated"
    proc, (_, stderr) = processes["procs"]["terminated"], processes["results"]["terminated"]
    assert proc.returncode == 143, stderr
    checkpoint = re.escape(str(out / "checkpoint.npz"))
    found = re.search(rf"^train\.py: fit: terminated \(SIGTERM\) (in|after) epoch (\d+) of 1000; "
                      rf"the last checkpoint, {checkpoint} \(epoch (\d+)\), is left as it was: "
                      rf"continue with the same options and --resume( \(the steps since that "
                      rf"epoch are redone\))?$", stderr, re.M)
    assert found and "Traceback" not in stderr, stderr
    when, stopped, kept = found.group(1), int(found.group(2)), int(found.group(3))
    epoch, history = saved(out)
    assert kept == epoch >= 1 and records(out) == history
    assert (stopped, bool(found.group(4))) == ((kept + 1, True) if when == "in" else (kept, False))


def test_ctrl_c_through_the_command_line(tmp_path, monkeypatch, capsys):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(training, "_load", ctrl_c)           # while the data loads
    assert cli.main([*SMALL, "--out", str(out)]) == 130
    assert capsys.readouterr().err == ("\ntrain.py: fit: interrupted (Ctrl-C) before anything "
                                       "was written\n")
    assert not out.exists()
    monkeypatch.undo()
    monkeypatch.setattr(training, "train_step", ctrl_c)      # in the first epoch
    assert cli.main([*SMALL, "--out", str(out)]) == 130
    assert capsys.readouterr().err == (
        "\ntrain.py: fit: interrupted (Ctrl-C) in epoch 1 of 3, before any epoch finished: no "
        "checkpoint was written, so there is nothing to resume; start the run again\n")
    assert not (out / "checkpoint.npz").exists()


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("my notes")
    assert cli.main([*SMALL, "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == (
        f"train.py: error: fit: the output directory {tmp_path / 'run'} is an existing file, not "
        f"a directory; choose another --out (a directory, created if missing)\n")
    assert (tmp_path / "run").read_text() == "my notes"
