"""User data sources: safe image decoding, image folders and zip uploads (all inputs built here)."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toast_core.data.folder import ImageFolderError, load_image_folder
from toast_core.data.images import ImageInputError, load_image, resize_for_model
from toast_core.data.zip_import import ZipImportError, _extract, _plan, import_zip


# --- helpers -----------------------------------------------------------------------------------------
def _encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise_png(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height; the pixel data is a token IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# --- load_image ----------------------------------------------------------------------------------------
def test_rgb_png_round_trips_exactly() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    out = load_image(_encode(Image.fromarray(arr)))
    assert out.dtype == np.uint8 and out.shape == (7, 11, 3)
    np.testing.assert_array_equal(out, arr)


def test_grayscale_and_bilevel_become_grey_rgb() -> None:
    out = load_image(_encode(Image.new("L", (5, 4), 77)))
    assert out.shape == (4, 5, 3) and (out == 77).all()
    bilevel = Image.new("1", (6, 3), 0)
    bilevel.putpixel((2, 1), 1)
    out = load_image(_encode(bilevel))
    assert out[1, 2].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_rgba_is_composited_on_white() -> None:
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    im.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue -> white
    im.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue stays blue
    out = load_image(_encode(im))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 255]
    r, g, b = out[2, 2].tolist()
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1  # half red over white


def test_grey_with_alpha_is_composited_on_white() -> None:
    out = load_image(_encode(Image.new("LA", (3, 3), (0, 0))))
    assert (out == 255).all()


def test_palette_with_and_without_transparency() -> None:
    im = Image.new("P", (4, 2), 1)
    im.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 5] + [0] * (256 * 3 - 9))
    im.putpixel((0, 0), 2)
    out = load_image(_encode(im))
    assert out[1, 1].tolist() == [10, 200, 30] and out[0, 0].tolist() == [250, 5, 5]
    out = load_image(_encode(im, transparency=2))  # palette index 2 is transparent -> white
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [10, 200, 30]


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    out = load_image(data)
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(data).astype(int)
    r, g, b = out[8, 8]
    assert r > 230 and g < 25 and b < 25  # pure red


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(_encode(im, "JPEG", exif=exif, quality=95)).astype(int)
    assert out.shape == (40, 20, 3)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # top: red (was left)
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60  # bottom: blue (was right)


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue())
    assert out[4, 4].tolist() == [255, 0, 0]


def test_path_input(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(_encode(Image.new("RGB", (3, 2), (1, 2, 3))))
    assert load_image(path)[1, 2].tolist() == [1, 2, 3]
    assert load_image(str(path)).shape == (2, 3, 3)
    with pytest.raises(ImageInputError, match="not a file"):
        load_image(tmp_path / "missing.png")


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(b"hello, this is a text file\n" * 10)
    path = tmp_path / "notes.png"
    path.write_text("not really a png")
    with pytest.raises(ImageInputError, match="'notes.png' is not an image"):
        load_image(path)


def test_empty_input() -> None:
    with pytest.raises(ImageInputError, match="empty"):
        load_image(b"")


def test_truncated_png_is_reported() -> None:
    data = _noise_png(0, (64, 64))
    with pytest.raises(ImageInputError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_corrupt_pixel_data_is_reported() -> None:
    data = bytearray(_noise_png(1, (64, 64)))
    start = data.index(b"IDAT") + 40
    data[start : start + 200] = bytes(200)  # zero out part of the zlib stream
    with pytest.raises(ImageInputError, match="corrupt or truncated"):
        load_image(bytes(data))


def test_over_byte_limit(tmp_path: Path) -> None:
    data = _noise_png(2, (64, 64))
    with pytest.raises(ImageInputError, match="over the .* limit"):
        load_image(data, max_bytes=len(data) - 1)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageInputError, match="'big.png' is .* over the"):
        load_image(path, max_bytes=1000)
    assert load_image(data, max_bytes=len(data)).shape == (64, 64, 3)


@pytest.mark.parametrize(
    "width,height",
    [
        (8000, 8000),  # 64 MP: under PIL's own limit, over ours (40 MP)
        (10000, 10000),  # 100 MP: PIL's DecompressionBombWarning range
        (100000, 100000),  # 10 GP: PIL's DecompressionBombError range
    ],
)
def test_decompression_bomb_header_is_refused_before_decoding(width: int, height: int) -> None:
    with pytest.raises(ImageInputError, match="pixels"):
        load_image(_png_header_only(width, height))


def test_small_max_pixels_limit() -> None:
    data = _noise_png(3, (50, 40))
    with pytest.raises(ImageInputError, match="50x40"):
        load_image(data, max_pixels=1999)
    assert load_image(data, max_pixels=2000).shape == (40, 50, 3)


# --- resize_for_model ----------------------------------------------------------------------------------
def test_resize_stretch_shape_and_content() -> None:
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)
    rgb[:, 20:] = (0, 0, 255)
    out = resize_for_model(rgb, 10)
    assert out.dtype == torch.uint8 and out.shape == (3, 10, 10)
    assert out[:, 5, 1].tolist() == [255, 0, 0] and out[:, 5, 8].tolist() == [0, 0, 255]
    assert resize_for_model(rgb, (6, 12)).shape == (3, 6, 12)
    same = resize_for_model(rgb, (20, 40))
    assert torch.equal(same, torch.from_numpy(rgb).permute(2, 0, 1))


def test_resize_center_crop_keeps_the_middle() -> None:
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)
    rgb[:, 10:30] = (0, 255, 0)
    rgb[:, 30:] = (0, 0, 255)
    out = resize_for_model(rgb, 10, fit="center_crop")
    assert out.shape == (3, 10, 10)
    assert (out[1] == 255).all() and (out[0] == 0).all() and (out[2] == 0).all()


def test_resize_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        resize_for_model(np.zeros((4, 4), np.uint8), 8)
    with pytest.raises(ValueError):
        resize_for_model(np.zeros((4, 4, 3), np.float32), 8)


# --- load_image_folder ---------------------------------------------------------------------------------
def _write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (30, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _make_folder(root: Path, classes: dict[str, int]) -> None:
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            _write_png(root / name / f"{i:03d}.png", (40 * c, 10 * i, 200))


def test_folder_loads_sorted_classes_resized(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"zebra": 2, "ant": 3, "moth": 1})
    data = load_image_folder(tmp_path, size=16)
    assert data.class_names == ["ant", "moth", "zebra"]
    assert data.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert data.images.shape == (6, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.masks is None and data.meta["masks"] == "none"
    assert data.meta["counts"] == {"ant": 3, "moth": 1, "zebra": 2}
    # colours survive: class "zebra" was written second (c=0 -> red 0), image 1 has green 10
    assert data.images[5, :, 8, 8].tolist() == [0, 10, 200]


def test_folder_max_images_per_class_and_nested_files(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"a": 4, "b": 2})
    _write_png(tmp_path / "b" / "sub" / "deep.png", (9, 9, 9))
    data = load_image_folder(tmp_path, size=8, max_images_per_class=3)
    assert data.meta["counts"] == {"a": 3, "b": 3}
    full = load_image_folder(tmp_path, size=8)
    assert full.meta["counts"] == {"a": 4, "b": 3}


def test_folder_skips_and_reports_unreadable_files(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "b" / "readme.txt").write_text("hello")
    (tmp_path / "b" / ".DS_Store").write_bytes(b"\0\0junk")
    (tmp_path / ".hidden").mkdir()
    data = load_image_folder(tmp_path, size=8)
    assert len(data) == 4 and data.class_names == ["a", "b"]
    reasons = {s["path"]: s["reason"] for s in data.meta["skipped"]}
    assert set(reasons) == {os.path.join("a", "broken.png"), os.path.join("b", "readme.txt")}
    assert "not an image file" in reasons[os.path.join("b", "readme.txt")]


def test_folder_masks_inside_root(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"a": 2, "b": 1})
    for rel in ("a/000.png", "a/001.png", "b/000.png"):
        mask = np.zeros((20, 30), np.uint8)
        mask[:10, :15] = 255  # top-left quadrant
        (tmp_path / "masks" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(tmp_path / "masks" / rel)
    data = load_image_folder(tmp_path, size=10)
    assert data.class_names == ["a", "b"]  # "masks" is not a class
    assert data.masks is not None and data.masks.shape == (3, 10, 10) and data.masks.dtype == torch.bool
    assert data.masks[:, :5, :5].all() and not data.masks[:, 5:, :].any() and not data.masks[:, :, 5:].any()
    # one mask missing: masks are dropped for all, and the reason is recorded
    (tmp_path / "masks" / "b" / "000.png").unlink()
    partial = load_image_folder(tmp_path, size=10)
    assert partial.masks is None and "1 of 3" in partial.meta["masks"]


def test_folder_error_no_class_folders(tmp_path: Path) -> None:
    with pytest.raises(ImageFolderError, match="No class folders"):
        load_image_folder(tmp_path)
    _write_png(tmp_path / "loose.png", (1, 2, 3))
    with pytest.raises(ImageFolderError, match="holds 1 images directly"):
        load_image_folder(tmp_path)
    with pytest.raises(ImageFolderError, match="not a folder"):
        load_image_folder(tmp_path / "nope")


def test_folder_error_names_the_empty_class(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"cats": 2, "dogs": 2})
    (tmp_path / "ferrets").mkdir()
    with pytest.raises(ImageFolderError, match="'ferrets' has no usable images"):
        load_image_folder(tmp_path)
    (tmp_path / "ferrets" / "x.png").write_bytes(b"junk")
    with pytest.raises(ImageFolderError, match="'ferrets' has no usable images \\(1 files, none readable\\)"):
        load_image_folder(tmp_path)


def test_folder_error_single_class(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"only": 3})
    with pytest.raises(ImageFolderError, match="only one class folder \\('only'\\)"):
        load_image_folder(tmp_path)


# --- import_zip ----------------------------------------------------------------------------------------
def _zip(
    entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED, level: int | None = None
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression, compresslevel=level) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _class_entries(prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}{c}/{i}.png": _noise_png(10 * k + i) for k, c in enumerate(("cat", "dog")) for i in range(2)
    }


def _patch_central(data: bytes, member: str, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite one field of `member`'s central-directory record (where zipfile reads metadata)."""
    out = bytearray(data)
    pos = out.index(b"PK\x01\x02")
    while True:
        name_len = struct.unpack_from("<H", out, pos + 28)[0]
        if out[pos + 46 : pos + 46 + name_len].decode() == member:
            struct.pack_into(fmt, out, pos + offset, value)
            return bytes(out)
        pos = out.index(b"PK\x01\x02", pos + 4)


