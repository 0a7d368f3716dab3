"""Checked downloads of the IDX files: mirrors, published SHA-256, `fetch_file`, `cache_dir`.

A file is fetched from the first mirror that delivers it with the published SHA-256, written to a
temporary file beside its target and renamed into place only once verified, so a cached file is
either absent or complete and checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pathlib
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

from .. import _io


class DownloadError(OSError):
    """No mirror delivered a file whose SHA-256 matches; the message lists every URL tried."""


_MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# Published SHA-256 of the distributed files (the same digests torchvision and the
# Fashion-MNIST downloaders pin).
_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

MIRRORS_ENV = "JAXCNN_MIRRORS"
_TIMEOUT = 30.0  # seconds without data before a mirror counts as failed
_BLOCK = 1 << 16


def cache_dir() -> pathlib.Path:
    """Where downloads are kept: ``$XDG_CACHE_HOME/jaxcnn``, or ``~/.cache/jaxcnn``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxcnn"


_default_cache_dir = cache_dir  # `fetch_file`'s argument of the same name hides the function


def fetch_file(
    filename: str,
    *,
    dataset: str,
    cache_dir=None,
    mirrors: Sequence[str] | None = None,
    sha256: str | Mapping[str, str] | None = None,
    timeout: float = _TIMEOUT,
) -> pathlib.Path:
    """Return the path of ``<cache_dir>/<dataset>/<filename>``, downloading it if needed.

    A file already there is kept if its SHA-256 matches, and fetched again otherwise. The
    mirrors are tried in order; a mirror fails on any network or HTTP error, a timeout, or a
    checksum mismatch, and the next one is tried. A download goes to a temporary file in the
    target directory which is renamed into place only after its SHA-256 matched, so the target
    is either absent or complete and verified; nothing is left behind on failure. A progress
    bar is shown when stderr is a terminal.

    Args:
      filename: e.g. ``"train-images-idx3-ubyte.gz"``.
      dataset: ``"mnist"`` or ``"fashion_mnist"``: picks the default mirrors and checksums and
        names the subdirectory.
      cache_dir: root directory; default `cache_dir()`.
      mirrors: base URLs, each joined with `filename`. Default: the ``JAXCNN_MIRRORS``
        environment variable (comma-separated base URLs) if set, else the dataset's mirrors.
      sha256: expected hex digest of this file, or a mapping filename -> digest. Default: the
        published digests.
      timeout: seconds a mirror may stay silent before it counts as failed.

    Raises:
      DownloadError: every mirror failed; the message gives each URL and why (for a checksum
        mismatch: the expected and the actual digest).
      ValueError: unknown dataset or a file without a known checksum.
    """
    if dataset not in _MIRRORS:
        raise ValueError(
            f"fetch_file: dataset must be one of {tuple(_MIRRORS)}; got {dataset!r}"
        )
    expected = _expected_sha256(filename, dataset, sha256)
    root = _default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir).expanduser()
    target = root / dataset / filename
    if target.is_file() and _sha256_of(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for base in _mirrors(dataset, mirrors):
        url = base.rstrip("/") + "/" + filename
        try:
            _download(url, target, expected, timeout)
            return target
        except (OSError, ValueError, http.client.HTTPException) as err:
            failures.append(f"  {url}: {_describe(err)}")
    raise DownloadError(
        f"fetch_file: could not download {filename} for {dataset} into {target.parent}; "
        f"every mirror failed:\n" + "\n".join(failures)
    )


def _expected_sha256(filename, dataset, sha256) -> str:
    """The digest `filename` must have: from the `sha256` override or the published table."""
    if isinstance(sha256, str):
        return sha256.lower()
    table = _SHA256[dataset] if sha256 is None else sha256
    if filename not in table:
        raise ValueError(
            f"fetch_file: no SHA-256 known for {filename!r} of {dataset}; known files: "
            f"{sorted(table)}; pass sha256= to download another file"
        )
    return table[filename].lower()


def _mirrors(dataset, mirrors) -> list[str]:
    """Base URLs to try: the `mirrors` argument, else $JAXCNN_MIRRORS, else the defaults."""
    if mirrors is None:
        env = os.environ.get(MIRRORS_ENV, "")
        mirrors = [m.strip() for m in env.split(",") if m.strip()] or _MIRRORS[dataset]
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    return list(mirrors)


class _ChecksumMismatch(ValueError):
    """A downloaded file's SHA-256 differs from the expected one."""


def _download(url, target: pathlib.Path, expected, timeout):
    """Download `url` to `target` atomically, keeping it only if its SHA-256 is `expected`."""

    def write(f):
        with urllib.request.urlopen(url, timeout=timeout) as response:
            actual = _copy_with_digest(response, f, _content_length(response), target.name)
        if actual != expected:
            raise _ChecksumMismatch(
                f"checksum mismatch: expected sha256 {expected}, got {actual}"
            )

    _io.atomic_write(target, write)


def _copy_with_digest(source, sink, total, label) -> str:
    """Copy `source` to `sink` block by block, with a progress bar; return the SHA-256."""
    digest = hashlib.sha256()
    with _progress(total, label) as bar:
        while block := source.read(_BLOCK):
            sink.write(block)
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _content_length(response):
    """The response's Content-Length as an int, or None."""
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _progress(total, label):
    """A tqdm bar on stderr, shown only when stderr is a terminal; a no-op without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    disable = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=disable)


class _NoProgress(contextlib.nullcontext):
    """Stands in for a progress bar."""

    def update(self, _):
        pass


def _sha256_of(path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _describe(err: BaseException) -> str:
    """A one-line reason for a failed download."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        return f"{type(err.reason).__name__}: {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"URLError: {err.reason}"
    if isinstance(err, _ChecksumMismatch):
        return str(err)
    return f"{type(err).__name__}: {err}"

