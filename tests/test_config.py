from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vtadl.config import (
    VARIANTS,
    Config,
    ModelConfig,
    TrainConfig,
    config_json,
    default_config,
    load_config,
    save_config,
    variant_config,
)
from vtadl.exceptions import ConfigError


def _custom() -> Config:
    """A config that differs from the defaults in every section."""
    return default_config("vtadl_tiny").override(
        model={"img_size": 48, "patch_size": 12, "noise_std": 0.0, "mdn_condition": "position"},
        data={"root": "/data/mvtec", "category": "bottle", "val_fraction": 0.25},
        train={
            "epochs": 7,
            "lr": 3e-4,
            "mdn_loss": "reference",
            "w_nll": 0.5,
            "mixture_fit": "sgd",
        },
        eval={"score": "nll+recon", "image_score": "top1pct", "smoothing_sigma": 0.0},
    )


def test_dict_json_round_trip() -> None:
    cfg = _custom()
    raw = json.loads(json.dumps(cfg.to_dict()))
    back = Config.from_dict(raw)
    assert back == cfg
    assert isinstance(back.model, ModelConfig) and isinstance(back.train, TrainConfig)
    assert json.loads(config_json(cfg)) == cfg.to_dict()


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = _custom()
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert yaml.safe_load(path.read_text())["model"]["img_size"] == 48
    assert load_config(path) == cfg


def test_json_file_loads(tmp_path: Path) -> None:
    cfg = _custom()
    path = tmp_path / "config.json"
    path.write_text(config_json(cfg))
    assert load_config(path) == cfg


def test_partial_file_fills_from_variant(tmp_path: Path) -> None:
    path = tmp_path / "partial.yaml"
    path.write_text("variant: vtadl_tiny\nmodel:\n  n_gaussians: 7\ntrain:\n  epochs: 3\n")
    cfg = load_config(path)
    assert cfg.variant == "vtadl_tiny"
    tiny = VARIANTS["vtadl_tiny"]
    assert cfg.model.n_gaussians == 7
    assert cfg.model.embed_dim == tiny.embed_dim == 32
    assert cfg.model.img_size == tiny.img_size
    assert cfg.train.epochs == 3
    assert cfg.train.lr == TrainConfig().lr
    assert cfg.eval == default_config("vtadl_tiny").eval


def test_file_without_variant_uses_the_paper_model(tmp_path: Path) -> None:
    path = tmp_path / "partial.yaml"
    path.write_text("data:\n  category: bottle\n")
    cfg = load_config(path)
    assert cfg.variant == "vtadl_paper"
    assert cfg.model == VARIANTS["vtadl_paper"]
    assert cfg.data.category == "bottle"


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("model:\n  embed_dimension: 8\n", "embed_dimension"),
        ("train:\n  epoch: 3\n", "epoch"),
        ("optimizer:\n  lr: 1.0\n", "optimizer"),
        ("variant: nope\n", "nope"),
        ("- a\n- b\n", "mapping"),
        ("model: [1, 2\n", "not valid"),
        ("model:\n  noise_std: .nan\n", "noise_std must be a finite number"),
        ("train:\n  lr: .inf\n", "lr must be a finite number"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, word: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=word):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_unknown_option_names() -> None:
    cfg = default_config("vtadl_tiny")
    with pytest.raises(ConfigError, match="lerning_rate"):
        cfg.override(train={"lerning_rate": 1.0})
    with pytest.raises(ConfigError, match="optim"):
        cfg.override(optim={"lr": 1.0})
    with pytest.raises(ConfigError, match="depht"):
        variant_config("vtadl_tiny", depht=3)
    raw = cfg.to_dict()
    raw["eval"]["scores"] = "nll"
    with pytest.raises(ConfigError, match="scores"):
        Config.from_dict(raw)


def test_unknown_variant_lists_known() -> None:
    with pytest.raises(ConfigError) as excinfo:
        default_config("vtadl_huge")
    assert all(name in str(excinfo.value) for name in VARIANTS)


def test_override_ignores_none_and_keeps_the_rest() -> None:
    cfg = default_config("vtadl_tiny").override(train={"epochs": 5, "lr": None})
    assert cfg.train.epochs == 5
    assert cfg.train.lr == TrainConfig().lr
    assert cfg.model == VARIANTS["vtadl_tiny"]


