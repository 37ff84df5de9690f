"""Scoring images with an exported detector file (`vtadl export`), with numpy, Pillow and the
file's runtime only: onnxruntime for ONNX, torch for TorchScript.

    from vtadl.inference import Detector
    detector = Detector("coins.onnx")
    result = detector.score_file("part_0412.png")  # .map (H, W), .score, .anomalous

The file's graph gives the raw scores of model inputs; everything after (resizing or tiling
the image, the maps, their smoothing, the image score and the decision against the
threshold of the run's validation images) is the numpy code a run's scorer uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from vtadl.exceptions import DataError, VtadlError
from vtadl.inference.calibration import Calibration
from vtadl.inference.images import load_image, resize_rgb
from vtadl.inference.maps import Raw, scored
from vtadl.inference.tiles import cut_tiles

FORMAT = "vtadl-detector"
FORMAT_VERSION = 1
FORMATS = ("onnx", "torchscript")
META_KEY = "vtadl"  # the metadata's key in an ONNX file, its file name in a TorchScript one
# model inputs run through the graph at once
BATCH = 8


class DetectorFileError(VtadlError):
    """A file that is not a readable vtadl detector."""


@dataclass(frozen=True)
class EvalSettings:
    """The eval settings a detector's maps and scores read (a run's `eval` section)."""

    score: str
    smoothing_sigma: float
    peak_patches: int
    recon_weight: float
    neighbour_weight: float

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EvalSettings:
        return cls(**{f.name: raw[f.name] for f in fields(cls)})


class Result(NamedTuple):
    """One image's anomaly map at its own resolution (H, W) float32, its score and whether
    the score is above the detector's threshold."""

    map: np.ndarray
    score: float
    anomalous: bool


class Detector:
    """An exported detector file, ready to score uint8 RGB images (H, W, 3) of any size."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DetectorFileError(f"no such detector file: {self.path}")
        with self.path.open("rb") as f:
            head = f.read(4)
        zipped = head == b"PK\x03\x04"  # a TorchScript archive; ONNX is a protobuf
        try:
            self._run, text = _torchscript(self.path) if zipped else _onnx(self.path)
            self.meta = json.loads(text)
        except DetectorFileError:
            raise
        except Exception as exc:  # each runtime raises its own kinds for a bad file
            kind = "TorchScript" if zipped else "ONNX"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DetectorFileError(
                f"cannot read {self.path} as a vtadl detector ({kind}): {reason}"
            ) from None
        if self.meta.get("format") != FORMAT or self.meta.get("format_version") != FORMAT_VERSION:
            raise DetectorFileError(
                f"{self.path} is not a vtadl detector of format version {FORMAT_VERSION}"
            )
        self.calibration = Calibration.from_dict(self.meta["calibration"])
        self.settings = EvalSettings.from_dict(self.meta["eval"])
        self.image_score: str = self.meta["image_score"]
        self.threshold: float = self.meta["threshold"]
        self.size: int = self.meta["input"]["size"]
        self.tile: int = self.meta["input"]["tile"]
        self.overlap: int = self.meta["input"]["tile_overlap"]

    def inputs(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The model inputs of one image (the image resized, or its tiles) and the tiles'
        corners; a DataError for an image that is not (H, W, 3) uint8 or is smaller than
        a tile."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(
                f"expected an RGB image of shape (H, W, 3) and type uint8, got shape "
                f"{tuple(image.shape)} of {image.dtype}"
            )
        if self.tile:
            return cut_tiles(image, self.tile, self.overlap)
        return resize_rgb(image, self.size)[None], None

    def raw(self, inputs: np.ndarray) -> Raw:
        """The graph's raw scores of model inputs (N, S, S, 3), BATCH at a time."""
        parts = [self._run(inputs[a : a + BATCH]) for a in range(0, len(inputs), BATCH)]
        return Raw(*(np.concatenate(p) if p[0] is not None else None for p in zip(*parts)))

    def score(self, images: list[np.ndarray]) -> list[Result]:
        """Maps, scores and decisions of uint8 RGB images (H, W, 3), their inputs run
        through the graph together."""
        prepared = [self.inputs(image) for image in images]
        cuts = np.cumsum([len(x) for x, _ in prepared])[:-1]
        raws = self.raw(np.concatenate([x for x, _ in prepared])).split(cuts)
        results = []
        for image, (_, corners), raw in zip(images, prepared, raws):
            amap, value = scored(
                raw, corners, image.shape[:2], self.calibration, self.settings, self.image_score
            )
            results.append(Result(amap, value, value > self.threshold))
        return results

    def score_file(self, path: str | Path) -> Result:
        """An image file's map, score and decision (a DataError naming a file that cannot
        be read)."""
        return self.score([load_image(path)])[0]


def _onnx(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if META_KEY not in meta:
        raise DetectorFileError(f"{path} is an ONNX model without vtadl's metadata")
    names = [o.name for o in session.get_outputs()]

    def run(inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        out = dict(zip(names, session.run(names, {"images": inputs})))
        return out["nll"], out["rec"], out.get("near")

    return run, meta[META_KEY]


def _torchscript(path: Path):
    import torch

    extra = {META_KEY: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[META_KEY]:
        raise DetectorFileError(f"{path} is a TorchScript file without vtadl's metadata")

    def run(inputs: np.ndarray) -> tuple[np.ndarray | None, ...]:
        with torch.no_grad():
            out = [t.numpy() for t in module(torch.from_numpy(np.ascontiguousarray(inputs)))]
        return out[0], out[1], out[2] if len(out) > 2 else None

    return run, extra[META_KEY]
