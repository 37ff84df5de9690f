from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml
from click.testing import Result
from PIL import Image
from typer.main import get_command
from typer.testing import CliRunner

from vtadl.cli.main import app
from vtadl.config import VARIANTS

CATEGORY = "brick"  # the demo category of conftest.demo_root
METRICS = ("image_auroc", "pixel_auroc", "au_pro")

runner = CliRunner()


def _train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--root",
        str(root),
        "--category",
        CATEGORY,
        "--variant",
        "vtadl_tiny",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--out",
        str(out),
        *extra,
    ]


def _last_json(result: Result) -> dict:
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert lines, result.output
    return json.loads(lines[-1])


def _history_lines(run_dir: Path) -> int:
    return len([ln for ln in (run_dir / "history.jsonl").read_text().splitlines() if ln.strip()])


# What a run logs on stderr when it is not a terminal (as under CliRunner): not a failure.
PROGRESS = re.compile(r"^(training in |epoch \d+/\d+: |evaluating )")


def _one_line_error(result: Result, *words: str) -> str:
    """A failure that is exactly one line naming the problem, and no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not PROGRESS.match(ln)]
    assert len(lines) == 1, result.output
    line = lines[0]
    assert line in result.stderr
    assert line.startswith("error:")
    for word in words:
        assert word in line, (word, line)
    return line


# ---------------------------------------------------------------- working commands


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`data demo` then one epoch of `train --json` on its brick category."""
    base = tmp_path_factory.mktemp("cli")
    data = base / "demo"
    result = runner.invoke(app, ["data", "demo", str(data)])
    assert result.exit_code == 0, result.output
    assert (data / CATEGORY / "train" / "good").is_dir()
    result = runner.invoke(app, _train_args(data, base / "runs", "--json"))
    payload = _last_json(result)
    return data, payload


def test_train_json_last_line(demo_run: tuple[Path, dict]) -> None:
    _, payload = demo_run
    run_dir = Path(payload["run_dir"])
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert _history_lines(run_dir) == 1
    for key in METRICS:
        assert 0.0 <= payload[key] <= 1.0, key
    assert payload["category"] == CATEGORY and payload["variant"] == "vtadl_tiny"
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert {k: saved[k] for k in METRICS} == {k: payload[k] for k in METRICS}


def test_evaluate_json(demo_run: tuple[Path, dict]) -> None:
    _, trained = demo_run
    result = runner.invoke(app, ["evaluate", trained["run_dir"], "--json"])
    payload = _last_json(result)
    assert payload["run_dir"] == trained["run_dir"]
    for key in METRICS:
        assert payload[key] == pytest.approx(trained[key]), key


