"""Tests for train.py: the command line, end to end on IDX files this test writes itself.

One run goes through a real ``python train.py`` subprocess (MNIST-format files in a temporary
--data-dir); the error paths call ``train.main(argv)`` in this process. No test touches the
internet: the download mirrors point at a closed port on 127.0.0.1.
"""

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxcnn import training

from conftest import IDX_NAMES as IDX, ROOT, closed_port_url, load_cli, write_idx_files

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


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """One real `python train.py --dataset mnist` run on written IDX files."""
    tmp = tmp_path_factory.mktemp("mnist")
    data_dir = write_mnist(tmp / "data")
    out = tmp / "run"
    env = {**os.environ, "JAXCNN_MIRRORS": closed_port_url(),
           "XDG_CACHE_HOME": str(tmp / "cache")}
    proc = subprocess.run(
        [sys.executable, "train.py", "--dataset", "mnist", "--data-dir", str(data_dir),
         "--out", str(out), *TINY],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, data_dir, out


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
    assert (training.PLOTS_SKIPPED in proc.stdout) != have_matplotlib


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
    assert re.search(r"labels-idx1-ubyte.gz has labels outside 0..9: 12 at index 5", err)


def test_batch_size_larger_than_the_training_set(tmp_path, capsys):
    data_dir = write_mnist(tmp_path / "data")
    assert run_mnist(data_dir, tmp_path, "--batch-size", "512") == 1
    assert ("train.py: error: fit: batch_size (512) must be <= the number of training examples "
            f"({N_TRAIN}) of mnist") in capsys.readouterr().err