@pytest.mark.parametrize(
    ("sections", "word"),
    [
        ({"model": {"img_size": 30}}, "not divisible"),
        ({"model": {"n_gaussians": 0}}, "Gaussians"),
        ({"model": {"n_gaussians": -3}}, "Gaussians"),
        ({"model": {"noise_std": -0.1}}, "noise"),
        ({"model": {"mdn_condition": "pixel"}}, "mdn_condition"),
        ({"model": {"num_heads": 3}}, "num_heads"),
        ({"train": {"mdn_loss": "jensen"}}, "mdn_loss"),
        ({"train": {"epochs": 0}}, "epochs"),
        ({"train": {"lr": -1.0}}, "learning rate"),
        ({"train": {"precision": "fp8"}}, "precision"),
        ({"data": {"val_fraction": 1.0}}, "val_fraction"),
        ({"eval": {"score": "ssim"}}, "score"),
        ({"eval": {"image_score": "median"}}, "image_score"),
        ({"eval": {"smoothing_sigma": -1.0}}, "sigma"),
        ({"eval": {"scale": "sqrt"}}, "scale"),
        ({"train": {"lr": "fast"}}, "lr must be a number"),
        ({"train": {"epochs": 2.5}}, "epochs must be an integer"),
        ({"data": {"augment": "yes"}}, "augment must be true or false"),
        ({"data": {"category": 3}}, "category must be a string"),
        ({"model": {"noise_std": float("nan")}}, "noise_std must be a finite number"),
        ({"train": {"grad_clip": float("inf")}}, "grad_clip must be a finite number"),
        ({"eval": {"smoothing_sigma": "nan"}}, "smoothing_sigma must be a finite number"),
        ({"train": {"weight_decay": -1.0}}, "weight_decay"),
        ({"train": {"cpus_per_worker": 0.0}}, "cpus_per_worker"),
    ],
)
def test_validation_errors(sections: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word) as excinfo:
        default_config("vtadl_tiny").override(**sections)
    assert "\n" not in str(excinfo.value)


def test_validation_error_from_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("variant: vtadl_tiny\ntrain:\n  mdn_loss: bogus\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(path)


def test_numbers_written_as_strings_are_read_as_numbers(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-4 (no dot) as a string; users write it that way.
    path = tmp_path / "c.yaml"
    path.write_text("variant: vtadl_tiny\ntrain:\n  lr: 1e-4\n  epochs: 3.0\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert default_config("vtadl_tiny").override(model={"noise_std": 0}).model.noise_std == 0.0


def test_precedence_variant_then_file_then_options(tmp_path: Path) -> None:
    from vtadl.runs import train_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "variant: vtadl_tiny\nmodel:\n  n_gaussians: 7\ndata:\n  dataset: btad\n"
        "train:\n  epochs: 3\n  mixture_fit: em\n"
    )
    # Another variant: its defaults, then the file's values on top of them.
    cfg, _ = train_config(
        config_file=path, variant="vtadl_small", overrides={"data": {"category": "01"}}
    )
    assert cfg.variant == "vtadl_small"
    assert cfg.model.n_gaussians == 7
    assert cfg.model.embed_dim == VARIANTS["vtadl_small"].embed_dim
    assert (cfg.data.dataset, cfg.train.epochs) == ("btad", 3)  # no option: the file's
    # Options win over the file.
    cfg, _ = train_config(
        config_file=path,
        overrides={"data": {"category": "01", "dataset": "mvtec"}, "model": {"n_gaussians": 5}},
    )
    assert (cfg.variant, cfg.model.n_gaussians, cfg.data.dataset) == ("vtadl_tiny", 5, "mvtec")


def test_paths_are_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vtadl.runs import train_config

    monkeypatch.chdir(tmp_path)
    cfg, _ = train_config(
        variant="vtadl_tiny",
        overrides={
            "data": {
                "root": "data",
                "category": "brick",
                "pack": "packs/x.h5",
                "local_copy": "scratch",
            },
            "train": {"out": "runs", "deepspeed_config": "ds.json"},
        },
    )
    assert cfg.data.root == str(tmp_path / "data")
    assert cfg.data.pack == str(tmp_path / "packs" / "x.h5")
    assert cfg.data.local_copy == str(tmp_path / "scratch")
    assert cfg.train.out == str(tmp_path / "runs")
    assert cfg.train.deepspeed_config == str(tmp_path / "ds.json")
    cfg, _ = train_config(
        variant="vtadl_tiny", overrides={"data": {"category": "brick", "pack": "none"}}
    )
    assert cfg.data.pack == "none" and cfg.data.pack_cache == ""