def _assert_nothing_left(parent: Path, dest: Path) -> None:
    assert not dest.exists()
    assert [p.name for p in parent.iterdir() if "importing" in p.name] == []


def test_zip_good_layout_loads(tmp_path: Path) -> None:
    root = import_zip(_zip(_class_entries()), tmp_path / "up")
    assert root == tmp_path / "up"
    data = load_image_folder(root, size=8)
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1, 1]
    assert (root / "cat" / "0.png").read_bytes() == _noise_png(0)


def test_zip_from_path_with_wrapper_and_junk(tmp_path: Path) -> None:
    entries = _class_entries("animals/")
    entries |= {
        "__MACOSX/animals/cat/._0.png": b"\0\5\26\7 appledouble",
        "animals/.DS_Store": b"\0\0\0\1Bud1",
        "animals/dog/Thumbs.db": b"\xd0\xcf\x11\xe0",
        "animals/cat/._1.png": b"\0\5\26\7",
    }
    src = tmp_path / "upload.zip"
    src.write_bytes(_zip(entries))
    root = import_zip(src, tmp_path / "up")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [os.path.join(c, f"{i}.png") for c in ("cat", "dog") for i in range(2)]
    assert load_image_folder(root, size=8).class_names == ["cat", "dog"]


def test_zip_into_existing_empty_dest_and_refuses_nonempty(tmp_path: Path) -> None:
    dest = tmp_path / "up"
    dest.mkdir()
    assert import_zip(_zip(_class_entries()), dest) == dest
    with pytest.raises(FileExistsError):
        import_zip(_zip(_class_entries()), dest)


