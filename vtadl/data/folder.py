"""Indexer for any product in the MVTec layout, with folder names of the user's choosing.

    <root>/<category>/<train>/<good>/*
    <root>/<category>/<test>/<good>/*
    <root>/<category>/<test>/<defect>/*
    <root>/<category>/<ground_truth>/<defect>/<image stem><mask_suffix>.*

The names come from a `FolderLayout`: passed explicitly, or read from `<root>/vtadl-layout.json`
(written by `FolderLayout.save`), so that `index_dataset("folder", root, category)` finds a
user's own names without any option. MVTec AD and BTAD are two fixed layouts of this reader.

Images are paired with masks by name, never by listing order, and are not decoded here.
`scan_folder` collects every problem it finds; `index_folder` raises the first error.
Normal samples get the defect type `NORMAL` ("good") whatever their folder is called.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vtadl.data.samples import NORMAL, Problem, Sample, list_image_files
from vtadl.exceptions import DataError

logger = logging.getLogger(__name__)

LAYOUT_FILE = "vtadl-layout.json"


@dataclass(frozen=True)
class FolderLayout:
    train: str = "train"
    test: str = "test"
    ground_truth: str = "ground_truth"
    good: str = "good"
    mask_suffix: str = "_mask"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str):
                raise DataError(f"folder layout: {f.name} must be a string, got {value!r}")
            if f.name != "mask_suffix" and (not value or value in (".", "..")):
                raise DataError(f"folder layout: {f.name} must be a folder name, got {value!r}")
            if "/" in value or "\\" in value:
                raise DataError(f"folder layout: {f.name} must not contain a path separator")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FolderLayout:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            listing = ", ".join(sorted(known))
            raise DataError(f"folder layout: unknown keys {', '.join(unknown)} (known: {listing})")
        return cls(**raw)

    def save(self, root: str | Path) -> Path:
        path = Path(root) / LAYOUT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def read_layout(root: str | Path) -> FolderLayout:
    """The layout saved in `<root>/vtadl-layout.json`, or the MVTec names when there is none."""
    path = Path(root) / LAYOUT_FILE
    if not path.is_file():
        return FolderLayout()
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read folder layout {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise DataError(f"folder layout {path} must hold a JSON object")
    return FolderLayout.from_dict(raw)


def check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a folder")
    return root


def list_folder_categories(root: str | Path, layout: FolderLayout | None = None) -> list[str]:
    """Sorted names of the folders under `root` that contain a training folder."""
    root = check_root(root)
    train = (layout or read_layout(root)).train
    return sorted(p.name for p in root.iterdir() if (p / train).is_dir())


def _mask_files(folder: Path, problems: list[Problem]) -> dict[str, Path]:
    masks: dict[str, Path] = {}
    for path in list_image_files(folder):
        if path.stem in masks:
            problems.append(
                Problem(
                    "error",
                    path,
                    f"two masks with one name in {folder}: {masks[path.stem].name} and {path.name}",
                )
            )
            continue
        masks[path.stem] = path
    return masks


def _defect_samples(
    test_dir: Path, gt_dir: Path, defect: str, layout: FolderLayout, problems: list[Problem]
) -> list[Sample]:
    images = list_image_files(test_dir / defect)
    masks = _mask_files(gt_dir / defect, problems)
    used: set[str] = set()
    samples = []
    for image in images:
        key = image.stem + layout.mask_suffix
        mask = masks.get(key)
        if mask is None:
            expected = gt_dir / defect / f"{key}.png"
            problems.append(
                Problem("error", image, f"defect image {image} has no mask (expected {expected})")
            )
            continue
        used.add(key)
        samples.append(Sample(image=image, split="test", label=1, defect=defect, mask=mask))
    for key in sorted(set(masks) - used):
        problems.append(
            Problem(
                "warning",
                masks[key],
                f"mask {masks[key]} has no image in {test_dir / defect}, ignored",
            )
        )
    return samples


def scan_folder(
    root: str | Path, category: str, layout: FolderLayout | None = None
) -> tuple[list[Sample], list[Problem]]:
    """Samples (train by file name, then test by sorted folder name) and every problem found.

    A missing root or category is raised at once; everything else is collected.
    """
    root = check_root(root)
    layout = layout or read_layout(root)
    cat_dir = root / category
    if not category or not cat_dir.is_dir():
        available = list_folder_categories(root, layout)
        listing = (
            ", ".join(available)
            if available
            else f"none, expected <root>/<category>/{layout.train}/{layout.good}"
        )
        raise DataError(f"category {category!r} not found in {root} (available: {listing})")

    problems: list[Problem] = []
    train_dir = cat_dir / layout.train / layout.good
    train_images = list_image_files(train_dir)
    if not train_dir.is_dir():
        problems.append(Problem("error", train_dir, f"training folder {train_dir} does not exist"))
    elif not train_images:
        problems.append(Problem("error", train_dir, f"training folder {train_dir} has no images"))
    samples = [
        Sample(image=p, split="train", label=0, defect=NORMAL, mask=None) for p in train_images
    ]

    test_dir = cat_dir / layout.test
    gt_dir = cat_dir / layout.ground_truth
    if not test_dir.is_dir():
        problems.append(Problem("error", test_dir, f"test folder {test_dir} does not exist"))
        return samples, problems
    n_test_files = 0
    for folder in sorted((p for p in test_dir.iterdir() if p.is_dir()), key=lambda p: p.name):
        n_files = len(list_image_files(folder))
        n_test_files += n_files
        if n_files == 0:
            problems.append(
                Problem("warning", folder, f"test folder {folder} has no images, ignored")
            )
        if folder.name == layout.good:
            samples += [
                Sample(image=p, split="test", label=0, defect=NORMAL, mask=None)
                for p in list_image_files(folder)
            ]
        else:
            samples += _defect_samples(test_dir, gt_dir, folder.name, layout, problems)
    if gt_dir.is_dir():
        for folder in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
            if not (test_dir / folder.name).is_dir() and list_image_files(folder):
                problems.append(
                    Problem(
                        "warning",
                        folder,
                        f"masks in {folder} have no test folder {test_dir / folder.name}, ignored",
                    )
                )
    if n_test_files == 0:
        problems.append(
            Problem(
                "error",
                test_dir,
                f"test folder {test_dir} has no images "
                f"(expected {layout.good}/ and <defect>/ folders of images)",
            )
        )
    return samples, problems


def index_folder(
    root: str | Path, category: str, layout: FolderLayout | None = None, *, name: str = "folder"
) -> list[Sample]:
    """Samples of one category; raises the first error `scan_folder` finds, logs warnings."""
    samples, problems = scan_folder(root, category, layout)
    for problem in problems:
        if problem.severity == "error":
            raise DataError(problem.message)
    for problem in problems:
        logger.warning("%s", problem.message)
    n_train = sum(s.split == "train" for s in samples)
    logger.info(
        "%s/%s: %d train, %d test images (%d anomalous)",
        name,
        category,
        n_train,
        len(samples) - n_train,
        sum(s.label for s in samples),
    )
    return samples
