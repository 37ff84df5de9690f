"""Ray Train with DDP and DeepSpeed on 2 CPU workers: real Ray, real gloo, real DeepSpeed.

One private local Ray instance serves the module. The runs use the default configuration,
token noise included: the noise, like the batches and the flips, is drawn per global batch and
each worker takes its slice. With the same seed and global batch, 2 DDP or DeepSpeed workers
therefore compute the same gradients as one process up to float summation order, so their
results must match the single-process run closely: validation losses to 1e-4 (relative),
weights to 1e-3 (absolute).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vtadl.checkpoints import load_checkpoint
from vtadl.config import default_config
from vtadl.distributed import deepspeed_config
from vtadl.evaluation import evaluate_run
from vtadl.exceptions import ConfigError
from vtadl.runs import fit

ray = pytest.importorskip("ray")

EPOCHS = 3


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _config(root: Path, out: Path, **train):
    config = default_config("vtadl_tiny").override(
        data={"root": str(root), "category": "brick"},
        train={"epochs": EPOCHS, "batch_size": 4, "out": str(out), "seed": 3, **train},
    )
    assert config.model.noise_std > 0  # the default noise is on
    return config


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(ray_local, demo_root: Path, tmp_path_factory) -> dict:
    """The single-process reference, a DeepSpeed run, and a DDP run trained in two calls:
    EPOCHS - 1 epochs, then resumed from its folder for the last one, so the DDP run's match
    with the reference also checks that a resumed distributed run continues exactly."""
    out = tmp_path_factory.mktemp("dist")
    ddp = _config(demo_root, out / "ddp", strategy="ddp", num_workers=2)
    first = fit(ddp.override(train={"epochs": EPOCHS - 1}))
    before = (first / "history.jsonl").read_text().splitlines()
    return {
        "single": fit(_config(demo_root, out / "single")),
        "ddp": fit(ddp, run_dir=first),
        "ddp_before_resume": before,
        "deepspeed": fit(
            _config(demo_root, out / "ds", strategy="deepspeed", num_workers=2, zero_stage=2)
        ),
    }


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_distributed_matches_single_process(runs: dict[str, Path], strategy: str) -> None:
    run, ref = runs[strategy], runs["single"]
    history, ref_history = _history(run), _history(ref)
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(h["workers"] == 2 and h["per_worker_batch_size"] == 2 for h in history)
    for h, r in zip(history, ref_history, strict=True):
        assert h["val_loss"] == pytest.approx(r["val_loss"], rel=1e-4)
        assert h["loss"] == pytest.approx(r["loss"], rel=1e-4)
    a = load_checkpoint(run / "checkpoints" / "last.pt")
    b = load_checkpoint(ref / "checkpoints" / "last.pt")
    assert a["config"]["train"]["strategy"] == strategy
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, atol=1e-3, rtol=0)
    assert (run / "checkpoints" / "best.pt").is_file()
    assert sorted(p.name for p in (run / "ray" / "ray_train").glob("epoch_*"))[-1] == "epoch_0003"


def test_metrics_from_rank_zero_match_single_process(runs: dict[str, Path]) -> None:
    ref = evaluate_run(runs["single"])
    got = evaluate_run(runs["ddp"])
    assert got["n_test"] == ref["n_test"]  # the whole test split, not a shard
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        assert got[key] == pytest.approx(ref[key], abs=0.02)


def test_deepspeed_config_from_project_and_expert_file(demo_root, tmp_path) -> None:
    config = _config(
        demo_root,
        tmp_path,
        strategy="deepspeed",
        num_workers=2,
        zero_stage=1,
        precision="bf16",
        batch_size=8,
    )
    ds = deepspeed_config(config)
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["bf16"] == {"enabled": True}
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    expert = tmp_path / "ds.json"
    expert.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 99}))
    ds = deepspeed_config(config.override(train={"deepspeed_config": str(expert)}))
    assert ds["zero_optimization"] == {"stage": 3} and ds["train_batch_size"] == 8
    expert.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read DeepSpeed config"):
        deepspeed_config(config.override(train={"deepspeed_config": str(expert)}))
    with pytest.raises(ConfigError, match="divide evenly over 3 workers"):
        config.override(train={"num_workers": 3})


def test_distributed_run_resumes_later_from_its_folder(runs: dict[str, Path]) -> None:
    # A worker killed mid-run (Ray Train's restart from the last checkpoint) is covered by
    # tests/test_cluster.py, which loses a whole node.
    history = (runs["ddp"] / "history.jsonl").read_text().splitlines()
    assert history[: EPOCHS - 1] == runs["ddp_before_resume"]  # not trained again
    assert [json.loads(line)["epoch"] for line in history] == list(range(1, EPOCHS + 1))
    assert load_checkpoint(runs["ddp"] / "checkpoints" / "last.pt")["epoch"] == EPOCHS - 1
