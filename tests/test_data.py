"""Tests for jaxcnn.data: synthetic digits, IDX files, checked downloads, batches.

No test touches the internet: downloads go to an HTTP server on 127.0.0.1, and conftest's
`offline` fixture, used by every test here, points the default mirrors at a closed local port
and the cache at tmp_path.
"""

import functools
import gzip
import hashlib
import http.server
import re
import socket
import threading

import numpy as np
import pytest

from jaxcnn import data
from jaxcnn.data import _download

from conftest import (IDX_NAMES, TYPE_CODES, closed_port_url, idx_bytes, write_idx,
                      write_idx_files)

pytestmark = pytest.mark.usefixtures("offline")


# ------------------------------------------------------------------------------------------
# Fixtures and helpers.


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(directory served, base URL) of a ThreadingHTTPServer on 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def fake_mnist(n_train=64, n_test=32, seed=0):
    """Random uint8 images and 0..9 labels for the four IDX files."""
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test).astype(np.uint8),
    }


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(directory):
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------------------------------
# Synthetic digits.


def test_synthetic_is_deterministic_for_a_seed():
    x1, y1 = data.synthetic_digits(300, seed=3)
    x2, y2 = data.synthetic_digits(300, seed=3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_synthetic_differs_between_seeds():
    x1, y1 = data.synthetic_digits(300, seed=3)
    x2, y2 = data.synthetic_digits(300, seed=4)
    assert not np.array_equal(y1, y2)
    assert not np.any(np.all(x1 == x2, axis=(1, 2)))


def test_synthetic_shapes_dtypes_and_ranges():
    x, y = data.synthetic_digits(500, seed=0)
    assert x.shape == (500, 28, 28) and x.dtype == np.uint8
    assert y.shape == (500,) and y.dtype == np.int32
    assert y.min() == 0 and y.max() == 9
    # Every image has a saturated stroke on a mostly dark background.
    assert np.all(x.max(axis=(1, 2)) >= 150)
    assert 0.05 < np.mean(x > 128) < 0.3
    # The border is dark: the glyph is placed inside the frame.
    assert np.mean(x[:, 0, :]) < 15 and np.mean(x[:, :, -1]) < 15


@pytest.mark.parametrize("n", [1000, 1007])
def test_synthetic_classes_are_balanced(n):
    _, y = data.synthetic_digits(n, seed=1)
    counts = np.bincount(y, minlength=10)
    assert counts.min() >= n // 10 and counts.max() <= n // 10 + 1


def test_synthetic_zero_images():
    x, y = data.synthetic_digits(0, seed=0)
    assert x.shape == (0, 28, 28) and y.shape == (0,)


def test_synthetic_labels_match_images():
    # A nearest-class-mean classifier is far above chance (10%) only if labels fit images.
    x, y = data.synthetic_digits(2000, seed=1)
    xt, yt = data.synthetic_digits(500, seed=2)
    x, xt = x.reshape(len(x), -1) / 255.0, xt.reshape(len(xt), -1) / 255.0
    means = np.stack([x[y == k].mean(axis=0) for k in range(10)])
    predicted = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == yt) > 0.3


def test_load_synthetic_dataset():
    ds = data.load_dataset("synthetic", n_train=600, n_test=200, seed=5)
    assert ds.name == "synthetic" and ds.num_classes == 10
    assert ds.train_x.shape == (600, 28, 28, 1) and ds.test_x.shape == (200, 28, 28, 1)
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
    assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
    again = data.load_dataset("synthetic", n_train=600, n_test=200, seed=5)
    np.testing.assert_array_equal(ds.train_x, again.train_x)
    np.testing.assert_array_equal(ds.test_y, again.test_y)


def test_synthetic_train_and_test_are_disjoint():
    ds = data.load_dataset("synthetic", n_train=2000, n_test=500, seed=0)
    train = {img.tobytes() for img in ds.train_x}
    assert not any(img.tobytes() in train for img in ds.test_x)