def test_train_options_reach_the_run(demo_root: Path, tmp_path: Path) -> None:
    args = _train_args(demo_root, tmp_path / "runs", "--augment", "--score-scale", "linear")
    em = ["--mixture-fit", "em", "--n-gaussians", "3", "--grid-shifts", "1"]
    payload = _last_json(runner.invoke(app, [*args, *em, "--score", "nll", "--json"]))
    run_dir = Path(payload["run_dir"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["augment"] is True
    assert saved["eval"] == {**saved["eval"], "score": "nll", "scale": "linear", "grid_shifts": 1}
    assert (saved["train"]["mixture_fit"], saved["model"]["n_gaussians"]) == ("em", 3)
    assert payload["mixture_fit"] == "em" and payload["grid_shifts"] == 1
    assert (payload["score"], payload["score_scale"]) == ("nll", "linear")
    again = runner.invoke(app, ["evaluate", str(run_dir), "--score-scale", "log", "--json"])
    assert _last_json(again)["score_scale"] == "log"
    kernel = runner.invoke(app, ["evaluate", str(run_dir), "--mixture-fit", "kernel", "--json"])
    assert _last_json(kernel)["mixture_fit"] == "kernel"
    wrong = runner.invoke(app, ["evaluate", str(run_dir), "--mixture-fit", "sgd"])
    _one_line_error(wrong, "refitted", "'sgd'")


def test_evaluate_table(demo_run: tuple[Path, dict]) -> None:
    _, trained = demo_run
    result = runner.invoke(app, ["evaluate", trained["run_dir"]])
    assert result.exit_code == 0, result.output
    assert "image AUROC" in result.stdout
    assert f"{trained['image_auroc']:.4f}" in result.stdout


def test_predict(demo_run: tuple[Path, dict], tmp_path: Path) -> None:
    data, trained = demo_run
    image = data / CATEGORY / "test" / "good" / "000.png"
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", trained["run_dir"], str(image), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 images scored" in result.output
    rows = json.loads((out / "scores.json").read_text())["images"]
    assert [r["image"] for r in rows] == [str(image)]
    assert (out / rows[0]["heatmap"]).is_file()


def test_resume_continues_the_same_run(demo_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = _last_json(runner.invoke(app, _train_args(demo_root, runs, "--json")))
    run_dir = Path(first["run_dir"])
    assert _history_lines(run_dir) == 1
    args = ["train", "--resume", "--category", CATEGORY, "--out", str(runs), "--epochs", "2"]
    second = _last_json(runner.invoke(app, [*args, "--json"]))
    assert second["run_dir"] == first["run_dir"]
    assert _history_lines(run_dir) == 2
    assert len(list(run_dir.parent.iterdir())) == 1  # no new run folder


def test_resume_refuses_to_change_the_model(demo_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _last_json(runner.invoke(app, _train_args(demo_root, runs, "--json")))
    args = ["train", "--resume", "--category", CATEGORY, "--out", str(runs), "--epochs", "2"]
    result = runner.invoke(app, [*args, "--n-gaussians", "3"])
    _one_line_error(result, "n_gaussians")


# ---------------------------------------------------------------- bad input


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "absent"
    result = runner.invoke(app, _train_args(root, tmp_path / "runs"))
    _one_line_error(result, str(root), "does not exist")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.pt"))


def test_error_message_keeps_square_brackets(tmp_path: Path) -> None:
    # A path is printed verbatim, even where it looks like console markup.
    root = tmp_path / "data [copy]"
    result = runner.invoke(app, _train_args(root, tmp_path / "runs"))
    _one_line_error(result, str(root), "does not exist")


def test_unknown_category_lists_available(demo_root: Path, tmp_path: Path) -> None:
    args = _train_args(demo_root, tmp_path / "runs")
    args[args.index(CATEGORY)] = "bottle"
    _one_line_error(runner.invoke(app, args), "'bottle'", "available: brick")


def test_empty_train_folder(demo_copy: Path, tmp_path: Path) -> None:
    train = demo_copy / CATEGORY / "train" / "good"
    for png in train.glob("*.png"):
        png.unlink()
    result = runner.invoke(app, _train_args(demo_copy, tmp_path / "runs"))
    _one_line_error(result, str(train), "no images")


def test_unreadable_training_image(demo_copy: Path, tmp_path: Path) -> None:
    bad = demo_copy / CATEGORY / "train" / "good" / "005.png"
    bad.write_bytes(b"this is not a PNG file at all" * 10)
    result = runner.invoke(app, _train_args(demo_copy, tmp_path / "runs"))
    _one_line_error(result, "cannot read image", str(bad))


def test_mask_of_another_size(demo_copy: Path, tmp_path: Path) -> None:
    mask = demo_copy / CATEGORY / "ground_truth" / "stain" / "001_mask.png"
    with Image.open(mask) as img:
        assert img.size == (32, 32)
    Image.new("L", (16, 24), 255).save(mask)
    runs = tmp_path / "runs"
    # Packing (the default) reads every mask first: the run fails before any training.
    result = runner.invoke(app, _train_args(demo_copy, runs, "--json"))
    _one_line_error(result, str(mask), "24x16", "32x32")
    assert not (runs / "mvtec").exists()
    # Reading the files directly, training succeeds and evaluation meets the mismatch.
    result = runner.invoke(app, _train_args(demo_copy, runs, "--json", "--pack", "none"))
    _one_line_error(result, str(mask), "24x16", "32x32")
    (run_dir,) = (runs / "mvtec" / CATEGORY).iterdir()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    _one_line_error(runner.invoke(app, ["evaluate", str(run_dir)]), str(mask), "24x16")


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--image-size", "30"], ("30", "not divisible", "8")),
        (["--n-gaussians", "0"], ("Gaussians", "0")),
        (["--noise-std", "-1"], ("noise", "-1")),
        (["--noise-std", "nan"], ("noise_std", "finite", "nan")),
        (["--lr", "inf"], ("lr", "finite", "inf")),
        (["--device", "gpu"], ("'gpu'", "unknown device")),
        (["--mdn-loss", "jensen"], ("mdn_loss", "jensen", "mixture", "reference")),
        (["--variant", "vtadl_huge"], ("vtadl_huge", *VARIANTS)),
        (["--n-gaussians", "many"], ("n_gaussians", "'many'", "auto or all")),
        (["--n-gaussians", "all", "--mixture-fit", "em"], ("n_gaussians all", "kernel")),
        (["--mixture-fit", "bayes"], ("mixture_fit", "bayes", "kernel")),
        (["--grid-shifts", "3"], ("grid_shifts", "patch size 8", "3")),
        (["--kernel-scope", "pixel"], ("kernel_scope", "pixel", "position")),
    ],
    ids=[
        "image-size",
        "n-gaussians",
        "noise-std",
        "nan-noise",
        "inf-lr",
        "device",
        "mdn-loss",
        "variant",
        "gaussians-word",
        "gaussians-all-em",
        "mixture-fit",
        "grid-shifts",
        "kernel-scope",
    ],
)
def test_bad_options(demo_root: Path, tmp_path: Path, extra: list[str], words: tuple) -> None:
    result = runner.invoke(app, _train_args(demo_root, tmp_path / "runs", *extra))
    _one_line_error(result, *words)
    assert not (tmp_path / "runs").exists()


def test_resume_without_previous_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = ["train", "--resume", "--category", CATEGORY, "--out", str(runs), "--epochs", "2"]
    _one_line_error(runner.invoke(app, args), "no run", str(runs / "mvtec" / CATEGORY))


def test_evaluate_missing_run_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_run"
    _one_line_error(runner.invoke(app, ["evaluate", str(missing)]), "not found", str(missing))


def test_predict_missing_image(demo_run: tuple[Path, dict], tmp_path: Path) -> None:
    _, trained = demo_run
    missing = tmp_path / "nothing.png"
    args = ["predict", trained["run_dir"], str(missing), "--out", str(tmp_path / "pred")]
    _one_line_error(runner.invoke(app, args), str(missing))


# ---------------------------------------------------------------- a user's first hour


def test_run_folder_works_from_another_directory(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Relative --root and --out are stored as absolute paths.
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    root = os.path.relpath(demo_root, here)
    payload = _last_json(runner.invoke(app, _train_args(Path(root), Path("runs"), "--json")))
    run_dir = Path(payload["run_dir"]).resolve()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["root"] == str(demo_root)
    assert saved["train"]["out"] == str(here / "runs")
    monkeypatch.chdir(tmp_path)
    _last_json(runner.invoke(app, ["evaluate", str(run_dir), "--json"]))


def test_unreachable_ray_address_fails_in_seconds(demo_root: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    args = _train_args(demo_root, tmp_path / "runs", "--strategy", "ddp", "--num-workers", "2")
    tic = time.monotonic()
    result = runner.invoke(app, [*args, "--ray-address", address])
    _one_line_error(result, address, "does not answer")
    assert time.monotonic() - tic < 30


def test_ray_address_auto_names_what_it_resolved(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "auto" is resolved as Ray resolves it: RAY_ADDRESS first.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    args = _train_args(demo_root, tmp_path / "runs", "--strategy", "ddp", "--num-workers", "2")
    result = runner.invoke(app, [*args, "--ray-address", "auto"])
    _one_line_error(result, "auto", f":{port}", "does not answer")
    bad = runner.invoke(app, [*args, "--ray-address", "headnode"])
    _one_line_error(bad, "'headnode'", "host:port")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(demo_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, _train_args(demo_root, tmp_path / "runs", "--device", "cuda"))
    _one_line_error(result, "'cuda'", "not available")


def test_out_below_a_file(demo_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "runs"
    _one_line_error(runner.invoke(app, _train_args(demo_root, out)), str(out), "Not a directory")


def test_read_only_out(demo_root: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = locked / "runs"
        if os.access(locked, os.W_OK):
            # root writes to mode-555 folders; nobody may create folders in sysfs.
            out = Path("/sys/vtadl-test-runs")
        result = runner.invoke(app, _train_args(demo_root, out))
        line = _one_line_error(result, str(out))
        reasons = ("Permission denied", "Operation not permitted", "Read-only file system")
        assert any(reason in line for reason in reasons), line
    finally:
        locked.chmod(0o755)


def test_operating_system_errors_are_one_line(tmp_path: Path) -> None:
    # No early check here: the boundary turns the OSError into one line naming the path.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = runner.invoke(app, ["data", "demo", str(blocker / "demo")])
    _one_line_error(result, str(blocker), "Not a directory")


def test_test_split_without_anomalies_fails_before_training(
    demo_copy: Path, tmp_path: Path
) -> None:
    category = demo_copy / CATEGORY
    for folder in [*(category / "test").iterdir(), category / "ground_truth"]:
        if folder.name != "good":
            shutil.rmtree(folder)
    result = runner.invoke(app, _train_args(demo_copy, tmp_path / "runs"))
    _one_line_error(result, "test split", "no anomalous images")
    assert not list((tmp_path / "runs").rglob("*.pt"))


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        (["--tile", "32"], "tile"),
        (["--pack", "none"], "pack"),
        (["--augment"], "augment"),
        (["--variant", "vtadl_small"], "variant"),
        (["--lr", "0.01"], "lr"),
    ],
    ids=["tile", "pack", "augment", "variant", "lr"],
)
def test_resume_refuses_what_it_cannot_honour(resumable: Path, extra: list[str], word: str) -> None:
    args = ["train", "--resume", "--category", CATEGORY, "--out", str(resumable), "--epochs", "2"]
    _one_line_error(runner.invoke(app, [*args, *extra]), word, "cannot change")


def test_resume_honours_a_moved_root(resumable: Path, demo_root: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(demo_root, moved)
    args = ["train", "--resume", "--category", CATEGORY, "--out", str(resumable), "--epochs", "2"]
    # Options that equal the stored ones are no change.
    same = ["--variant", "vtadl_tiny", "--batch-size", "4", "--image-size", "32"]
    payload = _last_json(runner.invoke(app, [*args, *same, "--root", str(moved), "--json"]))
    run_dir = Path(payload["run_dir"])
    assert _history_lines(run_dir) == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["root"] == str(moved)


@pytest.fixture
def resumable(demo_root: Path, tmp_path: Path) -> Path:
    """A runs folder with one finished one-epoch run of the demo category."""
    runs = tmp_path / "runs"
    _last_json(runner.invoke(app, _train_args(demo_root, runs, "--json")))
    return runs


def test_resume_refuses_a_config_file(resumable: Path, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n")
    args = ["train", "--resume", "--category", CATEGORY, "--out", str(resumable)]
    _one_line_error(runner.invoke(app, [*args, "--config", str(path)]), "--config")


def test_progress_lines_when_stderr_is_not_a_terminal(demo_root: Path, tmp_path: Path) -> None:
    args = _train_args(demo_root, tmp_path / "runs", "--json")
    args[args.index("--epochs") + 1] = "2"
    result = runner.invoke(app, args)
    _last_json(result)
    epochs = [ln for ln in result.stderr.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all(re.search(r"loss -?[\d.]+, val -?[\d.]+.*, [\d.]+ s$", ln) for ln in epochs)


def test_help_is_for_users() -> None:
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    assert "library function" not in top.output and "defects" in top.output
    data = runner.invoke(app, ["data", "--help"])
    description = data.output.split("Options")[0]
    commands = get_command(app).commands["data"].commands
    assert {"demo", "download", "check", "pack"} <= set(commands)
    for command in commands:
        assert command in description, command


def test_every_train_option_has_help_and_a_default() -> None:
    command = get_command(app).commands["train"]
    for param in command.params:
        name = param.opts[0]
        assert param.help, name
        if param.is_flag and not param.secondary_opts:
            assert param.default is False and param.metavar == "", name  # a flag, no value
        elif name != "--category" and name != "--config":
            assert param.show_default, name
        if name == "--n-gaussians":
            assert "paper 150" in param.show_default  # the variant's value, not "None"
    text = runner.invoke(app, ["train", "--help"]).output
    flags = [ln for ln in text.splitlines() if re.search(r"--(resume|json|augment)\b", ln)]
    assert len(flags) == 3 and not any("<bool>" in ln for ln in flags)


def test_every_train_option_is_a_config_field_or_named_apart() -> None:
    from vtadl.cli.options import NOT_FIELDS, TRAIN_FIELDS
    from vtadl.cli.run import train
    from vtadl.config import Config

    fields = {
        f"{section}.{name}"
        for section, values in Config().to_dict().items()
        if isinstance(values, dict)
        for name in values
    }
    options = set(inspect.signature(train).parameters)
    assert options == set(TRAIN_FIELDS) | NOT_FIELDS and not set(TRAIN_FIELDS) & NOT_FIELDS
    assert set(TRAIN_FIELDS.values()) <= fields, set(TRAIN_FIELDS.values()) - fields
    assert len(set(TRAIN_FIELDS.values())) == len(TRAIN_FIELDS)  # one option per field


@pytest.mark.parametrize(
    ("extra", "field", "value"),
    [
        (["--loader-workers", "3"], "data.num_workers", 3),
        (["--image-size", "64", "--score-scale", "linear"], "model.img_size", 64),
        (["--image-size", "64", "--score-scale", "linear"], "eval.scale", "linear"),
        ([], "model.img_size", VARIANTS["vtadl_tiny"].img_size),  # not given: the variant's
    ],
)
def test_a_train_option_lands_in_the_config(
    tmp_path: Path, extra: list[str], field: str, value: object
) -> None:
    from vtadl.cli.options import config_from_options

    args = ["--root", str(tmp_path), "--category", CATEGORY, "--variant", "vtadl_tiny", *extra]
    parsed = get_command(app).commands["train"].make_context("train", args).params
    cfg, run_dir = config_from_options(parsed)
    section, name = field.split(".")
    assert getattr(getattr(cfg, section), name) == value
    assert (cfg.data.root, cfg.data.category, run_dir) == (str(tmp_path), CATEGORY, None)
