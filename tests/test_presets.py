"""`--preset paper`: the paper's method as one named layer of config (vtadl.presets).

Precedence variant < preset < config file < options, the preset's values, one error line for
an unknown name, and two tiny real runs through the CLI (one process, and 2 DDP workers on
Ray Train) that record the preset in their config.yaml.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vtadl.cli.main import app
from vtadl.config import VARIANTS, Config, layered_config, load_config, validate
from vtadl.evaluation import evaluate_run
from vtadl.exceptions import ConfigError
from vtadl.presets import PRESETS, preset_layer
from vtadl.runs import train_config
from vtadl.submission import category_requests

CATEGORY = "brick"  # the demo category of conftest.demo_root
METRICS = ("image_auroc", "pixel_auroc", "au_pro")
# The paper's method at 32 px: what has no option goes in a config file (which wins over the
# preset), the rest on the command line.
TINY_MODEL = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_channels": 32}
TINY_OPTIONS = ["--image-size", "32", "--n-gaussians", "4", "--epochs", "2", "--batch-size", "4"]

runner = CliRunner()


def _write(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


def test_each_layer_wins_over_the_one_below(tmp_path: Path) -> None:
    file = _write(tmp_path / "c.yaml", {"train": {"epochs": 7, "lr": 3e-4}})
    where = {"data": {"category": CATEGORY}}
    # variant < preset: vtadl_tiny's 32 px and 32 dimensions give way to the paper's
    tiny = VARIANTS["vtadl_tiny"]
    assert (tiny.img_size, tiny.embed_dim) == (32, 32)
    cfg, _ = train_config(variant="vtadl_tiny", preset="paper", overrides=where)
    assert (cfg.variant, cfg.preset) == ("vtadl_tiny", "paper")
    assert (cfg.model.img_size, cfg.model.embed_dim, cfg.model.n_gaussians) == (512, 512, 150)
    assert cfg.train.epochs == 400
    # preset < config file: the file's epochs and lr, the preset's other values
    cfg, _ = train_config(preset="paper", config_file=file, overrides=where)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.mixture_fit) == (7, 3e-4, "sgd")
    # config file < options
    options = {**where, "train": {"epochs": 3}}
    cfg, _ = train_config(preset="paper", config_file=file, overrides=options)
    assert (cfg.train.epochs, cfg.train.lr) == (3, 3e-4)


def test_a_file_may_name_the_preset_and_the_option_wins(tmp_path: Path) -> None:
    file = _write(tmp_path / "c.yaml", {"preset": "paper", "train": {"epochs": 7}})
    where = {"data": {"category": CATEGORY}}
    cfg, _ = train_config(config_file=file, overrides=where)
    assert (cfg.preset, cfg.model.mdn_condition, cfg.train.epochs) == ("paper", "token", 7)
    loaded = load_config(file)
    assert (loaded.preset, loaded.model.mdn_condition, loaded.train.epochs) == ("paper", "token", 7)
    # the option's preset ("": none) wins over the file's: nothing of the paper's is left
    cfg, _ = train_config(config_file=file, preset="", overrides=where)
    assert (cfg.preset, cfg.model.mdn_condition, cfg.train.epochs) == ("", "global", 7)
    assert cfg.train.mixture_fit == Config().train.mixture_fit


def test_the_paper_preset_validates_and_sets_the_paper_method() -> None:
    assert set(PRESETS["paper"]) <= {"model", "data", "train", "eval"}
    cfg = validate(layered_config("vtadl_paper", preset_layer("paper")))
    assert cfg.preset == "paper"
    m, t, e = cfg.model, cfg.train, cfg.eval
    assert (m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads) == (512, 64, 512, 6, 8)
    assert (m.n_gaussians, m.noise_std, m.mdn_condition, m.mdn_detach) == (150, 0.2, "token", False)
    assert (t.mixture_fit, t.mdn_loss, t.epochs, t.batch_size) == ("sgd", "reference", 400, 8)
    assert (t.lr, t.weight_decay, t.w_mse, t.w_ssim, t.w_nll) == (1e-4, 1e-4, 5.0, 0.5, 1.0)
    assert (e.score, e.scale, e.grid_shifts, e.image_score, e.peak_patches) == (
        "nll", "linear", 1, "peak", 1,
    )  # fmt: skip
    assert e.smoothing_sigma == 4.0
    # the layer is a copy: changing it leaves the preset alone
    preset_layer("paper")["model"]["n_gaussians"] = 1
    assert PRESETS["paper"]["model"]["n_gaussians"] == 150


def test_an_unknown_preset_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nosuch'; known presets: paper"):
        preset_layer("nosuch")
    with pytest.raises(ConfigError, match="unknown preset"):
        validate(Config.from_dict({"preset": "nosuch"}))


@pytest.mark.parametrize("command", ["train", "submit", "tune"])
def test_unknown_preset_on_the_command_line_is_one_line_exit_2(
    command: str, demo_root: Path, tmp_path: Path
) -> None:
    args = [command, "--root", str(demo_root), "--category", CATEGORY, "--preset", "nosuch"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == ["error: unknown preset 'nosuch'; known presets: paper"], result.output


def test_unknown_preset_in_a_config_file_is_one_line_exit_2(tmp_path: Path) -> None:
    file = _write(tmp_path / "c.yaml", {"preset": "nosuch"})
    result = runner.invoke(app, ["train", "--category", CATEGORY, "--config", str(file)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: unknown preset 'nosuch'; known presets: paper"


def test_a_submitted_job_carries_the_preset(demo_root: Path) -> None:
    requests = category_requests(
        dataset="mvtec",
        root=demo_root,
        categories=[CATEGORY],
        all_categories=False,
        overrides={"train": {"epochs": 2}},
        preset="paper",
    )
    config = validate(Config.from_dict(json.loads(json.dumps(requests[0]["config"]))))
    assert (config.preset, config.train.mixture_fit, config.train.epochs) == ("paper", "sgd", 2)
    assert (config.model.n_gaussians, config.eval.scale) == (150, "linear")


def _train_paper(demo_root: Path, tmp_path: Path, *extra: str) -> tuple[Path, dict]:
    """`vtadl train --preset paper` at 32 px; the run folder and the saved config."""
    file = _write(tmp_path / "tiny.yaml", {"model": TINY_MODEL})
    args = ["train", "--root", str(demo_root), "--category", CATEGORY, "--preset", "paper"]
    args += ["--config", str(file), *TINY_OPTIONS, "--out", str(tmp_path / "runs"), "--json"]
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    run_dir = Path(payload["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in METRICS:
        assert math.isfinite(metrics[key]), (key, metrics[key])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["preset"] == "paper"
    assert (saved["train"]["mixture_fit"], saved["model"]["mdn_condition"]) == ("sgd", "token")
    assert (saved["train"]["mdn_loss"], saved["eval"]["scale"]) == ("reference", "linear")
    assert saved["model"]["img_size"] == 32 and saved["model"]["n_gaussians"] == 4
    assert load_config(run_dir / "config.yaml").preset == "paper"
    return run_dir, saved


def test_train_preset_paper_end_to_end(demo_root: Path, tmp_path: Path) -> None:
    run_dir, saved = _train_paper(demo_root, tmp_path)
    assert saved["train"]["strategy"] == "single"
    # the network the paper's method trained, scored by a kernel fitted beside it when asked
    # (what vtadl's scoring buys on it); its K cannot change without retraining
    paper = json.loads((run_dir / "metrics.json").read_text())
    kernel = evaluate_run(run_dir, mixture_fit="kernel", n_gaussians=64)
    assert (kernel["mixture_fit"], kernel["n_gaussians"]) == ("kernel", 64)
    assert kernel["image_auroc"] != paper["image_auroc"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == saved  # the run is kept
    with pytest.raises(ConfigError, match="fitted by sgd; its K is part of the training"):
        evaluate_run(run_dir, n_gaussians=64)
    # a resumed run keeps its preset
    where = {"data": {"category": CATEGORY}, "train": {"out": str(tmp_path / "runs")}}
    cfg, _ = train_config(resume=True, preset="paper", overrides=where)
    assert cfg.preset == "paper"
    with pytest.raises(ConfigError, match=r"cannot change preset \(paper -> none\)"):
        train_config(resume=True, preset="", overrides=where)


@pytest.mark.slow  # about a minute on 2 CPU cores, most of it Ray Train starting its workers
def test_train_preset_paper_with_ddp(demo_root: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False)
    try:
        run_dir, saved = _train_paper(
            demo_root, tmp_path, "--strategy", "ddp", "--num-workers", "2"
        )
    finally:
        ray.shutdown()
    assert (saved["train"]["strategy"], saved["train"]["num_workers"]) == ("ddp", 2)
    history = (run_dir / "history.jsonl").read_text().splitlines()
    assert len(history) == 2
