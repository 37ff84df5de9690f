"""MNIST in the one-class protocol of the VT-ADL paper, read from the standard IDX files.

    <root>/train-images-idx3-ubyte[.gz]   <root>/train-labels-idx1-ubyte[.gz]
    <root>/t10k-images-idx3-ubyte[.gz]    <root>/t10k-labels-idx1-ubyte[.gz]

The category is one digit ("0".."9"), the normal class. Training samples are the training
images of that digit; the test split is the whole test set, the other digits being anomalies
(label 1, defect type "digit_<d>", no mask). A sample's `image` is the IDX file and its
`index` the record number. Files are recognised as gzip by their first bytes, not their name.
"""

from __future__ import annotations

import functools
import gzip
import logging
import zlib
from pathlib import Path

import numpy as np

from vtadl.data.folder import check_root
from vtadl.data.samples import NORMAL, Problem, Sample
from vtadl.exceptions import DataError

logger = logging.getLogger(__name__)

MNIST_DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def _open(path: Path):
    with path.open("rb") as f:
        head = f.read(2)
    return gzip.open(path, "rb") if head == _GZIP_MAGIC else path.open("rb")


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"IDX file {path} does not exist")
    try:
        with _open(path) as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None


def parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Decode the bytes of an unsigned-byte IDX file; any inconsistency is a DataError."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != _UBYTE:
        raise DataError(f"{path}: IDX element type 0x{data[2]:02x} is not unsigned byte")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: IDX header is truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DataError(
            f"{path}: IDX file of shape {shape} should hold {expected} bytes, found {len(data)}"
            + (" (truncated)" if len(data) < expected else "")
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=4)
def _cached_idx(path: str, size: int, mtime_ns: int) -> np.ndarray:
    return parse_idx(_read_bytes(Path(path)), Path(path))


def read_idx(path: str | Path) -> np.ndarray:
    """The whole array of an IDX file (read-only, cached until the file changes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {path} does not exist")
    stat = path.stat()
    return _cached_idx(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool = False) -> Path:
    """Write a uint8 array as an IDX file (gzipped when `compress`)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    path = Path(path)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def find_mnist_files(root: str | Path) -> dict[str, Path]:
    """The four IDX files under `root`, uncompressed preferred; a missing one is a DataError."""
    root = check_root(root)
    found = {}
    for key, name in MNIST_FILES.items():
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            raise DataError(f"MNIST file {root / name}[.gz] does not exist")
    return found


def _check_digit(category: str) -> int:
    if category not in MNIST_DIGITS:
        raise DataError(f"MNIST category must be a digit 0-9, got {category!r}")
    return int(category)


def scan_mnist(root: str | Path, category: str) -> tuple[list[Sample], list[Problem]]:
    """Samples and problems; a missing or unreadable file is raised at once."""
    digit = _check_digit(category)
    files = find_mnist_files(root)
    arrays = {key: read_idx(path) for key, path in files.items()}
    problems: list[Problem] = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(
                f"{files[split + '_images']} must hold (N, H, W) images and "
                f"{files[split + '_labels']} (N,) labels, found {images.shape} and {labels.shape}"
            )
        if len(images) != len(labels):
            problems.append(
                Problem(
                    "error",
                    files[f"{split}_labels"],
                    f"{files[split + '_labels']} has {len(labels)} labels for "
                    f"{len(images)} images in {files[split + '_images']}",
                )
            )
        if labels.size and int(labels.max()) > 9:
            problems.append(
                Problem(
                    "error",
                    files[f"{split}_labels"],
                    f"{files[split + '_labels']} has label {int(labels.max())}, expected 0-9",
                )
            )
    train_labels, test_labels = arrays["train_labels"], arrays["test_labels"]
    samples = [
        Sample(files["train_images"], "train", 0, NORMAL, None, int(i))
        for i in np.flatnonzero(train_labels == digit)
    ]
    if not samples:
        problems.append(
            Problem("error", files["train_labels"], f"no training image of digit {digit}")
        )
    samples += [
        Sample(
            files["test_images"],
            "test",
            int(d != digit),
            NORMAL if d == digit else f"digit_{d}",
            None,
            i,
        )
        for i, d in enumerate(test_labels.tolist())
    ]
    return samples, problems


def index_mnist(root: str | Path, category: str) -> list[Sample]:
    """Training images of digit `category`, then the whole test set in file order."""
    samples, problems = scan_mnist(root, category)
    for problem in problems:
        if problem.severity == "error":
            raise DataError(problem.message)
    n_train = sum(s.split == "train" for s in samples)
    logger.info(
        "mnist/%s: %d train, %d test images (%d anomalous)",
        category,
        n_train,
        len(samples) - n_train,
        sum(s.label for s in samples),
    )
    return samples
