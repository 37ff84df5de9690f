"""The HTML report of plain runs, and the TensorBoard dashboard (searches: test_tuning.py)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtadl.cli.main import app
from vtadl.runs import train_and_evaluate


@pytest.fixture(scope="module")
def runs(demo_root: Path, config_for, tmp_path_factory) -> Path:
    """One evaluated tiny run of brick, and a copy filed as MVTec's bottle."""
    out = tmp_path_factory.mktemp("report") / "runs"
    run_dir, _ = train_and_evaluate(config_for(demo_root, out))
    bottle = out / "mvtec" / "bottle" / run_dir.name
    shutil.copytree(run_dir, bottle)
    metrics = json.loads((bottle / "metrics.json").read_text())
    (bottle / "metrics.json").write_text(json.dumps({**metrics, "category": "bottle"}))
    return out


def test_report_holds_metrics_paper_figures_curves_and_maps(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    [brick] = [p for p in runs.glob("mvtec/brick/*")]
    metrics = json.loads((brick / "metrics.json").read_text())
    table = page[page.index("<table>") : page.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    assert [re.findall(r"<td>(.*?)</td>", r)[0] for r in rows[1:]] == ["bottle", "brick", "mean"]
    assert "paper: pixel AUROC (the paper calls it PRO)" in table
    assert "<td>0.949</td>" in rows[1]  # bottle's figure in the paper
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        assert f"<td>{metrics[key]:.3f}</td>" in rows[3]  # same run twice: mean = value
    n_maps = len(list((brick / "maps").glob("*.png")))
    assert n_maps > 0
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 * (1 + n_maps)  # per category: loss curves and the heat maps
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http://" not in page and "https://" not in page and "<script" not in page


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_report_of_nothing_is_one_line_and_exit_2(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "runs"
    if make == "empty":
        folder.mkdir()
    result = CliRunner().invoke(app, ["report", str(folder), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_tensorboard_until_interrupted(runs: Path) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "vtadl", "dashboard", str(runs), "--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"TensorBoard: http://127.0.0.1:{port}/")
        assert "Ray dashboard" in proc.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=30) as r:
            served = json.loads(r.read())
        assert any("tensorboard" in name for name in served)  # the run's own event files
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_trial_ids_that_look_like_numbers_stay_text(tmp_path: Path) -> None:
    import csv

    from vtadl.config import default_config
    from vtadl.report import find_experiments
    from vtadl.tune.settings import RESULTS_FILE, SETTINGS_FILE

    folder = tmp_path / "tune" / "mvtec" / "brick" / "exp"
    folder.mkdir(parents=True)
    config = default_config("vtadl_tiny").override(data={"category": "brick"})
    settings = {"space": {"n_gaussians": [2]}, "metric": "au_pro"}
    (folder / SETTINGS_FILE).write_text(
        json.dumps({"config": config.to_dict(), "settings": settings})
    )
    with open(folder / RESULTS_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, ["trial_id", "n_gaussians", "au_pro", "epochs", "state"])
        writer.writeheader()
        writer.writerow(
            {"trial_id": "12e45_00001", "n_gaussians": 2, "au_pro": 0.5, "epochs": 3,
             "state": "completed"}
        )  # fmt: skip
    (exp,) = find_experiments(tmp_path)
    assert exp.rows[0]["trial_id"] == "12e45_00001"
    assert exp.rows[0]["au_pro"] == 0.5
