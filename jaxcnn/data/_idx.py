"""IDX files (the format of MNIST and Fashion-MNIST): reading one; finding or fetching all four.

A dataset's four files are looked for in ``data_dir/<name>/`` and then ``data_dir`` when a
`data_dir` is given, else in ``cache_dir()/<name>/``. Missing ones are downloaded (with checked
SHA-256, see `_download`) into ``data_dir/<name>/`` or the cache, all four or none.
"""

from __future__ import annotations

import contextlib
import gzip
import pathlib
import zlib
from typing import NamedTuple

import numpy as np

from . import _download

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

# IDX type code (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzipped or plain; gzip is recognised by its content) into an array.

    The format: a magic number of four bytes -- two zero bytes, a type code (0x08 uint8,
    0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64) and the number of
    dimensions -- then each dimension as a big-endian uint32, then the data, big-endian, in
    C order.

    Returns:
      an array of the file's shape and type, in native byte order.

    Raises:
      ValueError: naming the file, for a corrupt gzip stream, a bad magic number, an unknown
        type code, a truncated header, or data that is shorter or longer than the dimensions
        say.
    """
    path = pathlib.Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(
            f"read_idx: {path} is truncated: an IDX file starts with a 4-byte magic number; "
            f"the file has {len(raw)} bytes"
        )
    if raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"read_idx: {path} has a bad magic number 0x{raw[:4].hex()}: expected two zero "
            f"bytes, a type code in {{{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}}} and the "
            f"number of dimensions (e.g. 0x00000803 for uint8 images)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"read_idx: {path} is truncated: its magic number announces {ndim} dimensions, "
            f"which need a {header}-byte header; the file has {len(raw)} bytes"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        problem = "is truncated" if len(raw) - header < expected else "is too long"
        raise ValueError(
            f"read_idx: {path} {problem}: dimensions {shape} of {dtype.name} need {expected} "
            f"bytes of data after the {header}-byte header; got {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _read_bytes(path: pathlib.Path) -> bytes:
    """The bytes of `path`, decompressed if it is gzipped (starts with 0x1f 0x8b)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"read_idx: {path} is not a valid gzip file: {err}") from err


# ------------------------------------------------------------------------------------------
# Finding the four files of a dataset, or downloading them.


class _Search(NamedTuple):
    """Where the files of one dataset were looked for, and which of them each place holds."""

    name: str
    dirs: list[pathlib.Path]
    found: list[dict[str, pathlib.Path]]  # per directory: key of `_IDX_FILES` -> existing file

    @property
    def best(self) -> int:
        """Index of the directory holding the most files (the first of them on a tie)."""
        return max(range(len(self.dirs)), key=lambda i: len(self.found[i]))

    @property
    def missing(self) -> list[str]:
        """Names (``.gz``) of the files the best directory lacks."""
        have = self.found[self.best]
        return [stem + ".gz" for key, stem in _IDX_FILES.items() if key not in have]


def find_idx_files(name, data_dir, download) -> dict[str, pathlib.Path]:
    """Paths of the four IDX files of `name`: found in one search directory, or downloaded.

    A `data_dir` that holds some of the four files but not all of them is refused, and the
    message names the missing ones: it is not completed by a download. Its files are the
    user's, of unknown origin (a subset, a custom set in the same format, another release),
    and completing them with a downloaded file could pair one set's images with another's
    labels; one missing file is far more likely misplaced or misnamed. The download cache is
    different: every file in it was fetched and checked by `fetch_file`, and one can be
    missing only when an earlier start was killed mid-download, so a partial cache is
    completed (`fetch_file` checks the files already there again).

    A download is all or nothing: when any file cannot be fetched, the files and directories
    this call created are removed again, so a failed start leaves the disk as it was.
    """
    dirs = _search_dirs(name, data_dir)
    search = _Search(name, dirs, [_found_in(d) for d in dirs])
    for found in search.found:
        if len(found) == len(_IDX_FILES):
            return found
    one = len(search.missing) == 1
    if data_dir is not None and search.found[search.best]:
        raise FileNotFoundError(_not_found_message(search, (
            f"files in a data_dir (--data-dir) are never completed by a download, which could "
            f"mix them with files of another origin. Download {'it' if one else 'them'} by "
            f"hand")))
    if not download:
        raise FileNotFoundError(_not_found_message(search, (
            f"download=False, so nothing was fetched. Run with download=True, or download "
            f"{'it' if one else 'them'}")))
    try:
        return _download_all(name, data_dir)
    except _download.DownloadError as err:
        raise FileNotFoundError(_not_found_message(search, (
            f"downloading failed.\n{err}\nDownload {'it' if one else 'them'} by hand"))) from err