def test_synthetic_seed_changes_the_dataset():
    a = data.load_dataset("synthetic", n_train=100, n_test=50, seed=0)
    b = data.load_dataset("synthetic", n_train=100, n_test=50, seed=1)
    assert not np.array_equal(a.train_x, b.train_x)
    assert not np.array_equal(a.test_x, b.test_x)


def test_load_dataset_argument_errors():
    with pytest.raises(ValueError, match=r"load_dataset: name must be one of .*got 'cifar'"):
        data.load_dataset("cifar")
    with pytest.raises(ValueError, match=r"load_dataset: n_train must be >= 1; got 0"):
        data.load_dataset("synthetic", n_train=0)
    with pytest.raises(TypeError, match=r"load_dataset: n_test must be an int; got float 5.0"):
        data.load_dataset("synthetic", n_test=5.0)
    with pytest.raises(ValueError, match=r"load_dataset: seed must be >= 0; got -1"):
        data.load_dataset("synthetic", seed=-1)
    with pytest.raises(TypeError, match=r"synthetic_digits: n must be an int; got bool True"):
        data.synthetic_digits(True, seed=0)


def test_dataset_checks_its_arrays():
    x = np.zeros((4, 28, 28, 1), np.float32)
    y = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match=r"Dataset: train_x must be a float32 .*float64"):
        data.Dataset("t", x.astype(np.float64), y, x, y)
    with pytest.raises(ValueError, match=r"Dataset: test_y must be an int32 .*shape \(3,\)"):
        data.Dataset("t", x, y, x, y[:3])
    with pytest.raises(ValueError, match=r"Dataset: train_y must lie in 0\.\.9; got values from \d+ to 10"):
        data.Dataset("t", x, y + 10, x, y)
    assert "train_x=(4, 28, 28, 1)" in repr(data.Dataset("t", x, y, x, y))


# ------------------------------------------------------------------------------------------
# IDX files.


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", list(TYPE_CODES))
def test_read_idx_round_trip(tmp_path, dtype, gz):
    array = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    if dtype is np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    out = data.read_idx(write_idx(tmp_path / "a.idx", array, gz=gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_one_dimensional_labels(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "l.gz", labels)), labels)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x01\x02\x08\x01" + np.array([2], ">u4").tobytes() + b"\x00\x01")
    with pytest.raises(ValueError, match=re.escape(f"read_idx: {path} has a bad magic number "
                                                   "0x01020801")):
        data.read_idx(path)


