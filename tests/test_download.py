"""Downloads from local archives through file:// URLs: verification and safe extraction."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vtadl.cli.main import app
from vtadl.data import index_btad, index_mnist, index_mvtec
from vtadl.data.download import MNIST_SHA256, download
from vtadl.data.mnist import MNIST_FILES, write_idx
from vtadl.exceptions import DataError

runner = CliRunner()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png_bytes(value: int = 128, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (8, 6), value).save(buffer, format="PNG")
    return buffer.getvalue()


def _mvtec_members() -> dict[str, bytes]:
    return {
        "bottle/train/good/000.png": _png_bytes(),
        "bottle/test/good/000.png": _png_bytes(),
        "bottle/test/crack/000.png": _png_bytes(90),
        "bottle/ground_truth/crack/000_mask.png": _png_bytes(255, "L"),
        "license.txt": b"CC BY-NC-SA 4.0\n",
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar(
    path: Path, members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None
) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            _add(tar, name, data)
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return path


def _zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            z.writestr(info, target)
    return path


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_tar_download_verified_and_extracted(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "mvtec.tar.gz", _mvtec_members())
    root = tmp_path / "data" / "mvtec"
    assert download("mvtec", root, url=archive.as_uri(), sha256=_sha256(archive)) == root
    assert _leftovers(root) == ["bottle", "license.txt"]
    assert [s.image.name for s in index_mvtec(root, "bottle")] == ["000.png"] * 3


def test_zip_with_one_top_folder(tmp_path: Path) -> None:
    members = {
        "BTech_Dataset_transformed/01/train/ok/0000.bmp": _png_bytes(),
        "BTech_Dataset_transformed/01/test/ko/0000.bmp": _png_bytes(),
        "BTech_Dataset_transformed/01/ground_truth/ko/0000.png": _png_bytes(255, "L"),
    }
    archive = _zip(tmp_path / "btad.zip", members)
    root = tmp_path / "btad"
    download("btad", root, url=archive.as_uri(), sha256=_sha256(archive).upper())
    assert _leftovers(root) == ["01"]
    assert len(index_btad(root, "01")) == 2


def test_wrong_hash_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "mvtec.tar.gz", _mvtec_members())
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError, match="has SHA-256 .* expected 0000; refused, nothing extracted"):
        download("mvtec", fresh, url=archive.as_uri(), sha256="0000")
    assert not fresh.exists()
    existing = tmp_path / "existing"
    (existing / "mine").mkdir(parents=True)
    with pytest.raises(DataError, match="refused"):
        download("mvtec", existing, url=archive.as_uri())  # the published hash
    assert _leftovers(existing) == ["mine"]


@pytest.mark.parametrize(
    ("members", "links", "message"),
    [
        ({"../evil.txt": b"x"}, {}, "would be written outside"),
        ({"/tmp/evil.txt": b"x"}, {}, "would be written outside"),
        ({"a/../../evil.txt": b"x"}, {}, "would be written outside"),
        ({"ok.txt": b"x"}, {"link": (tarfile.SYMTYPE, "../../evil.txt")}, "points outside"),
        ({"ok.txt": b"x"}, {"abs": (tarfile.SYMTYPE, "/etc/passwd")}, "points outside"),
        ({"ok.txt": b"x"}, {"hard": (tarfile.LNKTYPE, "../evil.txt")}, "points outside"),
        ({"ok.txt": b"x"}, {"dev": (tarfile.CHRTYPE, "")}, "device file"),
    ],
)
def test_tar_members_escaping_the_target_are_refused(
    tmp_path: Path, members: dict, links: dict, message: str
) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", {"good/ok.png": b"fine", **members}, links)
    root = tmp_path / "deep" / "root"
    root.mkdir(parents=True)
    with pytest.raises(DataError, match=message):
        download("mvtec", root, url=archive.as_uri(), sha256=_sha256(archive))
    assert _leftovers(root) == []
    assert not list(tmp_path.rglob("evil.txt"))


def test_tar_link_inside_the_target_is_kept(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "ok.tar",
        {"a/b/file.txt": b"x"},
        {"a/c/link": (tarfile.SYMTYPE, "../b/file.txt")},
    )
    root = tmp_path / "root"
    download("mvtec", root, url=archive.as_uri(), sha256=_sha256(archive))
    assert (root / "c" / "link").read_bytes() == b"x"  # the single top folder "a" is dropped


@pytest.mark.parametrize(
    ("members", "symlinks", "message"),
    [
        ({"../evil.txt": b"x"}, {}, "would be written outside"),
        ({"ok.txt": b"x"}, {"link": "../../etc"}, "symbolic link"),
    ],
)
def test_zip_members_escaping_the_target_are_refused(
    tmp_path: Path, members: dict, symlinks: dict, message: str
) -> None:
    archive = _zip(tmp_path / "bad.zip", members, symlinks)
    root = tmp_path / "root"
    with pytest.raises(DataError, match=message):
        download("btad", root, url=archive.as_uri(), sha256=_sha256(archive))
    assert not root.exists()
    assert not list(tmp_path.rglob("evil.txt"))


def test_existing_names_are_never_overwritten(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "mvtec.tar.gz", _mvtec_members())
    root = tmp_path / "root"
    (root / "bottle").mkdir(parents=True)
    (root / "bottle" / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="refusing to overwrite .*bottle"):
        download("mvtec", root, url=archive.as_uri(), sha256=_sha256(archive))
    assert _leftovers(root) == ["bottle"]
    assert _leftovers(root / "bottle") == ["mine.txt"]


def test_unreachable_or_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot download file://"):
        download("mvtec", tmp_path / "r", url=(tmp_path / "nope.tar").as_uri(), sha256="00")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="neither a zip nor a tar"):
        download("mvtec", tmp_path / "r", url=text.as_uri(), sha256=_sha256(text))
    assert not (tmp_path / "r").exists()
    with pytest.raises(DataError, match="no download known for dataset 'visa'"):
        download("visa", tmp_path / "r")


def _mnist_mirror(folder: Path) -> dict[str, str]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_idx(
        folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 6, 6)), compress=True
    )
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(20) % 10, compress=True)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 6, 6)), compress=True)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(10), compress=True)
    return {p.name: _sha256(p) for p in folder.iterdir()}


def test_mnist_download(tmp_path: Path) -> None:
    hashes = _mnist_mirror(tmp_path / "mirror")
    assert set(hashes) == set(MNIST_SHA256)
    url = (tmp_path / "mirror").as_uri()
    refused = tmp_path / "refused"
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz has SHA-256"):
        download("mnist", refused, url=url)  # the published hashes
    assert not refused.exists()
    with pytest.raises(DataError, match="mapping of file name"):
        download("mnist", refused, url=url, sha256="abc")
    root = tmp_path / "mnist"
    download("mnist", root, url=url, sha256=hashes)
    assert _leftovers(root) == sorted(f"{n}.gz" for n in MNIST_FILES.values())
    assert len(index_mnist(root, "3")) == 2 + 10
    assert gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes())[-1] == 9


def test_cli_download(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "mvtec.tar.gz", _mvtec_members())
    root = tmp_path / "root"
    args = ["data", "download", "mvtec", "--root", str(root), "--url", archive.as_uri()]
    wrong = runner.invoke(app, [*args, "--sha256", "f" * 64])
    assert wrong.exit_code == 2
    assert "refused, nothing extracted" in wrong.stderr and "Traceback" not in wrong.output
    assert not root.exists()
    right = runner.invoke(app, [*args, "--sha256", _sha256(archive)])
    assert right.exit_code == 0, right.output
    assert (root / "bottle" / "train" / "good" / "000.png").is_file()