def _search_dirs(name, data_dir) -> list[pathlib.Path]:
    """Directories that may hold the IDX files of `name`, in the order they are tried."""
    if data_dir is None:
        return [_download.cache_dir() / name]
    data_dir = pathlib.Path(data_dir).expanduser()
    return [data_dir / name, data_dir]


def _found_in(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """The IDX files of a dataset that `directory` holds: key of `_IDX_FILES` -> path."""
    found = {key: _existing(directory / stem) for key, stem in _IDX_FILES.items()}
    return {key: path for key, path in found.items() if path is not None}


def _existing(stem: pathlib.Path):
    """`stem.gz` if it exists, else `stem` if it exists, else None."""
    for candidate in (stem.with_name(stem.name + ".gz"), stem):
        if candidate.is_file():
            return candidate
    return None


def _not_found_message(search: _Search, reason) -> str:
    """The FileNotFoundError text: which files, where we looked (and what is there), why none
    were fetched, and where to get them."""
    files, have = ", ".join(search.missing), search.found[search.best]
    mirrors = _download._mirrors(search.name, None)
    others = f" (or another mirror: {', '.join(mirrors[1:])})" if len(mirrors) > 1 else ""
    if have:
        where = search.dirs[search.best]
        rest = [str(d) for d in search.dirs if d != where]
        also = (f"; also looked in {' and '.join(rest)} (all four must be in one directory)"
                if rest else "")
        one = len(search.missing) == 1
        what = (f"the {search.name} file{'' if one else 's'} {files} (gzipped, or unzipped "
                f"without .gz) {'is' if one else 'are'} missing from {where}, which holds "
                f"{', '.join(p.name for p in have.values())}{also}")
    else:
        where = search.dirs[0]
        what = (f"the {search.name} files {files} (gzipped, or unzipped without .gz) were not "
                f"found in {' or '.join(str(d) for d in search.dirs)}")
    return (f"load_dataset: {what}; {reason} from {mirrors[0]}{others} and place "
            f"{'it' if len(search.missing) == 1 else 'them'} in {where}")


def _download_all(name, data_dir) -> dict[str, pathlib.Path]:
    """Download the four files of `name` into ``data_dir/<name>/`` or the cache: all or none."""
    root = None if data_dir is None else pathlib.Path(data_dir).expanduser()
    target = (_download.cache_dir() if root is None else root) / name
    names = {key: stem + ".gz" for key, stem in _IDX_FILES.items()}
    with _removed_on_failure(target, names.values()):
        return {
            key: _download.fetch_file(filename, dataset=name, cache_dir=root)
            for key, filename in names.items()
        }


@contextlib.contextmanager
def _removed_on_failure(directory: pathlib.Path, filenames):
    """On an exception, remove the `filenames` in `directory` and the directories up to it
    that did not exist on entry (a directory only if it is empty), then re-raise."""
    created = [d for d in (directory, *directory.parents) if not d.exists()]
    new = [directory / f for f in filenames if not (directory / f).exists()]
    try:
        yield
    except BaseException:
        for path in new:
            path.unlink(missing_ok=True)
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
