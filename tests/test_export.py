"""A run exported as one file (`vtadl export`) scores images as the run does: ONNX through
onnxruntime, TorchScript through torch, with the standalone `vtadl.inference` module; and
that module runs in a fresh virtual environment with numpy, Pillow and onnxruntime only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import CATEGORY
from vtadl.cli.main import app
from vtadl.config import default_config
from vtadl.evaluation import evaluate_run
from vtadl.exceptions import DataError
from vtadl.export import export_run
from vtadl.inference import Detector, DetectorFileError
from vtadl.prediction import predict, predict_exported
from vtadl.scoring.scorer import Scorer
from vtadl.training import fit

RUNS = {
    "em": {"train": {"mixture_fit": "em"}},
    "kernel": {},  # the default: a kernel on a coreset of the tokens, on 4 x 4 grids
    "position": {"eval": {"kernel_scope": "position", "image_score": "peak+recon+neighbour"}},
    "tiled": {"model": {"img_size": 16}, "data": {"tile": 16, "tile_overlap": 8}},
}


@pytest.fixture(scope="module")
def runs(demo_root: Path, tmp_path_factory) -> dict[str, Path]:
    made = {}
    for name, sections in RUNS.items():
        config = default_config("vtadl_tiny").override(
            data={"root": str(demo_root), "category": CATEGORY, **sections.get("data", {})},
            train={
                "epochs": 2,
                "batch_size": 4,
                "out": str(tmp_path_factory.mktemp(name)),
                **sections.get("train", {}),
            },
            model=sections.get("model", {}),
            eval=sections.get("eval", {}),
        )
        made[name] = fit(config)
    evaluate_run(made["kernel"])  # metrics.json, which the file carries
    return made


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", list(RUNS))
def test_the_exported_file_scores_as_the_run(runs, name, fmt, tmp_path) -> None:
    run = runs[name]
    meta = export_run(run, fmt, tmp_path / f"detector.{fmt}")
    scorer, detector = Scorer(run), Detector(tmp_path / f"detector.{fmt}")
    assert meta == detector.meta and detector.meta["runtime"] == fmt
    assert meta["n_gaussians"] == scorer.n_gaussians and meta["mixture_fit"] == (
        "em" if name == "em" else "kernel"
    )
    assert meta["threshold"] == scorer.calibration.image_threshold
    if name == "kernel":
        stored = json.loads((run / "metrics.json").read_text())
        assert meta["metrics"]["image_auroc"] == stored["image_auroc"]
    else:  # not evaluated
        assert meta["metrics"] is None
    assert ("near" in meta["outputs"]) == (name == "position")
    src = scorer.source
    images = [src.display_image("test", i) for i in range(len(src.items("test")))]
    results = detector.score(images)  # all at once: batches of several images
    decisions = set()
    inputs = [src.model_input("test", i) for i in range(len(images))]
    raws = scorer.raw_many([x for x, _ in inputs])
    for image, result, (_, corners), raw in zip(images, results, inputs, raws):
        amap, score = scorer.scored(raw, corners, image.shape[:2])
        assert result.map.shape == image.shape[:2]
        np.testing.assert_allclose(result.map, amap, atol=1e-4)
        assert result.score == pytest.approx(score, abs=1e-4)
        assert result.anomalous == (score > scorer.calibration.image_threshold)
        decisions.add(result.anomalous)
    assert decisions == {True, False} or name == "tiled"  # the threshold is put to work


def test_predict_with_the_file_writes_what_predict_with_the_run_writes(
    runs, demo_root, tmp_path
) -> None:
    model = tmp_path / "detector.onnx"
    result = CliRunner().invoke(app, ["export", str(runs["kernel"]), "--out", str(model)])
    assert result.exit_code == 0, result.output
    folder = demo_root / CATEGORY / "test"
    by_run = predict(runs["kernel"], [folder], tmp_path / "by_run")
    result = CliRunner().invoke(
        app, ["predict", "--model", str(model), str(folder), "--out", str(tmp_path / "by_file")]
    )
    assert result.exit_code == 0, result.output
    by_file = json.loads((tmp_path / "by_file" / "scores.json").read_text())
    assert by_file["model_file"] == str(model) and by_file["threshold"] == by_run["threshold"]
    assert len(by_file["images"]) == len(by_run["images"]) > 0
    for a, b in zip(by_file["images"], by_run["images"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert (a["image"], a["heatmap"], a["anomalous"]) == (
            b["image"],
            b["heatmap"],
            b["anomalous"],
        )
        assert (tmp_path / "by_file" / a["heatmap"]).is_file()


def test_bad_files_and_images_are_one_clear_error(runs, tmp_path) -> None:
    onnx_file, script = tmp_path / "d.onnx", tmp_path / "d.pt"
    export_run(runs["tiled"], "onnx", onnx_file)
    export_run(runs["tiled"], "torchscript", script)
    for bad, words in [
        (tmp_path / "missing.onnx", "no such detector file"),
        (runs["tiled"] / "checkpoints" / "best.pt", "as a vtadl detector (TorchScript)"),
        (runs["tiled"] / "config.yaml", "as a vtadl detector (ONNX)"),
    ]:
        with pytest.raises(DetectorFileError, match=r"detector") as caught:
            Detector(bad)
        assert words in str(caught.value) and "\n" not in str(caught.value)
    for whole in (onnx_file, script):
        cut = tmp_path / f"cut{whole.suffix}"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        with pytest.raises(DetectorFileError, match="cannot read"):
            Detector(cut)
    detector = Detector(onnx_file)
    with pytest.raises(DataError, match=r"\(H, W, 3\).*\(32, 32, 4\)"):
        detector.score([np.zeros((32, 32, 4), np.uint8)])
    with pytest.raises(DataError, match="smaller than the 16x16 tile"):
        detector.score([np.zeros((8, 40, 3), np.uint8)])
    small = tmp_path / "images" / "small.png"
    small.parent.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(small)
    result = predict_exported(onnx_file, [small], tmp_path / "out")
    assert result["images"] == [] and "smaller than" in result["failed"][0]["error"]
    cli = CliRunner().invoke(app, ["predict", "--model", str(small), str(small), "--out", "o"])
    assert cli.exit_code != 0 and "as a vtadl detector" in cli.output
    assert "Traceback" not in cli.output


FRESH_SCRIPT = """
import json, sys
import numpy as np
from vtadl.inference import Detector
detector = Detector(sys.argv[1])
results = map(detector.score_file, sys.argv[2:])
out = [[r.score, bool(r.anomalous), float(r.map.mean())] for r in results]
banned = [m for m in ("torch", "scipy", "sklearn", "ray", "redis", "h5py", "matplotlib", "yaml")
          if m in sys.modules]