def test_read_idx_unknown_type_code(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x00\x00\x07\x01" + np.array([2], ">u4").tobytes() + b"\x00\x01")
    with pytest.raises(ValueError, match=r"bad magic number 0x00000701: expected .*0x08"):
        data.read_idx(path)


def test_read_idx_truncated_data(tmp_path):
    path = tmp_path / "short.idx.gz"
    raw = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    path.write_bytes(gzip.compress(raw[:-5]))
    message = (f"read_idx: {path} is truncated: dimensions (3, 28, 28) of uint8 need 2352 "
               f"bytes of data after the 16-byte header; got 2347")
    with pytest.raises(ValueError, match=re.escape(message)):
        data.read_idx(path)


def test_read_idx_too_long(tmp_path):
    path = tmp_path / "long.idx"
    path.write_bytes(idx_bytes(np.zeros(5, np.int16)) + b"\x00\x00")
    pattern = re.escape(f"{path} is too long") + r".*need 10 bytes.*got 12"
    with pytest.raises(ValueError, match=pattern):
        data.read_idx(path)


def test_read_idx_wrong_dims(tmp_path):
    # The header says 4 x 28 x 28 but the data holds 3 images.
    path = tmp_path / "dims.idx"
    raw = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    path.write_bytes(raw[:4] + np.array([4, 28, 28], ">u4").tobytes() + raw[16:])
    pattern = re.escape(str(path)) + r" is truncated: dimensions \(4, 28, 28\)"
    with pytest.raises(ValueError, match=pattern):
        data.read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "header.idx"
    path.write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x05")
    pattern = r" is truncated: .*3 dimensions.*16-byte header; the file has 8 bytes"
    with pytest.raises(ValueError, match=re.escape(str(path)) + pattern):
        data.read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match=r"is truncated: an IDX file starts with a 4-byte magic"):
        data.read_idx(path)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_read_idx_corrupt_gzip(tmp_path, damage):
    path = tmp_path / "corrupt.gz"
    packed = bytearray(gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32))))
    if damage == "truncate":
        packed = packed[: len(packed) // 2]
    else:
        packed[len(packed) // 2] ^= 0xFF
        packed[-6] ^= 0xFF  # the CRC as well, in case the flipped byte still inflates
    path.write_bytes(bytes(packed))
    with pytest.raises(ValueError, match=re.escape(f"read_idx: {path} is not a valid gzip file")):
        data.read_idx(path)


# ------------------------------------------------------------------------------------------
# MNIST-format datasets from files.


@pytest.mark.parametrize("layout", ["subdir-gz", "flat-plain"])
def test_load_mnist_from_data_dir(tmp_path, layout):
    arrays = fake_mnist()
    if layout == "subdir-gz":
        write_idx_files(tmp_path / "mnist", arrays, gz=True)
    else:
        write_idx_files(tmp_path, arrays, gz=False)
    ds = data.load_dataset("mnist", data_dir=tmp_path, download=False)
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.train_x.shape == (64, 28, 28, 1) and ds.test_x.shape == (32, 28, 28, 1)
    assert ds.train_x.dtype == np.float32 and ds.test_y.dtype == np.int32
    np.testing.assert_allclose(ds.train_x[..., 0], arrays["train_x"] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.test_x[..., 0], arrays["test_x"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.train_y, arrays["train_y"])
    np.testing.assert_array_equal(ds.test_y, arrays["test_y"])


def test_load_fashion_mnist_with_caps(tmp_path):
    arrays = fake_mnist(seed=1)
    write_idx_files(tmp_path / "fashion_mnist", arrays)
    ds = data.load_dataset("fashion_mnist", data_dir=tmp_path, n_train=10, n_test=5)
    assert ds.name == "fashion_mnist"
    assert ds.train_x.shape == (10, 28, 28, 1) and ds.test_y.shape == (5,)
    np.testing.assert_array_equal(ds.train_y, arrays["train_y"][:10])


def test_load_mnist_from_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    write_idx_files(tmp_path / "c" / "jaxcnn" / "mnist", fake_mnist())
    ds = data.load_dataset("mnist", download=False)
    assert ds.train_x.shape == (64, 28, 28, 1)


def test_load_mnist_missing_files_without_download(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("mnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    for stem in IDX_NAMES.values():
        assert stem + ".gz" in message
    assert str(tmp_path / "mnist") in message and str(tmp_path) in message
    assert "download=False" in message and "download=True" in message


def test_load_mnist_missing_files_default_cache(tmp_path):
    searched = tmp_path / "xdg-cache" / "jaxcnn" / "mnist"
    with pytest.raises(FileNotFoundError, match=re.escape(str(searched))):
        data.load_dataset("mnist", download=False)


def test_load_mnist_wrong_image_dims(tmp_path):
    arrays = fake_mnist()
    arrays["train_x"] = arrays["train_x"][:, :27, :]
    paths = write_idx_files(tmp_path, arrays)
    message = (f"{paths['train_x']} must hold uint8 images of shape (N, 28, 28); got uint8 of "
               f"shape (64, 27, 28)")
    with pytest.raises(ValueError, match=re.escape(message)):
        data.load_dataset("mnist", data_dir=tmp_path)


def test_load_mnist_labels_out_of_range(tmp_path):
    arrays = fake_mnist()
    arrays["test_y"][7] = 12
    paths = write_idx_files(tmp_path, arrays)
    message = (f"load_dataset: the labels of {paths['test_y']} must lie in 0..9; got values "
               f"from 0 to 12: 12 at index 7 (1 such labels)")
    with pytest.raises(ValueError, match=re.escape(message)):
        data.load_dataset("mnist", data_dir=tmp_path)


def test_load_mnist_count_mismatch(tmp_path):
    arrays = fake_mnist()
    arrays["train_y"] = arrays["train_y"][:63]
    paths = write_idx_files(tmp_path, arrays)
    message = f"{paths['train_x']} has 64 images but {paths['train_y']} has 63 labels"
    with pytest.raises(ValueError, match=re.escape(message)):
        data.load_dataset("mnist", data_dir=tmp_path)


def test_load_mnist_corrupt_file_is_named(tmp_path):
    paths = write_idx_files(tmp_path, fake_mnist())
    paths["test_x"].write_bytes(paths["test_x"].read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{paths['test_x']} is not a valid gzip")):
        data.load_dataset("mnist", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# Downloads.

LABELS = "train-labels-idx1-ubyte.gz"


def serve_labels(root):
    """Put a small gzipped IDX labels file in the served directory; return its SHA-256."""
    path = write_idx(root / LABELS, np.arange(10, dtype=np.uint8))
    return sha256(path)


def test_cache_dir_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "jaxcnn"


def test_cache_dir_defaults_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "jaxcnn"


def test_fetch_file_downloads_and_verifies(tmp_path, server):
    root, url = server
    digest = serve_labels(root)
    path = data.fetch_file(LABELS, dataset="mnist", cache_dir=tmp_path / "c", mirrors=[url],
                           sha256=digest)
    assert path == tmp_path / "c" / "mnist" / LABELS
    assert path.read_bytes() == (root / LABELS).read_bytes()
    assert files_in(path.parent) == [LABELS]  # no temporary file left behind
    # Already there and verified: no network needed (the only mirror is dead now).
    again = data.fetch_file(LABELS, dataset="mnist", cache_dir=tmp_path / "c",
                            mirrors=[closed_port_url()], sha256={LABELS: digest})
    assert again == path


def test_fetch_file_uses_the_published_checksum_table(tmp_path, server, monkeypatch):
    root, url = server
    digest = serve_labels(root)
    monkeypatch.setitem(_download._SHA256["mnist"], LABELS, digest)
    path = data.fetch_file(LABELS, dataset="mnist", mirrors=[url])
    assert path == tmp_path / "xdg-cache" / "jaxcnn" / "mnist" / LABELS
    assert sha256(path) == digest


def test_fetch_file_falls_back_to_the_next_mirror(tmp_path, server):
    root, url = server
    digest = serve_labels(root)
    mirrors = [closed_port_url(), url + "no-such-dir/", url]
    path = data.fetch_file(LABELS, dataset="mnist", cache_dir=tmp_path / "c", mirrors=mirrors,
                           sha256=digest)
    assert sha256(path) == digest
    assert files_in(path.parent) == [LABELS]


def test_fetch_file_checksum_mismatch_keeps_nothing(tmp_path, server):
    root, url = server
    actual = serve_labels(root)
    expected = "0" * 64
    with pytest.raises(data.DownloadError) as info:
        data.fetch_file(LABELS, dataset="mnist", cache_dir=tmp_path / "c", mirrors=[url],
                        sha256=expected)
    message = str(info.value)
    assert url + LABELS in message
    assert f"expected sha256 {expected}, got {actual}" in message
    assert files_in(tmp_path / "c" / "mnist") == []


def test_fetch_file_replaces_a_corrupt_cached_file(tmp_path, server):
    root, url = server
    digest = serve_labels(root)
    target = tmp_path / "c" / "mnist" / LABELS
    target.parent.mkdir(parents=True)
    target.write_bytes(b"garbage")
    path = data.fetch_file(LABELS, dataset="mnist", cache_dir=tmp_path / "c", mirrors=[url],
                           sha256=digest)
    assert sha256(path) == digest


def test_fetch_file_lists_every_failed_url(tmp_path, server):
    _, url = server
    dead = closed_port_url()
    with pytest.raises(data.DownloadError) as info:
        data.fetch_file(LABELS, dataset="mnist", cache_dir=tmp_path / "c",
                        mirrors=[dead, url], sha256="0" * 64)
    message = str(info.value)
    assert f"could not download {LABELS} for mnist" in message
    assert re.search(re.escape(dead + LABELS) + r": .*(refused|ConnectionRefusedError)", message)
    assert re.search(re.escape(url + LABELS) + r": HTTP 404", message)
    assert files_in(tmp_path / "c" / "mnist") == []


def test_fetch_file_times_out(tmp_path):
    # A server that accepts connections but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        with pytest.raises(data.DownloadError, match=r"timed out"):
            data.fetch_file(LABELS, dataset="mnist", cache_dir=tmp_path / "c", mirrors=[url],
                            sha256="0" * 64, timeout=0.3)
    assert files_in(tmp_path / "c" / "mnist") == []


def test_fetch_file_respects_the_mirrors_environment_variable(tmp_path, server, monkeypatch):
    root, url = server
    digest = serve_labels(root)
    monkeypatch.setenv("JAXCNN_MIRRORS", f"{closed_port_url()}, {url}")
    path = data.fetch_file(LABELS, dataset="mnist", cache_dir=tmp_path / "c", sha256=digest)
    assert sha256(path) == digest


def test_fetch_file_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"fetch_file: dataset must be one of \('mnist', "
                                         r"'fashion_mnist'\); got 'synthetic'"):
        data.fetch_file(LABELS, dataset="synthetic")
    with pytest.raises(ValueError, match=r"fetch_file: no SHA-256 known for 'x.gz' of mnist"):
        data.fetch_file("x.gz", dataset="mnist", cache_dir=tmp_path)


def test_load_dataset_downloads_into_the_cache(tmp_path, server, monkeypatch):
    root, url = server
    paths = write_idx_files(root, fake_mnist())
    for path in paths.values():
        monkeypatch.setitem(_download._SHA256["mnist"], path.name, sha256(path))
    monkeypatch.setenv("JAXCNN_MIRRORS", url)
    ds = data.load_dataset("mnist")
    assert ds.train_x.shape == (64, 28, 28, 1)
    cached = tmp_path / "xdg-cache" / "jaxcnn" / "mnist"
    assert files_in(cached) == sorted(p.name for p in paths.values())
    # The second load reads the cache: no server needed.
    monkeypatch.setenv("JAXCNN_MIRRORS", closed_port_url())
    assert data.load_dataset("mnist").test_x.shape == (32, 28, 28, 1)


def test_load_dataset_download_failure_is_file_not_found(tmp_path, offline):
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("fashion_mnist", data_dir=tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path) in message
    assert offline + "train-images-idx3-ubyte.gz" in message  # the URL that failed
    assert isinstance(info.value.__cause__, data.DownloadError)


# ------------------------------------------------------------------------------------------
# A failed start names what is missing and creates nothing.


def tree(root):
    """Every path under `root`, relative to it: what a call left on disk."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("download", [True, False])
@pytest.mark.parametrize("layout", ["subdir", "flat"])
def test_one_missing_file_in_a_data_dir_is_named_and_nothing_is_created(tmp_path, layout,
                                                                         download):
    data_dir = tmp_path / "data"
    holder = data_dir / "mnist" if layout == "subdir" else data_dir
    paths = write_idx_files(holder, fake_mnist())
    paths["test_y"].unlink()
    before = tree(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("mnist", data_dir=data_dir, download=download)
    message = str(info.value)
    assert re.search(r"load_dataset: the mnist file t10k-labels-idx1-ubyte\.gz \(gzipped, or "
                     r"unzipped without \.gz\) is missing from " + re.escape(str(holder)) +
                     r", which holds train-images-idx3-ubyte\.gz, train-labels-idx1-ubyte\.gz, "
                     r"t10k-images-idx3-ubyte\.gz", message), message
    other = data_dir if layout == "subdir" else data_dir / "mnist"
    assert f"also looked in {other}" in message
    assert message.count("t10k-labels-idx1-ubyte") == 1   # only the missing file is "missing"
    assert "never completed by a download" in message
    assert message.endswith(f"and place it in {holder}")
    assert info.value.__cause__ is None                     # no download was tried
    assert tree(tmp_path) == before                         # not even the cache directory


def test_two_missing_files_are_both_named(tmp_path):
    paths = write_idx_files(tmp_path, fake_mnist())
    paths["train_x"].unlink()
    paths["test_x"].unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"the mnist files train-images-idx3-ubyte\.gz, t10k-images-idx3-"
                             r"ubyte\.gz \(gzipped, or unzipped without \.gz\) are missing from "):
        data.load_dataset("mnist", data_dir=tmp_path)


def test_all_missing_and_downloads_refused_creates_nothing(tmp_path, offline):
    before = tree(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("mnist")
    message = str(info.value)
    assert "the mnist files train-images-idx3-ubyte.gz, " in message
    assert offline + "t10k-labels-idx1-ubyte.gz" not in message  # stopped at the first file
    assert re.search(re.escape(offline + "train-images-idx3-ubyte.gz") + r": .*refused", message)
    assert not (tmp_path / "xdg-cache").exists()
    assert tree(tmp_path) == before


def test_all_missing_in_a_data_dir_and_downloads_refused_creates_nothing(tmp_path, offline):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(offline + "train-images")):
        data.load_dataset("mnist", data_dir=data_dir)
    assert tree(tmp_path) == ["data"]                       # no data/mnist left behind


def test_a_download_that_fails_halfway_keeps_nothing(tmp_path, server, monkeypatch):
    root, url = server
    paths = write_idx_files(root, fake_mnist())
    for path in paths.values():
        monkeypatch.setitem(_download._SHA256["mnist"], path.name, sha256(path))
    paths["test_x"].unlink()          # the third file of four cannot be fetched
    monkeypatch.setenv("JAXCNN_MIRRORS", url)
    with pytest.raises(FileNotFoundError, match=re.escape(url + "t10k-images-idx3-ubyte.gz") +
                       r": HTTP 404"):
        data.load_dataset("mnist")
    assert not (tmp_path / "xdg-cache").exists()            # the first two were removed again


def test_a_partial_cache_is_completed(tmp_path, server, monkeypatch):
    root, url = server
    served = write_idx_files(root, fake_mnist())
    for path in served.values():
        monkeypatch.setitem(_download._SHA256["mnist"], path.name, sha256(path))
    cached = tmp_path / "xdg-cache" / "jaxcnn" / "mnist"
    kept = write_idx_files(cached, fake_mnist())            # the same files: same checksums
    kept["train_y"].unlink()                                # an earlier start was cut off here
    for key in ("train_x", "test_x", "test_y"):
        served[key].unlink()                                # only the missing file can be fetched
    monkeypatch.setenv("JAXCNN_MIRRORS", url)
    ds = data.load_dataset("mnist")
    np.testing.assert_array_equal(ds.train_y, fake_mnist()["train_y"])
    assert files_in(cached) == sorted(p.name for p in kept.values())


def test_a_partial_cache_that_cannot_be_completed_names_the_file_and_keeps_the_rest(tmp_path):
    cached = tmp_path / "xdg-cache" / "jaxcnn" / "mnist"
    kept = write_idx_files(cached, fake_mnist())
    kept["train_y"].unlink()
    with pytest.raises(FileNotFoundError, match=r"the mnist file train-labels-idx1-ubyte\.gz "
                                                r".* is missing from " + re.escape(str(cached))):
        data.load_dataset("mnist")
    assert files_in(cached) == sorted(p.name for k, p in kept.items() if k != "train_y")


# ------------------------------------------------------------------------------------------
# Batches.


def make_xy(n=100):
    y = np.arange(n, dtype=np.int32)
    x = (10 * y).astype(np.float32).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 1), np.float32)
    return x, y


def order_of(n, batch_size, **kwargs):
    x, y = make_xy(n)
    return np.concatenate([yb for _, yb in data.batches(x, y, batch_size, **kwargs)])


def test_batches_order_is_a_function_of_seed_and_epoch():
    np.testing.assert_array_equal(order_of(100, 10, seed=1, epoch=2),
                                  order_of(100, 10, seed=1, epoch=2))
    reference = order_of(100, 10, seed=1, epoch=2)
    assert not np.array_equal(reference, order_of(100, 10, seed=1, epoch=3))
    assert not np.array_equal(reference, order_of(100, 10, seed=2, epoch=2))
    expected = np.random.default_rng([1, 2]).permutation(100)
    np.testing.assert_array_equal(order_of(100, 10, seed=1, epoch=2), expected)


def test_batches_keep_x_and_y_aligned():
    x, y = make_xy(50)
    for xb, yb in data.batches(x, y, 8, seed=3):
        np.testing.assert_array_equal(xb[:, 0, 0, 0], 10 * yb)


def test_batches_drop_last_counts_and_shapes():
    x, y = make_xy(100)
    full = list(data.batches(x, y, 32))
    assert len(full) == 3 == data.num_batches(100, 32)
    assert all(xb.shape == (32, 2, 2, 1) and yb.shape == (32,) for xb, yb in full)
    partial = list(data.batches(x, y, 32, drop_last=False))
    assert len(partial) == 4 == data.num_batches(100, 32, drop_last=False)
    assert [len(yb) for _, yb in partial] == [32, 32, 32, 4]


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_without_drop_last_see_every_example_once(shuffle):
    order = order_of(101, 7, shuffle=shuffle, drop_last=False, epoch=4)
    np.testing.assert_array_equal(np.sort(order), np.arange(101))
    if not shuffle:
        np.testing.assert_array_equal(order, np.arange(101))


def test_batches_partial_batch_larger_than_n():
    x, y = make_xy(5)
    (xb, yb), = data.batches(x, y, 8, drop_last=False)
    assert len(yb) == 5


def test_batches_argument_errors():
    x, y = make_xy(64)
    # Raised at the call, not at the first next().
    with pytest.raises(ValueError, match=r"batches: batch_size must be >= 1; got 0"):
        data.batches(x, y, 0)
    with pytest.raises(TypeError, match=r"batches: batch_size must be an int; got float 2.5"):
        data.batches(x, y, 2.5)
    with pytest.raises(TypeError, match=r"batches: batch_size must be an int; got bool True"):
        data.batches(x, y, True)
    with pytest.raises(ValueError, match=r"batches: batch_size \(65\) must be <= the number of "
                                         r"examples \(64\)"):
        data.batches(x, y, 65)
    with pytest.raises(ValueError, match=r"batches: x and y must have the same first dimension; "
                                         r"got x of shape \(64, 2, 2, 1\) and y of shape \(63,\)"):
        data.batches(x, y[:63], 8)
    with pytest.raises(ValueError, match=r"batches: epoch must be >= 0; got -1"):
        data.batches(x, y, 8, epoch=-1)


@pytest.mark.parametrize("kwargs", [dict(seed=1, epoch=2), dict(shuffle=False),
                                    dict(drop_last=False, epoch=5)])
def test_batch_indices_are_the_rows_of_batches(kwargs):
    x, y = make_xy(50)
    indices = list(data.batch_indices(50, 8, **kwargs))
    gathered = list(data.batches(x, y, 8, **kwargs))
    assert len(indices) == len(gathered) and all(i.dtype.kind == "i" for i in indices)
    for idx, (xb, yb) in zip(indices, gathered):
        np.testing.assert_array_equal(x[idx], xb)
        np.testing.assert_array_equal(y[idx], yb)
    # One process of a multi-process run loads only its rows; together they make the batch.
    idx = indices[0]
    np.testing.assert_array_equal(np.concatenate([x[idx[:4]], x[idx[4:]]]), gathered[0][0])
    with pytest.raises(ValueError, match=r"batch_indices: batch_size \(51\) must be <= the "
                                         r"number of examples \(50\)"):
        data.batch_indices(50, 51)
    with pytest.raises(ValueError, match=r"batch_indices: n must be >= 0; got -1"):
        data.batch_indices(-1, 8)


def test_num_batches():
    assert data.num_batches(0, 5) == 0
    assert data.num_batches(10, 5) == 2 and data.num_batches(11, 5) == 2
    assert data.num_batches(11, 5, drop_last=False) == 3
    with pytest.raises(ValueError, match=r"num_batches: batch_size must be >= 1; got -2"):
        data.num_batches(10, -2)
    with pytest.raises(TypeError, match=r"num_batches: n must be an int; got str '10'"):
        data.num_batches("10", 2)
