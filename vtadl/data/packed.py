"""Reading HDF5 packs (see `vtadl.data.pack` for what a pack holds and how it is written).

Every reader checks the file first (`open_pack`): a missing, truncated, foreign, unfinished
or mismatched pack is a one-line DataError naming the file, never an h5py traceback.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from vtadl.data.prepare import split_samples
from vtadl.data.samples import Sample
from vtadl.exceptions import DataError

FORMAT, FORMAT_VERSION = "vtadl-pack", 1
_REQUIRED = ("images", "labels", "splits", "defects", "names", "mask_names", "records", "shapes")


def open_pack(path: str | Path, expect: dict[str, Any] | None = None) -> h5py.File:
    """Open a pack read-only after checking it is whole and, with `expect`, its parameters.

    `expect` maps parameter names (dataset, category, image_size, tile, tile_overlap) to the
    values a run needs; any difference is a DataError naming each one.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pack {path} does not exist")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"pack {path} is truncated or not an HDF5 file ({reason})") from None
    try:
        if f.attrs.get("format") != FORMAT:
            raise DataError(f"{path} is an HDF5 file but not a vtadl pack")
        if f.attrs.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"pack {path} has format version {f.attrs.get('format_version')}, "
                f"this vtadl reads {FORMAT_VERSION}; pack the category again"
            )
        missing = [k for k in _REQUIRED if k not in f]
        if missing or not f.attrs.get("complete", False):
            raise DataError(f"pack {path} is incomplete (missing {', '.join(missing) or 'end'})")
        if len({len(f[k]) for k in _REQUIRED}) != 1:
            raise DataError(f"pack {path} is corrupt: its datasets differ in length")
        attrs = pack_attrs(f)
        wrong = [
            f"{k}={attrs.get(k)!r} (expected {v!r})"
            for k, v in (expect or {}).items()
            if attrs.get(k) != v
        ]
        if wrong:
            raise DataError(f"pack {path} was built with {', '.join(wrong)}; pack it again")
    except (OSError, KeyError, RuntimeError) as exc:
        f.close()
        raise DataError(f"pack {path} is corrupt ({exc})") from None
    except BaseException:
        f.close()
        raise
    return f


def pack_attrs(f: h5py.File) -> dict[str, Any]:
    """The pack's attributes as plain Python values."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in f.attrs.items()}


@dataclass(frozen=True)
class PackIndex:
    """What a pack holds, row by row, without the pixels."""

    names: list[str]
    mask_names: list[str]
    labels: np.ndarray
    splits: list[str]
    defects: list[str]
    records: np.ndarray
    shapes: np.ndarray
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]

    def samples(self, root: str | Path | None = None) -> list[Sample]:
        """Sample records of the rows, with paths under `root` (default: the packing root)."""
        root = Path(root if root is not None else self.attrs["source_root"])
        out = []
        for name, mask, label, split, defect, record in zip(
            self.names,
            self.mask_names,
            self.labels.tolist(),
            self.splits,
            self.defects,
            self.records.tolist(),
        ):
            if record >= 0:  # "<file>#<record>"
                name = name[: -len(f"#{record}")]
            out.append(
                Sample(
                    image=root / name,
                    split=split,
                    label=label,
                    defect=defect,
                    mask=root / mask if mask else None,
                    index=record if record >= 0 else None,
                )
            )
        return out


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]


def pack_index(path: str | Path) -> PackIndex:
    with open_pack(path) as f:
        return PackIndex(
            names=_strings(f["names"]),
            mask_names=_strings(f["mask_names"]),
            labels=f["labels"][()].astype(np.int64),
            splits=_strings(f["splits"]),
            defects=_strings(f["defects"]),
            records=f["records"][()].astype(np.int64),
            shapes=f["shapes"][()],
            attrs=pack_attrs(f),
        )


def split_rows(index: PackIndex, val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Rows of the train, val and test splits, drawn exactly as `split_samples` draws samples."""
    samples = index.samples(root="/")  # any root: only the rows' identity matters here
    row = {s: i for i, s in enumerate(samples)}
    splits = split_samples(samples, val_fraction, seed)
    return {
        "train": [row[s] for s in splits.train],
        "val": [row[s] for s in splits.val],
        "test": [row[s] for s in splits.test],
    }


def _read(path: Path, what: str, read):
    try:
        with open_pack(path) as f:
            return read(f)
    except (OSError, KeyError) as exc:
        raise DataError(f"pack {path} is corrupt: cannot read {what} ({exc})") from None


def _read_rows(ds: h5py.Dataset, indices: Sequence[int]) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
        raise DataError(f"row {int(idx.max())} is out of range: the pack has {len(ds)} rows")
    unique, inverse = np.unique(idx, return_inverse=True)
    return ds[unique.tolist()][inverse] if idx.size else ds[:0]


def read_images(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """uint8 (len(indices), S, S, 3) images of these rows, in the order given."""
    path = Path(path)
    return _read(path, "images", lambda f: _read_rows(f["images"], indices))


def read_mask(path: str | Path, index: int) -> np.ndarray:
    """bool (h, w) mask of a row at its original size; all False for a row without a mask."""
    path = Path(path)

    def read(f: h5py.File) -> np.ndarray:
        h, w = (int(v) for v in f["shapes"][index])
        key = f"{index:06d}"
        return f["masks"][key][()].astype(bool) if key in f["masks"] else np.zeros((h, w), bool)

    return _read(path, f"the mask of row {index}", read)


def read_tiles(path: str | Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(tiles (k, T, T, 3), corners (k, 2) as (y, x)) of one row, for `stitch_tiles`."""
    path = Path(path)

    def read(f: h5py.File):
        if "tiles" not in f:
            raise DataError(f"pack {path} has no tiles (pack it with a tile size)")
        rows = np.flatnonzero(f["tile_coords"][:, 0] == index)
        return _read_rows(f["tiles"], rows), f["tile_coords"][rows.tolist(), 1:]

    return _read(path, f"the tiles of row {index}", read)


class PackedImages(Dataset):
    """Images (or all tiles) of some rows of a pack, as uint8 tensors (3, H, W); the
    training loop converts whole batches on the device (`to_float`), so loader workers copy
    a quarter of the bytes.

    The constructor checks the pack with a handle it closes at once; the reading handle is
    opened on the first `__getitem__` in each process (DataLoader or Ray worker) and never
    pickled, as h5py handles must not cross a fork.
    """

    def __init__(
        self, path: str | Path, rows: Sequence[int] | None = None, *, tiles: bool = False
    ) -> None:
        self.path = Path(path)
        self.key = "tiles" if tiles else "images"
        with open_pack(self.path) as f:
            if self.key not in f:
                raise DataError(f"pack {self.path} has no tiles (pack it with a tile size)")
            n_rows = len(f["images"])
            chosen = np.arange(n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
            if chosen.size and (chosen.min() < 0 or chosen.max() >= n_rows):
                raise DataError(f"rows out of range: pack {self.path} has {n_rows} rows")
            if tiles:
                owner = f["tile_coords"][:, 0]
                chosen = np.concatenate(
                    [np.flatnonzero(owner == r) for r in chosen.tolist()] or [np.zeros(0, int)]
                )
        self.items = chosen.astype(np.int64)
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _data(self) -> h5py.Dataset:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r", locking=False), os.getpid()
        return self._file[self.key]

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            array = self._data()[int(self.items[i])]
        except OSError as exc:
            raise DataError(
                f"pack {self.path} is corrupt: cannot read {self.key} ({exc})"
            ) from None
        return torch.from_numpy(array).permute(2, 0, 1)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = state["_pid"] = None
        return state

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
