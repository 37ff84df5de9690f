"""Fetching a dataset's published files, verifying their SHA-256, and extracting them safely.

Everything is fetched and extracted inside a temporary folder under the target root; only a
verified, fully extracted result is renamed into place, so a wrong hash, a broken archive
or an interrupted transfer leaves the root as it was. Archive members that would land
outside the target (absolute paths, `..`, links pointing out, device files) are refused
before anything is written. Any URL that urllib opens works, `file://` included.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vtadl.data.mnist import MNIST_FILES
from vtadl.exceptions import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    url: str
    sha256: str


# The archive locations and hashes published with anomalib's datamodules (see datasets/*.md).
ARCHIVES: dict[str, Archive] = {
    "mvtec": Archive(
        "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f283/"
        "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz",
        "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
    ),
    "btad": Archive(
        "https://avires.dimi.uniud.it/papers/btad/btad.zip",
        "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
    ),
}
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}
_CHUNK = 1 << 20


def fetch(url: str, dest: Path, sha256: str) -> Path:
    """Copy `url` to `dest`, refusing it (and deleting `dest`) unless its SHA-256 matches."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if total and done % (256 * _CHUNK) < _CHUNK:
                    logger.info("%s: %d of %d MB", url, done >> 20, total >> 20)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        dest.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"cannot download {url}: {reason}") from None
    if digest.hexdigest() != sha256.lower():
        dest.unlink(missing_ok=True)
        raise DataError(
            f"{url} has SHA-256 {digest.hexdigest()}, expected {sha256}; refused, nothing extracted"
        )
    return dest


def _escapes(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")


def _check_tar(tar: tarfile.TarFile, archive: Path) -> None:
    for m in tar.getmembers():
        if _escapes(m.name):
            raise DataError(f"{archive}: member {m.name!r} would be written outside the target")
        if m.isdev():
            raise DataError(f"{archive}: member {m.name!r} is a device file")
        if m.issym() or m.islnk():
            base = str(PurePosixPath(m.name).parent) if m.issym() else ""
            target = os.path.normpath(os.path.join(base, m.linkname))
            if m.linkname.startswith("/") or _escapes(target):
                raise DataError(
                    f"{archive}: link {m.name!r} -> {m.linkname!r} points outside the target"
                )


def _check_zip(archive_zip: zipfile.ZipFile, archive: Path) -> None:
    for info in archive_zip.infolist():
        if _escapes(info.filename):
            raise DataError(f"{archive}: member {info.filename!r} would be written outside")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise DataError(f"{archive}: member {info.filename!r} is a symbolic link")


def extract(archive: Path, dest: Path) -> None:
    """Extract a zip or tar (plain, gz, bz2, xz) archive after checking every member."""
    if zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as z:
                _check_zip(z, archive)
                z.extractall(dest)
        except (zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"cannot extract {archive}: {exc}") from None
    elif tarfile.is_tarfile(archive):
        try:
            with tarfile.open(archive) as tar:
                _check_tar(tar, archive)
                tar.extractall(dest, filter="data")
        except (tarfile.TarError, EOFError) as exc:
            raise DataError(f"cannot extract {archive}: {exc}") from None
    else:
        raise DataError(f"{archive} is neither a zip nor a tar archive")


def _content(extracted: Path) -> Path:
    """The archive's single top folder when it has one, else the extraction folder."""
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted


def _move_into(entries: list[Path], root: Path) -> None:
    clashes = [str(root / e.name) for e in entries if (root / e.name).exists()]
    if clashes:
        raise DataError(f"refusing to overwrite {', '.join(clashes)}; move it away first")
    for entry in entries:
        os.replace(entry, root / entry.name)


def _mnist_hashes(sha256: str | Mapping[str, str] | None) -> Mapping[str, str]:
    if sha256 is None:
        return MNIST_SHA256
    if isinstance(sha256, str):
        raise DataError("MNIST is four files: give their SHA-256 as a mapping of file name to hash")
    missing = sorted(set(MNIST_SHA256) - set(sha256))
    if missing:
        raise DataError(f"no SHA-256 given for {', '.join(missing)}")
    return sha256


def download(
    dataset: str,
    root: str | Path,
    url: str | None = None,
    sha256: str | Mapping[str, str] | None = None,
) -> Path:
    """Fetch `dataset` into `root` (created if needed); returns `root`.

    `url` replaces the published location (for MNIST, the folder URL the four files are
    under) and `sha256` the published hash (for MNIST, a mapping file name -> hash). Names
    already present under `root` are never overwritten.
    """
    if dataset != "mnist" and dataset not in ARCHIVES:
        known = ", ".join(sorted([*ARCHIVES, "mnist"]))
        raise DataError(f"no download known for dataset {dataset!r} (known: {known})")
    root = Path(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".vtadl-download-", dir=root))
    try:
        if dataset == "mnist":
            base = (url or MNIST_URL).rstrip("/") + "/"
            hashes = _mnist_hashes(sha256)
            files = [
                fetch(base + f"{n}.gz", work / f"{n}.gz", hashes[f"{n}.gz"])
                for n in MNIST_FILES.values()
            ]
            _move_into(files, root)
        else:
            source = ARCHIVES[dataset]
            archive = fetch(url or source.url, work / "archive", sha256 or source.sha256)
            extracted = work / "extracted"
            extract(archive, extracted)
            _move_into(sorted(_content(extracted).iterdir()), root)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(root.iterdir()):
            root.rmdir()
        raise
    shutil.rmtree(work, ignore_errors=True)
    logger.info("%s downloaded and verified into %s", dataset, root)
    return root
