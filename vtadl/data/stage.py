"""Copies of HDF5 packs on a node's local disk (`data.local_copy`).

On a cluster the packs live on a shared file system (NFS, EFS, ...) and every training worker
reads them at random: thousands of small reads per epoch over the network. With
`--local-copy DIR` each node copies the pack into DIR once and reads the copy. A copy is
checked against its source by size and modification time (recorded beside it after the copy
was verified by SHA-256), so reusing it costs a stat; a source that changed (repacked data)
is copied again. Concurrent workers on one node share one copy, serialised by a file lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path

from vtadl.exceptions import DataError

log = logging.getLogger(__name__)

CHUNK = 8 * 2**20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def local_copy(source: str | Path, folder: str | Path) -> Path:
    """The node-local copy of `source` in `folder`, copied (again) if missing or stale."""
    source, folder = Path(source), Path(folder)
    if not source.is_file():
        raise DataError(f"pack not found: {source}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the local copy folder {folder}: {exc.strerror}") from None
    # One copy per source path: two packs of the same name from different folders do not mix.
    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
    target = folder / f"{source.stem}-{key}{source.suffix}"
    record = target.with_suffix(".json")
    with open(folder / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = _stamp(source)
        if target.is_file() and record.is_file():
            try:
                kept = json.loads(record.read_text())
            except ValueError:
                kept = {}
            if {k: kept.get(k) for k in stamp} == stamp and target.stat().st_size == stamp["size"]:
                return target
            log.warning("local copy %s is stale (its source %s changed); copying again",
                        target, source)  # fmt: skip
        _copy_verified(source, target, record, stamp)
    return target


def _copy_verified(source: Path, target: Path, record: Path, stamp: dict) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    record.unlink(missing_ok=True)
    try:
        digest = hashlib.sha256()
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            while block := src.read(CHUNK):
                digest.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        expected = digest.hexdigest()
        if sha256(tmp) != expected:
            raise DataError(f"the local copy of {source} in {target.parent} does not match it")
        if _stamp(source) != stamp:
            raise DataError(f"pack {source} changed while it was being copied; try again")
        tmp.replace(target)
    except OSError as exc:
        raise DataError(f"cannot copy {source} to {target.parent}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    record.write_text(json.dumps({**stamp, "sha256": expected}))
    log.info("copied %s to %s (sha256 %s)", source, target, expected[:12])
