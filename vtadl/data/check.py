"""Validating a dataset tree: counts per split and defect type, and every problem with its file.

Errors are what makes indexing, packing or the metrics fail or wrong (missing or empty
folders, unreadable or truncated images, a defect image without a mask, a mask of another
size than its image). Warnings are what is read anyway but deserves a look: a mask without
an image (ignored), a non-binary mask (binarised by `images.binarise_mask`, the one rule that
every reader applies), a mask that marks no pixel, images of mixed channel counts (all are read
as RGB). Every image and mask is decoded in full, so a truncated file is found; this is the
slow part, about the cost of one training epoch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vtadl.data import INDEXERS
from vtadl.data.btad import BTAD_LAYOUT
from vtadl.data.folder import scan_folder
from vtadl.data.images import _DECODE_ERRORS, _reason, binarise_mask, not_binary_message
from vtadl.data.mnist import scan_mnist
from vtadl.data.mvtec import MVTEC_LAYOUT
from vtadl.data.reader import sample_image_size
from vtadl.data.samples import Problem, Sample
from vtadl.exceptions import DataError

logger = logging.getLogger(__name__)

_LAYOUTS = {"mvtec": MVTEC_LAYOUT, "btad": BTAD_LAYOUT, "folder": None}


@dataclass
class Report:
    dataset: str
    root: Path
    category: str
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    sizes: dict[tuple[int, int], int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


def _scan(dataset: str, root: Path, category: str) -> tuple[list[Sample], list[Problem]]:
    if dataset not in INDEXERS:
        raise DataError(f"unknown dataset {dataset!r} (known: {', '.join(sorted(INDEXERS))})")
    if dataset == "mnist":
        return scan_mnist(root, category)
    return scan_folder(root, category, _LAYOUTS[dataset])


def _inspect(path: Path, what: str) -> tuple[Image.Image | None, Problem | None]:
    """The fully decoded image, or the problem that stopped decoding it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy(), None
    except _DECODE_ERRORS as exc:
        return None, Problem("error", path, f"cannot read {what} {path}: {_reason(exc)}")


def _bands(img: Image.Image) -> int:
    return 3 if img.mode == "P" else len(img.getbands())


def _mask_problems(mask: Path, image_hw: tuple[int, int] | None) -> list[Problem]:
    img, problem = _inspect(mask, "mask")
    if problem is not None:
        return [problem]
    problems = []
    if image_hw is not None and (img.height, img.width) != image_hw:
        h, w = image_hw
        problems.append(
            Problem(
                "error", mask, f"mask {mask} is {img.height}x{img.width} but its image is {h}x{w}"
            )
        )
    anomalous, values = binarise_mask(img)
    if values is not None:
        problems.append(Problem("warning", mask, not_binary_message(mask, values)))
    if not anomalous.any():
        problems.append(
            Problem(
                "warning",
                mask,
                f"mask {mask} marks no anomalous pixel: all of its image's pixels count as "
                "normal (a category whose masks are all empty gets image AUROC only)",
            )
        )
    return problems


def _file_problems(samples: list[Sample], report: Report) -> None:
    bands: dict[Path, int] = {}
    for s in samples:
        img, problem = _inspect(s.image, "image")
        if problem is not None:
            report.problems.append(problem)
            hw = None
        else:
            hw = (img.height, img.width)
            bands[s.image] = _bands(img)
            report.sizes[hw] = report.sizes.get(hw, 0) + 1
        if s.mask is not None:
            report.problems += _mask_problems(s.mask, hw)
    if len(set(bands.values())) > 1:
        common, n_common = Counter(bands.values()).most_common(1)[0]
        for path, n in bands.items():
            if n != common:
                report.problems.append(
                    Problem(
                        "warning",
                        path,
                        f"image {path} has {n} channel(s) while {n_common} of {len(bands)} "
                        f"images of this category have {common}; all are read as RGB",
                    )
                )


def check_dataset(dataset: str, root: str | Path, category: str, *, decode: bool = True) -> Report:
    """Validate one category; a missing root or category is raised, the rest is reported.

    `decode=False` checks the tree only (names, pairing, folders), without opening files.
    """
    root = Path(root)
    samples, problems = _scan(dataset, root, category)
    report = Report(dataset=dataset, root=root, category=category, problems=list(problems))
    for s in samples:
        key = (s.split, s.defect)
        report.counts[key] = report.counts.get(key, 0) + 1
    if dataset == "mnist":
        if samples:  # one IDX file holds images of one size
            report.sizes[sample_image_size(samples[0])] = len(samples)
    elif decode:
        _file_problems(samples, report)
    logger.info(
        "%s/%s: %d samples, %d errors, %d warnings",
        dataset,
        category,
        len(samples),
        len(report.errors),
        len(report.warnings),
    )
    return report
