"""Run folders: where a new run goes, which run a resume continues, and whether the runs
folder can be written at all."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from vtadl.checkpoints import LAST
from vtadl.config import Config
from vtadl.exceptions import ConfigError, RunError


def new_run_dir(config: Config) -> Path:
    d = config.data
    parent = Path(config.train.out) / d.dataset / d.category
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir, n = parent / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = parent / f"{stamp}-{n}"
    return run_dir


def latest_run(out: str | Path, dataset: str, category: str) -> Path:
    """The newest run folder of a category that has a checkpoint to resume from."""
    parent = Path(out) / dataset / category
    runs = sorted(p.parent.parent for p in parent.glob(f"*/checkpoints/{LAST}"))
    if not runs:
        raise RunError(f"no run with a checkpoint to resume under {parent}")
    return runs[-1]


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed and make sure files can be written in it: a ConfigError
    naming the folder, before any work, instead of a failure after packing or training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the runs folder {folder}: {exc.strerror or exc}"
        ) from None


def truncate_history(path: Path, epochs_done: int) -> None:
    """Drop history lines of epochs after the checkpoint a resumed run starts from."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["epoch"] <= epochs_done]
        path.write_text("".join(ln + "\n" for ln in kept))
