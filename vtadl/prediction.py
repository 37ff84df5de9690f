"""Scoring new images with a trained run: heat maps and scores.json.

Every image that can be read is scored; one that cannot (or is smaller than a tile) is listed
under "failed" with the reason, and the caller decides what that means (the CLI exits 1). A
missing input path, or an output folder that cannot be written, is an error before anything
is scored. A heat map keeps the image's folder names: its path from the folder given on (that
folder's own name included), or for a single file, its folder's name and its own.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from vtadl.data.images import load_image, resize_rgb
from vtadl.data.samples import is_image_file
from vtadl.exceptions import DataError, VtadlError
from vtadl.inference.tiles import cut_tiles
from vtadl.scoring.scorer import IMAGES_PER_PASS, Scorer, raw_in_passes
from vtadl.visualize import save_heatmap

log = logging.getLogger(__name__)


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _output_folder(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise VtadlError(f"output folder {out} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VtadlError(f"cannot create output folder {out}: {_os_reason(exc)}") from None
    if not os.access(out, os.W_OK):
        raise VtadlError(f"output folder {out} is not writable")
    return out


@contextmanager
def _writing(path: Path) -> Iterator[Path]:
    """Write to `path` in the block; an OS error becomes one line that names the path."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path
    except OSError as exc:
        raise VtadlError(f"cannot write {path}: {_os_reason(exc)}") from None


def _named_inputs(inputs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """Every image to score with the name of its heat map: its path from the folder given on
    (that folder's name included), or for a file given, its folder's name and its own; a
    name met twice gets a number."""
    named: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if is_image_file(p))
            if not found:
                raise DataError(f"no images found in {item}")
            base = Path(item.resolve().name)
            named += [(p, base / p.relative_to(item)) for p in found]
        elif item.is_file():
            named.append((item, Path(item.resolve().parent.name) / item.name))
        else:
            raise DataError(f"no such image or folder: {item}")
    seen: set[Path] = set()
    out = []
    for path, name in named:
        base = name = name.with_suffix(".png")
        for k in itertools.count(2):
            if name not in seen:
                break
            name = base.with_name(f"{base.stem}-{k}.png")
        seen.add(name)
        out.append((path, name))
    return out


def _read_file(scorer: Scorer, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """An image file at full resolution, the model's inputs for it (the image resized, or its
    tiles) and the tiles' corners; a DataError naming the file when it cannot be read or
    tiled."""
    image = load_image(path)
    d, size = scorer.config.data, scorer.config.model.img_size
    if d.tile:
        try:
            inputs, corners = cut_tiles(image, d.tile, d.tile_overlap)
        except DataError as exc:
            raise DataError(f"cannot tile {path}: {exc}") from None
    else:
        inputs, corners = resize_rgb(image, size)[None], None
    return image, inputs, corners


def _write_map(out: Path, path: Path, name: Path, image, amap, score: float, cal) -> dict:
    """An image's heat map, written under `out`, and its entry in scores.json."""
    with _writing(out / name) as target:
        save_heatmap(
            target,
            image,
            amap,
            name=str(path),
            score=score,
            threshold=cal.image_threshold,
            low=cal.display_low,
            high=cal.display_high,
        )
    peak = np.unravel_index(int(np.argmax(amap)), amap.shape)
    return {
        "image": str(path),
        "heatmap": name.as_posix(),
        "score": score,
        "anomalous": score > cal.image_threshold,
        "max_at": [int(peak[0]), int(peak[1])],
    }


def predict(run_dir: str | Path, inputs: Sequence[str | Path], out: str | Path) -> dict:
    """Score new images with a run's best checkpoint: a heat map each and out/scores.json,
    which this returns."""
    return predict_images(Scorer(run_dir), inputs, out)


def predict_images(scorer: Scorer, inputs: Sequence[str | Path], out: str | Path) -> dict:
    """A heat map for each image and out/scores.json, which this returns. Images are read
    and scored IMAGES_PER_PASS at a time."""

    def read(path: Path) -> tuple:
        return _read_file(scorer, path)

    def score(items: Iterator[tuple]) -> Iterator[tuple[tuple, np.ndarray, float]]:
        for item, raw in raw_in_passes(scorer, items, lambda item: item[3]):
            yield (item, *scorer.scored(raw, item[4], item[2].shape[:2]))

    header = {
        "run_dir": str(scorer.run_dir),
        "threshold": scorer.calibration.image_threshold,
        "image_score": scorer.image_score,
        "mixture_fit": scorer.config.train.mixture_fit,
        "n_gaussians": scorer.n_gaussians,
    }
    return _predicted(inputs, out, read, score, scorer.calibration, header)


def predict_exported(model_file: str | Path, inputs: Sequence[str | Path], out: str | Path) -> dict:
    """`predict` with an exported detector file (`vtadl export`) instead of a run folder:
    the same heat maps and scores.json, which also names the file."""
    from vtadl.inference.detector import Detector

    detector = Detector(model_file)

    def read(path: Path) -> tuple:
        image = load_image(path)
        try:
            return (image, *detector.inputs(image))
        except DataError as exc:
            raise DataError(f"cannot score {path}: {exc}") from None

    def score(items: Iterator[tuple]) -> Iterator[tuple[tuple, np.ndarray, float]]:
        while chunk := list(itertools.islice(items, IMAGES_PER_PASS)):
            for item, result in zip(chunk, detector.score([item[2] for item in chunk])):
                yield item, result.map, result.score

    meta = detector.meta
    header = {
        "model_file": str(detector.path),
        "run_dir": meta["run_dir"],
        "threshold": detector.threshold,
        "image_score": detector.image_score,
        "mixture_fit": meta["mixture_fit"],
        "n_gaussians": meta["n_gaussians"],
    }
    return _predicted(inputs, out, read, score, detector.calibration, header)


def _predicted(inputs, out, read, score, cal, header: dict) -> dict:
    """Read every image (`read(path)` -> (image, inputs, corners)), score the readable ones
    (`score(items)` yields each item of (path, name, image, inputs, corners) with its map
    and score), write their heat maps and out/scores.json (`header` and the images), and
    return it."""
    named = _named_inputs(inputs)
    out = _output_folder(Path(out))
    failed: list[dict] = []

    def readable() -> Iterator[tuple]:
        for path, name in named:
            try:
                yield (path, name, *read(path))
            except DataError as exc:
                log.info("skipped %s: %s", path, exc)
                failed.append({"image": str(path), "error": str(exc)})

    scored = [
        _write_map(out, path, name, image, amap, value, cal)
        for (path, name, image, _, _), amap, value in score(readable())
    ]
    result = {**header, "images": scored, "failed": failed}
    with _writing(out / "scores.json") as target:
        target.write_text(json.dumps(result, indent=2))
    return result
