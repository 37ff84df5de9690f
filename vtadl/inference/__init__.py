"""Scoring images without the rest of vtadl: an exported detector file (`vtadl export`) and
the numpy code that turns raw scores into maps and image scores, which a run's own scorer
uses too. Needs numpy, Pillow and the exported file's runtime only (onnxruntime for ONNX,
torch for TorchScript): nothing here imports torch, scipy or vtadl's training and service
modules."""

from __future__ import annotations

from vtadl.inference.detector import Detector, DetectorFileError, Result

__all__ = ["Detector", "DetectorFileError", "Result"]
