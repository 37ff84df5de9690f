"""Shared fixtures: a tiny demo dataset and tiny configs that train in seconds on a CPU."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vtadl.config import Config, default_config
from vtadl.data.demo import make_demo_dataset

CATEGORY = "brick"
# 12 train images (11 train + 1 validation), 4 good + 4 x 2 defect test images, 32 px.
TINY_DEMO = {"image_size": 32, "n_train": 12, "n_test_good": 4, "n_test_defect": 2}


@pytest.fixture(scope="session", autouse=True)
def private_state(tmp_path_factory: pytest.TempPathFactory):
    """Keep the private Redis of any test that starts one out of the user's state folder,
    and stop it at the end."""
    import os

    from vtadl.service import STATE_ENV, PrivateServer

    folder = tmp_path_factory.mktemp("state")
    previous = os.environ.get(STATE_ENV)
    os.environ[STATE_ENV] = str(folder)
    yield folder
    PrivateServer(folder / "redis").stop()
    if previous is None:
        os.environ.pop(STATE_ENV, None)
    else:
        os.environ[STATE_ENV] = previous


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention tiny demo dataset; copy it (`demo_copy`) before changing it."""
    root = tmp_path_factory.mktemp("tiny_demo")
    assert make_demo_dataset(root, categories=[CATEGORY], **TINY_DEMO) == [CATEGORY]
    return root


@pytest.fixture
def demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny demo dataset that a test may damage."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    return root


def tiny_config(root: Path, out: Path, **train: Any) -> Config:
    """vtadl_tiny at 32 px on the demo category, 2 epochs of batch 4 unless overridden."""
    return default_config("vtadl_tiny").override(
        data={"root": str(root), "category": CATEGORY},
        train={"epochs": 2, "batch_size": 4, "out": str(out), **train},
    )


@pytest.fixture(scope="session")
def config_for() -> Callable[..., Config]:
    """`config_for(root, out, **train_overrides)`: the tiny config, for module fixtures."""
    return tiny_config


@pytest.fixture
def make_config(demo_root: Path, tmp_path: Path) -> Callable[..., Config]:
    """`make_config(**train_overrides)`: a tiny config whose runs go under tmp_path/runs."""

    def make(**train: Any) -> Config:
        return tiny_config(demo_root, tmp_path / "runs", **train)

    return make
