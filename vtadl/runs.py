"""One entry point for a run, and what a `train` request means.

`train_config` resolves options into a config (or the run to resume); `fit` trains a config
with its strategy; `train_and_evaluate` is a whole run. The CLI, the queue's job function and
Tune trials all call these, so none of them knows how a strategy is launched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtadl.config import Config, default_config, load_config
from vtadl.exceptions import ConfigError

if TYPE_CHECKING:
    from vtadl.training import Callbacks


def fit(
    config: Config, *, run_dir: str | Path | None = None, callbacks: Callbacks | None = None
) -> Path:
    """Train `config` with its strategy, in this process or on Ray Train workers.

    With `run_dir`, train in that folder, continuing from its last checkpoint if it has one.
    Returns the run folder.
    """
    if config.train.strategy == "single":
        from vtadl.training import fit as fit_here

        return fit_here(config, run_dir=run_dir, callbacks=callbacks)
    from vtadl.distributed import fit_distributed

    return fit_distributed(config, run_dir=run_dir, callbacks=callbacks)


def train_and_evaluate(
    config: Config,
    *,
    run_dir: str | Path | None = None,
    callbacks: Callbacks | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """A whole run: `fit`, then evaluate the best checkpoint on the test split.
    Returns the run folder and the metrics (as in its metrics.json)."""
    from vtadl.evaluation import evaluate_run

    run_dir = fit(config, run_dir=run_dir, callbacks=callbacks)
    return run_dir, evaluate_run(run_dir, progress=progress)


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def train_config(
    *,
    config_file: str | Path | None = None,
    variant: str | None = None,
    dataset: str = "mvtec",
    root: str | Path | None = None,
    category: str | None = None,
    resume: bool = False,
    data: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    eval: dict[str, Any] | None = None,
) -> tuple[Config, Path | None]:
    """The config to train and, with `resume`, the run folder to continue.

    Precedence: variant defaults < config file < explicit options. A resumed run keeps the
    config stored with it; only the number of epochs may change.
    """
    from vtadl.training import latest_run

    model, train, eval = _given(model or {}), _given(train or {}), _given(eval or {})
    if resume:
        base = load_config(config_file) if config_file else default_config(variant or "vtadl_paper")
        out = train.get("out", base.train.out)
        if not category:
            raise ConfigError("--resume needs --category (and --dataset) to find the run")
        run_dir = latest_run(out, dataset, category)
        stored = load_config(run_dir / "config.yaml")
        changed = sorted(set(model) | set(eval) | (set(train) - {"epochs", "out"}))
        if changed:
            raise ConfigError(f"a resumed run keeps its config; cannot change {', '.join(changed)}")
        return stored.override(train={"epochs": train.get("epochs")}), run_dir

    if config_file:
        cfg = load_config(config_file)
        if variant and variant != cfg.variant:
            cfg = default_config(variant).override(
                **{k: v for k, v in cfg.to_dict().items() if k not in ("variant", "model")}
            )
    else:
        cfg = default_config(variant or "vtadl_paper")
    data = _given(
        {"dataset": dataset, "root": str(root) if root else None, "category": category}
        | (data or {})
    )
    cfg = cfg.override(model=model, train=train, data=data, eval=eval)
    if not cfg.data.category:
        raise ConfigError("no category given (--category NAME)")
    return cfg, None