@pytest.mark.parametrize(
    "name,message",
    [
        ("../evil.png", "leave the folder"),
        ("cat/../../evil.png", "leave the folder"),
        ("..\\evil.png", "leave the folder"),
        ("/tmp/evil.png", "absolute path"),
        ("C:/evil.png", "absolute path"),
        ("C:\\Windows\\evil.png", "absolute path"),
    ],
)
def test_zip_refuses_path_traversal(tmp_path: Path, name: str, message: str) -> None:
    dest = tmp_path / "sub" / "up"
    entries = _class_entries() | {name: _noise_png(99)}
    with pytest.raises(ZipImportError, match=message):
        import_zip(_zip(entries), dest)
    _assert_nothing_left(dest.parent, dest)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "sub" / "evil.png").exists()


def test_zip_refuses_symlink(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in _class_entries().items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("cat/link.png")
        link.create_system = 3
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(ZipImportError, match="symbolic link"):
        import_zip(buf.getvalue(), tmp_path / "up")
    _assert_nothing_left(tmp_path, tmp_path / "up")


def test_zip_refuses_non_image_member(tmp_path: Path) -> None:
    with pytest.raises(ZipImportError, match="'cat/notes.txt' is not an image"):
        import_zip(_zip(_class_entries() | {"cat/notes.txt": b"hello"}), tmp_path / "up")
    _assert_nothing_left(tmp_path, tmp_path / "up")


def test_zip_refuses_encrypted_member(tmp_path: Path) -> None:
    data = _patch_central(_zip(_class_entries()), "dog/1.png", 8, "<H", 0x1)
    assert zipfile.ZipFile(io.BytesIO(data)).getinfo("dog/1.png").flag_bits & 0x1
    with pytest.raises(ZipImportError, match="encrypted"):
        import_zip(data, tmp_path / "up")
    _assert_nothing_left(tmp_path, tmp_path / "up")


def test_zip_refuses_too_many_files(tmp_path: Path) -> None:
    with pytest.raises(ZipImportError, match="4 images \\(limit 3\\)"):
        import_zip(_zip(_class_entries()), tmp_path / "up", max_files=3)
    _assert_nothing_left(tmp_path, tmp_path / "up")


@pytest.fixture(scope="module")
def bomb_zip() -> bytes:
    """50 MB of zeros named like an image; deflate level 1 (fast) still packs it ~230x."""
    return _zip(_class_entries() | {"cat/bomb.png": bytes(50 * 1024 * 1024)}, level=1)


def test_zip_bomb_refused_by_ratio(tmp_path: Path, bomb_zip: bytes) -> None:
    assert len(bomb_zip) < 1024 * 1024
    with pytest.raises(ZipImportError, match="'cat/bomb.png' expands .*zip bomb"):
        import_zip(bomb_zip, tmp_path / "up")
    _assert_nothing_left(tmp_path, tmp_path / "up")


def test_zip_bomb_refused_by_declared_total(tmp_path: Path, bomb_zip: bytes) -> None:
    with pytest.raises(ZipImportError, match="MB unpacked \\(limit 10.0 MB\\)"):
        import_zip(bomb_zip, tmp_path / "up", max_total_bytes=10 * 2**20, max_ratio=1e9)
    _assert_nothing_left(tmp_path, tmp_path / "up")


def test_zip_limit_enforced_while_decompressing(tmp_path: Path, bomb_zip: bytes) -> None:
    """Headers are not trusted: the byte budget also holds on what is actually produced."""
    with zipfile.ZipFile(io.BytesIO(bomb_zip)) as zf:
        members = _plan(zf, max_total_bytes=2**30, max_files=10, max_ratio=1e9)
        with pytest.raises(ZipImportError, match="unpacking passed the 5.0 MB limit"):
            _extract(zf, members, tmp_path, max_total_bytes=5 * 2**20, max_ratio=1e9)
    written = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert written <= 5 * 2**20


def test_zip_lying_size_header_is_refused(tmp_path: Path) -> None:
    big = bytes(300_000)
    data = _zip(_class_entries() | {"dog/liar.png": big})
    data = _patch_central(data, "dog/liar.png", 24, "<I", 1000)  # claims 1000 bytes unpacked
    assert zipfile.ZipFile(io.BytesIO(data)).getinfo("dog/liar.png").file_size == 1000
    with pytest.raises(ZipImportError, match="larger than its header|Bad CRC"):
        import_zip(data, tmp_path / "up")
    _assert_nothing_left(tmp_path, tmp_path / "up")


def test_zip_truncated_or_not_a_zip(tmp_path: Path) -> None:
    good = _zip(_class_entries())
    with pytest.raises(ZipImportError, match="not a valid"):
        import_zip(good[: len(good) // 2], tmp_path / "up")
    with pytest.raises(ZipImportError, match="not a valid"):
        import_zip(b"just some text", tmp_path / "up")
    _assert_nothing_left(tmp_path, tmp_path / "up")


def test_zip_corrupt_member_data(tmp_path: Path) -> None:
    entries = _class_entries() | {"dog/z.png": bytes(range(256)) * 400}
    data = bytearray(_zip(entries))
    start = data.index(b"dog/z.png") + len("dog/z.png") + 20  # inside z.png's compressed data
    data[start : start + 30] = b"\xff" * 30
    with pytest.raises(ZipImportError, match="not a valid"):
        import_zip(bytes(data), tmp_path / "up")
    _assert_nothing_left(tmp_path, tmp_path / "up")


def test_zip_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(ZipImportError, match="'top.png' is not in a class folder"):
        import_zip(_zip(_class_entries() | {"top.png": _noise_png(5)}), tmp_path / "up")
    with pytest.raises(ZipImportError, match="no images"):
        import_zip(_zip({"__MACOSX/x": b"1", ".DS_Store": b"2"}), tmp_path / "up")
    _assert_nothing_left(tmp_path, tmp_path / "up")