print(json.dumps({"results": out, "banned": banned}))
"""


@pytest.mark.slow
def test_the_inference_module_scores_in_a_fresh_environment_with_its_own_dependencies(
    runs, demo_root, tmp_path
) -> None:
    model = tmp_path / "detector.onnx"
    export_run(runs["kernel"], "onnx", model)
    # vtadl's files that the module needs, and nothing else of the package
    code = tmp_path / "code" / "vtadl"
    package = Path(__file__).resolve().parents[1] / "vtadl"
    shutil.copytree(package / "inference", code / "inference")
    for name in ("__init__.py", "exceptions.py"):
        shutil.copy(package / name, code / name)
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "numpy", "pillow", "onnxruntime"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    images = sorted((demo_root / CATEGORY / "test").rglob("*.png"))[:4]
    done = subprocess.run(
        [python, "-c", FRESH_SCRIPT, model, *images],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path / "code",
        env={"PYTHONPATH": str(tmp_path / "code"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    assert found["banned"] == []
    here = Detector(model)
    for (score, anomalous, mean), path in zip(found["results"], images):
        want = here.score_file(path)
        assert score == pytest.approx(want.score, abs=1e-5) and anomalous == want.anomalous
        assert mean == pytest.approx(float(want.map.mean()), abs=1e-5)
    assert sys.executable != str(python)


def test_a_kernel_summed_in_chunks_exports_too(runs, monkeypatch, tmp_path) -> None:
    # A kernel of many centres sums its log densities chunk by chunk (logaddexp, which the
    # ONNX export writes in plain operators); here a small chunk forces several.
    import vtadl.scoring.mixtures

    # traced at a batch of 8 images of 16 tokens: chunks of 1024 components
    monkeypatch.setattr(vtadl.scoring.mixtures, "CHUNK_PAIRS", 8 * 16 * 1024)
    run = runs["kernel"]
    export_run(run, "onnx", tmp_path / "chunked.onnx")
    scorer, detector = Scorer(run), Detector(tmp_path / "chunked.onnx")
    assert scorer.n_gaussians > 2 * 1024  # three chunks
    src = scorer.source
    image = src.display_image("test", 0)
    inputs, corners = src.model_input("test", 0)
    amap, score = scorer.scored(scorer.raw(inputs), corners, image.shape[:2])
    result = detector.score([image])[0]
    np.testing.assert_allclose(result.map, amap, atol=1e-4)
    assert result.score == pytest.approx(score, abs=1e-4)
    # the centres stored once, not once per shifted grid (16 here) as the tracer writes them
    centres = scorer.mixture.centres.numel() * 4
    assert (tmp_path / "chunked.onnx").stat().st_size < 3 * centres + 2**20
