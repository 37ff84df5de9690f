"""What `vtadl submit` does: one queued job per category (a training, or a Ray Tune search),
every category checked and every config built before anything is enqueued."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vtadl.data import dataset_categories
from vtadl.data.check import check_dataset
from vtadl.exceptions import ConfigError, DataError
from vtadl.job_contract import queue_name
from vtadl.queue import (
    DEFAULT_TIMEOUT,
    Submission,
    check_retries,
    make_request,
    parse_duration,
    submit,
)
from vtadl.runs import train_config
from vtadl.service import connect
from vtadl.tune.settings import settings_from_options
from vtadl.tune.trial import settings_for

logger = logging.getLogger(__name__)

# A search's values: a training job (no search) has no use for them.
_SEARCHED = ("gaussians", "noise")


def submit_categories(
    *,
    dataset: str,
    root: str | Path,
    categories: Sequence[str] | None,
    all_categories: bool,
    overrides: dict[str, dict[str, Any]],
    config_file: str | Path | None = None,
    variant: str | None = None,
    preset: str | None = None,
    kind: str = "train",
    search: dict[str, Any] | None = None,
    priority: str = "normal",
    timeout: str | int | None = None,
    retries: int = 0,
    retry_backoff: int = 60,
    force: bool = False,
    redis_url: str | None = None,
    warn: Callable[[str], None] = logger.warning,
) -> list[Submission]:
    """Queue one `kind` job ("train", or "tune" with the `search` options of
    `vtadl.tune.driver.tune`) per category of `categories`, or of every category under `root`.

    `overrides` are the config sections the options set; they, `config_file`, `variant` and
    `preset` are as `vtadl.runs.train_config` takes them. `timeout` is a duration such as
    "12h" (None: the queue's default); `warn` receives each dataset warning. Raises on the
    first invalid option or category, before connecting to the queue's Redis (`redis_url`)
    and enqueueing anything.
    """
    queue_name(priority)
    check_retries(retries, retry_backoff)
    seconds = DEFAULT_TIMEOUT if timeout is None else parse_duration(timeout)
    if kind == "tune":
        settings_from_options(search or {})
    elif any((search or {}).get(k) is not None for k in _SEARCHED):
        raise ConfigError("--gaussians and --noise are search values: add --tune")
    requests = category_requests(
        dataset=dataset,
        root=root,
        categories=categories,
        all_categories=all_categories,
        overrides=overrides,
        config_file=config_file,
        variant=variant,
        preset=preset,
        search=search if kind == "tune" else None,
        warn=warn,
    )
    return submit(
        connect(redis_url),
        requests,
        priority=priority,
        timeout=seconds,
        retries=retries,
        retry_backoff=retry_backoff,
        force=force,
    )


def category_requests(
    *,
    dataset: str,
    root: str | Path,
    categories: Sequence[str] | None,
    all_categories: bool,
    overrides: dict[str, dict[str, Any]],
    config_file: str | Path | None = None,
    variant: str | None = None,
    preset: str | None = None,
    search: dict[str, Any] | None = None,
    warn: Callable[[str], None] = logger.warning,
) -> list[dict]:
    """The queue requests of `submit_categories`: a "train" request per category, or with
    `search` a "tune" one. Each category's dataset is checked first: its errors raise
    DataError, its warnings go to `warn`. Every path in a request is absolute, since workers
    may run elsewhere and in other folders."""
    if bool(categories) == all_categories:
        raise ConfigError("give --category C (repeatable) or --all-categories")
    names = dataset_categories(dataset, root) if all_categories else list(dict.fromkeys(categories))
    requests = []
    for name in names:
        where = {"dataset": dataset, "root": str(root), "category": name}
        sections = {**overrides, "data": {**overrides.get("data", {}), **where}}
        # train_config makes every path absolute: workers may run in other folders
        cfg, _ = train_config(
            overrides=sections, config_file=config_file, variant=variant, preset=preset
        )
        _check(dataset, root, name, warn)  # a valid config first: its category is a plain name
        if search is not None:  # the searched values fit this config (K all: a kernel)
            settings_for(cfg, settings_from_options(search))
        requests.append(
            make_request("train", cfg) if search is None else make_request("tune", cfg, search)
        )
    return requests


def _check(dataset: str, root: str | Path, category: str, warn: Callable[[str], None]) -> None:
    report = check_dataset(dataset, root, category)
    if report.errors:
        first = report.errors[0].message
        more = f" (and {len(report.errors) - 1} more; see vtadl data check)"
        raise DataError(f"{dataset}/{category}: {first}" + (more if len(report.errors) > 1 else ""))
    for warning in report.warnings:
        warn(warning.message)
