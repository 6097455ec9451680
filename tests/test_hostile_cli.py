"""The command line and the bundle importer over the hostile set: `compare` refuses each hostile
image with exit 1 and one line naming the file and the cause (no traceback) and renders each odd
picture; `import` refuses each hostile zip the same way and leaves the registry as it was. Every case
runs through `cli.main` (the same code path, in-process, quick); a few also run as real
subprocesses, as a user types them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_inputs import decodable_images, hostile_zips, refused_images, write_images, write_zips
from PIL import Image

from toast_core.core.backbone import tiny_fixture_backbone
from toast_core.frontends import cli
from toast_core.storage.bundles import BundleError, import_bundle

REPO = Path(__file__).resolve().parent.parent
FIX = ["--backbone", "fixture", "--threads", "1"]
SUBPROCESS_IMAGES = ("empty", "bomb_png", "exif_rotated")
SUBPROCESS_ZIPS = ("zip_slip", "lying_header")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("hostile_cli")
    return write_images(tmp / "images"), write_zips(tmp / "zips")


def _subprocess(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "toast_core", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def test_compare_refuses_each_hostile_image_in_one_line(files, tmp_path, capsys) -> None:
    images, _ = files
    for upload in refused_images():
        out = tmp_path / f"{upload.key}.png"
        code = cli.main(["compare", str(images[upload.key]), "--runs", "base", "--out", str(out), *FIX])
        _, err = capsys.readouterr()
        assert code == cli.EXIT_ERROR, upload.key
        _one_line_error(err, f"'{upload.name}'", upload.refusal)
        assert not out.exists()


def test_compare_renders_each_odd_picture(files, tmp_path, capsys) -> None:
    images, _ = files
    for upload in decodable_images():
        out = tmp_path / f"{upload.key}.png"
        code = cli.main(["compare", str(images[upload.key]), "--runs", "base", "--out", str(out), "--json", *FIX])
        text, err = capsys.readouterr()
        assert code == cli.EXIT_OK, (upload.key, err)
        assert "Traceback" not in err and f'"image": "{upload.name}"' in text
        with Image.open(out) as im:
            assert im.format == "PNG"


def test_compare_as_a_subprocess(files, tmp_path) -> None:
    images, _ = files
    by_key = {u.key: u for u in (*refused_images(), *decodable_images())}
    for key in SUBPROCESS_IMAGES:
        upload = by_key[key]
        proc = _subprocess("compare", str(images[key]), "--runs", "base", "--out", "out.png", *FIX, cwd=tmp_path)
        if upload.refusal:
            assert proc.returncode == 1, proc.stderr
            _one_line_error(proc.stderr, f"'{upload.name}'", upload.refusal)
        else:
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
            assert (tmp_path / "out.png").is_file()


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_import_refuses_each_hostile_zip_and_writes_nothing(files, tmp_path, capsys) -> None:
    _, zips = files
    root = tmp_path / "runs"
    root.mkdir()
    backbone = tiny_fixture_backbone()
    for z in hostile_zips():
        with pytest.raises(BundleError) as info:
            import_bundle(zips[z.key], root, backbone)
        assert z.bundle_refusal in str(info.value), (z.key, info.value)
        code = cli.main(["import", str(zips[z.key]), "--runs-dir", str(root), "--backbone", "fixture"])
        _, err = capsys.readouterr()
        assert code == cli.EXIT_ERROR, z.key
        _one_line_error(err, z.bundle_refusal)
        assert _tree(root) == [], (z.key, _tree(root))
    assert not (tmp_path / "escape.png").exists() and not Path("/tmp/evil.png").exists()
    for key in SUBPROCESS_ZIPS:
        z = next(z for z in hostile_zips() if z.key == key)
        proc = _subprocess("import", str(zips[key]), "--runs-dir", str(root), "--backbone", "fixture", cwd=tmp_path)
        assert proc.returncode == 1
        _one_line_error(proc.stderr, z.bundle_refusal)
        assert _tree(root) == []
