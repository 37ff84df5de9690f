"""A trained run as one file that scores images without the project: `vtadl export`.

The file holds the scoring graph, traced from the run's network and its fitted mixture
(`ScoringGraph`: uint8 images at the model's input size -> the mixture NLL of every patch on
every shifted grid, the reconstruction error and, for a kernel by position, the distance to
the nearest training image), and as metadata what turns those into maps and scores: the
input size or tiling, the eval settings, the calibration from the validation images (the
threshold among it), and what the file came from (vtadl's version, the run, its fit, K and
metrics). `vtadl.inference.detector` reads it with numpy, Pillow and the format's runtime
(onnxruntime for ONNX, torch for TorchScript) and does the rest exactly as a run's scorer
does: the resizing or tiling, maps, smoothing and image score are the same numpy functions.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vtadl
from vtadl.checkpoints import BEST
from vtadl.exceptions import ConfigError, VtadlError
from vtadl.inference.detector import BATCH, FORMAT, FORMAT_VERSION, FORMATS, META_KEY
from vtadl.scoring.raw import batch_scores
from vtadl.scoring.scorer import Scorer

# ONNX operator set of the exported graph (onnxruntime 1.17 and later run it)
OPSET = 17


class ScoringGraph(torch.nn.Module):
    """A scorer's network and fitted mixture as one function of tensors: uint8 images
    (N, H, W, 3) at the model's input size -> nll (N, S, g, g), rec (N, H, W) and, with
    neighbours, near (N,) float64: the run's raw scores (`vtadl.scoring.raw`)."""

    def __init__(self, scorer: Scorer) -> None:
        super().__init__()
        self.model = scorer.model
        self.config = scorer.config
        self.scoring = [(scorer.mixture, scorer.neighbours)]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (nll,), rec, (near,) = batch_scores(self.model, images, self.config, self.scoring)
        return (nll, rec) if near is None else (nll, rec, near)

    @property
    def outputs(self) -> list[str]:
        return ["nll", "rec"] if self.scoring[0][1] is None else ["nll", "rec", "near"]


def metadata(scorer: Scorer, fmt: str, checkpoint: str) -> dict[str, Any]:
    """What the file says of itself: everything the detector needs besides the graph, and
    where it came from."""
    c, metrics_file = scorer.config, scorer.run_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, ValueError):
        metrics = None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "runtime": fmt,
        "vtadl_version": vtadl.__version__,
        "run_dir": str(scorer.run_dir.resolve()),
        "checkpoint": checkpoint,
        "epoch": scorer.state.get("epoch"),
        "variant": c.variant,
        "preset": c.preset,
        "dataset": c.data.dataset,
        "category": c.data.category,
        "mixture_fit": c.train.mixture_fit,
        "n_gaussians": scorer.n_gaussians,
        "input": {
            "size": c.model.img_size,
            "tile": c.data.tile,
            "tile_overlap": c.data.tile_overlap,
            "layout": "NHWC uint8 RGB",
        },
        "outputs": ScoringGraph(scorer).outputs,
        "eval": asdict(c.eval),
        "image_score": scorer.image_score,
        "threshold": scorer.calibration.image_threshold,
        "calibration": scorer.calibration.to_dict(),
        "metrics": metrics,
    }


def export_run(
    run_dir: str | Path, fmt: str, out: str | Path, checkpoint: str = BEST
) -> dict[str, Any]:
    """Write a run's checkpoint as one detector file of `fmt` (onnx or torchscript) at
    `out`, atomically; returns its metadata."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise VtadlError(f"{out} is a folder: give the file to write")
    scorer = Scorer(run_dir, checkpoint, device="cpu")  # traced for the CPU it will run on
    graph = ScoringGraph(scorer).eval()
    meta = metadata(scorer, fmt, checkpoint)
    src = scorer.source
    # Traced at the detector's batch: a kernel's chunks of components are sized then (for
    # that many tokens at once); a batch of one runs the same chunks, smaller.
    example = np.repeat(src.model_input("val", 0)[0][:1], BATCH, axis=0)
    example = torch.from_numpy(example).to(scorer.device)
    partial = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # the tracer's notes on shapes taken as constants: the graph is traced for the model's
        # fixed input size, its batch dimension left free
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                _write_onnx(graph, example, partial, meta)
            else:
                traced = torch.jit.trace(graph, (example,), check_trace=False)
                extra = {META_KEY: json.dumps(meta)}
                torch.jit.save(traced, str(partial), _extra_files=extra)
        partial.replace(out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise VtadlError(f"cannot write {out}: {exc.strerror or exc}") from None
    return meta


def _logaddexp(g, a, b):
    """aten::logaddexp in ONNX operators (a kernel of many centres sums its chunks' log
    densities with it): max(a, b) + log(1 + exp(-|a - b|))."""
    one = g.op("Constant", value_t=torch.tensor(1.0))
    gap = g.op("Neg", g.op("Abs", g.op("Sub", a, b)))
    return g.op("Add", g.op("Max", a, b), g.op("Log", g.op("Add", one, g.op("Exp", gap))))


def _write_onnx(graph: ScoringGraph, example: torch.Tensor, path: Path, meta: dict) -> None:
    import onnx

    torch.onnx.register_custom_op_symbolic("aten::logaddexp", _logaddexp, OPSET)
    names = graph.outputs
    torch.onnx.export(
        graph,
        (example,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["images"],
        output_names=names,
        dynamic_axes={name: {0: "batch"} for name in ["images", *names]},
    )
    model = onnx.load(str(path))
    _share_constants(model.graph)
    model.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    onnx.save(model, str(path))


def _share_constants(graph) -> None:
    """One Constant node for each distinct tensor: the tracer writes a tensor that is not a
    parameter (the mixture's centres, say) as a constant at every use, once per shifted
    grid (16 copies on 4 x 4 grids); the later copies' uses are pointed at the first."""
    first: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            t = node.attribute[0].t
            key = (t.data_type, tuple(t.dims), hashlib.sha1(t.raw_data).digest())
            if t.raw_data and key in first:
                renamed[node.output[0]] = first[key]
                continue
            first.setdefault(key, node.output[0])
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    for output in graph.output:
        if output.name in renamed:  # not expected: outputs are computed
            raise ValueError(f"graph output {output.name} is a shared constant")
