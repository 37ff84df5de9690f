"""Cluster files as `ray up` reads them, the vtadl commands they run, and local pack copies."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import typer
import yaml

from vtadl.cli import app
from vtadl.data.stage import local_copy, sha256
from vtadl.exceptions import DataError

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = [REPO / "ray_cluster.yaml", *sorted((REPO / "cluster").glob("*.yaml"))]


def _commands(config: dict) -> list[str]:
    found = []
    for key, value in config.items():
        if key.endswith("_commands"):
            found += list(value)
    for node_type in (config.get("available_node_types") or {}).values():
        for key, value in node_type.items():
            if key.endswith("_commands"):
                found += list(value)
    return found


def vtadl_invocations(command: str) -> list[tuple[list[str], list[str]]]:
    """(sub-command path, --options) of every `vtadl ...` call in a shell command."""
    calls = []
    for segment in re.split(r"&&|;|\|\||>>|\s&\s|\s&$", command):
        match = re.search(r"(?<![\w/.~-])vtadl((?:\s+[a-z][a-z-]*)+)(.*)", segment)
        if match:
            path = match.group(1).split()
            calls.append((path, re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", match.group(2))))
    return calls


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_rays_own_validation(path: Path) -> None:
    # The two steps `ray up` takes before it touches a cloud. They are Ray's private API
    # (ray.autoscaler._private.util), so pyproject.toml pins Ray's minor version.
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["cluster_name"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_vtadl_command_in_cluster_files_exists(path: Path) -> None:
    root = typer.main.get_command(app)
    calls = [
        c for cmd in _commands(yaml.safe_load(path.read_text())) for c in vtadl_invocations(cmd)
    ]
    assert any(p == ["worker"] for p, _ in calls) and any(
        p[:2] == ["service", "start"] for p, _ in calls
    )
    for sub_path, options in calls:
        command = root
        for name in sub_path:
            assert name in getattr(command, "commands", {}), (sub_path, path)
            command = command.commands[name]
        known = {opt for param in command.params for opt in param.opts}
        assert set(options) <= known, (sub_path, sorted(set(options) - known))


def test_the_command_parser_sees_options_and_ignores_paths() -> None:
    cmd = ". ~/.vtadl/env && vtadl service start --dir ~/redis --port 6380 ; ls ~/vtadl/x"
    assert vtadl_invocations(cmd) == [(["service", "start"], ["--dir", "--port"])]
    assert vtadl_invocations("nohup vtadl worker --ray-adress a >> log 2>&1 &") == [
        (["worker"], ["--ray-adress"])
    ]


def test_local_copy_matches_its_source_and_replaces_a_stale_one(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "mvtec_brick.h5"
    shared.parent.mkdir()
    shared.write_bytes(os.urandom(3 * 2**20 + 17))
    node = tmp_path / "node"
    copy1 = local_copy(shared, node)
    assert copy1.parent == node and sha256(copy1) == sha256(shared)
    assert local_copy(shared, node) == copy1  # reused, not copied again
    first_inode = copy1.stat().st_ino

    shared.write_bytes(os.urandom(2**20))  # repacked: other content and time
    copy2 = local_copy(shared, node)
    assert copy2 == copy1 and sha256(copy2) == sha256(shared)
    assert copy2.stat().st_ino != first_inode

    copy2.write_bytes(b"truncated")  # a damaged copy of another size is replaced too
    assert sha256(local_copy(shared, node)) == sha256(shared)
    assert not list(node.glob(".*.tmp"))

    with pytest.raises(DataError, match="not found"):
        local_copy(tmp_path / "missing.h5", node)
