"""One generated set of hostile and odd uploads, shared by every front end's test.

Images: an empty file, text and HTML saved as .png/.jpg, an SVG, a truncated JPEG, a PNG whose header
declares 40000 x 40000 px (a few hundred bytes on disk), 16-bit, CMYK, palette, animated, EXIF-rotated,
1-px and 8000 x 40 px pictures. Each case says what the library must do with it: refuse it with a
message naming the cause (`refusal`, a substring of `data.images.load_image`'s message) or decode
it to a known size (`size`, width x height after EXIF rotation).

Zips (dataset uploads and run bundles): zip-slip paths (`../`, absolute), a zip bomb, a symbolic
link, non-image members, a nested zip, and a zip that is not a zip. Each carries the substring the
dataset importer (`data.zip_import`) must name and the one the bundle importer (`bundles`) must.

Everything is built in memory from a fixed seed, so the set is the same on every machine.
"""

from __future__ import annotations

import functools
import io
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

NOT_AN_IMAGE = "not an image in a supported format"


@dataclass(frozen=True)
class Upload:
    """One uploaded file and what must come of it."""

    key: str  # short id for test ids
    name: str  # the file name the user's browser sends
    data: bytes
    refusal: str | None = None  # substring of the refusal; None: it must decode
    size: tuple[int, int] | None = None  # (width, height) once decoded


@dataclass(frozen=True)
class HostileZip:
    """One zip upload and the cause each importer must name."""

    key: str
    name: str
    data: bytes
    dataset_refusal: str  # substring of data.zip_import's ZipImportError
    bundle_refusal: str  # substring of bundles' BundleError


def _rng() -> np.random.Generator:
    return np.random.default_rng(21)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w: int, h: int) -> Image.Image:
    return Image.fromarray(_rng().integers(0, 255, size=(h, w, 3), dtype=np.uint8), "RGB")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header that declares width x height RGB pixels, followed by one tiny IDAT: a
    decompression bomb's shape without its gigabytes (a decoder that trusts the header allocates them)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _exif_rotated_jpeg() -> bytes:
    """60 x 40 px stored, EXIF orientation 6 (rotate 90° clockwise to view): shown 40 x 60."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_rgb(60, 40), "JPEG", exif=exif.tobytes(), quality=90)


def _animated_gif() -> bytes:
    frames = [Image.new("P", (48, 32), i * 40) for i in range(4)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def _palette_png() -> bytes:
    return _save(_rgb(50, 30).quantize(colors=16), "PNG")


def _sixteen_bit_png() -> bytes:
    arr = _rng().integers(0, 65535, size=(36, 44), dtype=np.uint16)
    return _save(Image.fromarray(arr), "PNG")


def _cmyk_jpeg() -> bytes:
    return _save(_rgb(40, 40).convert("CMYK"), "JPEG", quality=90)


def _truncated_jpeg() -> bytes:
    whole = _save(_rgb(120, 90), "JPEG", quality=95)
    return whole[: len(whole) // 2]


SVG = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
       b'<rect width="64" height="64" fill="red"/><script>alert(1)</script></svg>\n')
HTML = b"<!doctype html><html><body><script>alert('x')</script><img src=x onerror=alert(1)></body></html>\n"


@functools.cache
def hostile_images() -> tuple[Upload, ...]:
    """The image set: refusals first, then odd pictures that must decode."""
    return (
        Upload("empty", "empty.png", b"", refusal="is empty (0 bytes)"),
        Upload("text_png", "notes.png", b"just some text, saved with the wrong extension\n" * 4, refusal=NOT_AN_IMAGE),
        Upload("html_jpg", "page.jpg", HTML, refusal=NOT_AN_IMAGE),
        Upload("svg", "drawing.svg", SVG, refusal=NOT_AN_IMAGE),
        Upload("truncated_jpg", "cut.jpg", _truncated_jpeg(), refusal="corrupt or truncated"),
        Upload("bomb_png", "huge.png", png_declaring(40_000, 40_000), refusal="too many pixels"),
        Upload("sixteen_bit", "deep16.png", _sixteen_bit_png(), size=(44, 36)),
        Upload("cmyk", "print.jpg", _cmyk_jpeg(), size=(40, 40)),
        Upload("palette", "palette.png", _palette_png(), size=(50, 30)),
        Upload("animated", "anim.gif", _animated_gif(), size=(48, 32)),
        Upload("exif_rotated", "phone.jpg", _exif_rotated_jpeg(), size=(40, 60)),
        Upload("one_px", "dot.png", _save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), size=(1, 1)),
        Upload("wide", "strip.png", _save(_rgb(8000, 40), "PNG"), size=(8000, 40)),
    )


def refused_images() -> list[Upload]:
    return [u for u in hostile_images() if u.refusal]


def decodable_images() -> list[Upload]:
    return [u for u in hostile_images() if u.refusal is None]


# --- zips --------------------------------------------------------------------------------------------
def _zip(members: list[tuple[str | zipfile.ZipInfo, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def small_png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return _save(Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8), "RGB"), "PNG")


def _symlink_member(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix, so the mode bits are read
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def good_dataset_members() -> list[tuple[str, bytes]]:
    """Two classes of three small PNGs: what a fine upload looks like."""
    return [(f"{c}/{i}.png", small_png(10 * k + i)) for k, c in enumerate(("cat", "dog")) for i in range(3)]


BOMB_MEMBER_BYTES = 64 * 1024 * 1024  # zeros; deflate packs them ~1000x, far past the 100x limit
LYING_SIZE = 3 * 1024**3  # what a patched central directory claims one small member unpacks to


def declare_size(data: bytes, member: str, size: int) -> bytes:
    """The zip with `member`'s uncompressed size in the central directory replaced by `size`: a header
    that lies, as a crafted bomb's does (importers must refuse on the header, before reading)."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos != -1:
        name_len = struct.unpack_from("<H", out, pos + 28)[0]
        if out[pos + 46 : pos + 46 + name_len].decode() == member:
            struct.pack_into("<I", out, pos + 24, size)
            return bytes(out)
        pos = out.find(b"PK\x01\x02", pos + 46)
    raise KeyError(member)


@functools.cache
def hostile_zips() -> tuple[HostileZip, ...]:
    """Zips that both importers must refuse, each with the cause they must name. The hostile member
    comes first, so a checker that stops at the first bad member names that one."""
    good = good_dataset_members()
    inner = _zip(good)
    return (
        HostileZip("zip_slip", "slip.zip", _zip([("../../escape.png", small_png(1)), *good]),
                   "tries to leave the folder", "tries to leave the folder"),
        HostileZip("absolute", "absolute.zip", _zip([("/tmp/evil.png", small_png(2)), *good]),
                   "absolute path", "absolute path"),
        HostileZip("bomb", "bomb.zip", _zip([("cat/big.png", b"\x00" * BOMB_MEMBER_BYTES), *good]),
                   "zip bomb", "unexpected member 'cat/big.png'"),
        HostileZip("lying_header", "liar.zip",
                   declare_size(_zip([("manifest.json", b"{}"), ("module.safetensors", b"\x00" * 1024)]),
                                "module.safetensors", LYING_SIZE),
                   "is not an image", "unpacks to 3072 MB"),
        HostileZip("symlink", "link.zip", _zip([_symlink_member("cat/passwd.png", "/etc/passwd"), *good]),
                   "symbolic link", "symbolic link"),
        HostileZip("non_image", "mixed.zip", _zip([("cat/readme.txt", b"hello"), ("dog/run.sh", b"rm -rf /"), *good]),
                   "'cat/readme.txt' is not an image", "unexpected member 'cat/readme.txt'"),
        HostileZip("nested", "nested.zip", _zip([("cat/inner.zip", inner), *good]),
                   "'cat/inner.zip' is not an image", "unexpected member 'cat/inner.zip'"),
        HostileZip("not_a_zip", "fake.zip", b"PK\x03\x04 this is not really a zip" * 8,
                   "not a valid or supported zip", "not a zip archive"),
    )


def write_images(folder: Path) -> dict[str, Path]:
    """Every hostile image as a file (key -> path), for front ends that take paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for u in hostile_images():
        path = folder / u.name
        path.write_bytes(u.data)
        out[u.key] = path
    return out


def write_zips(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for z in hostile_zips():
        path = folder / z.name
        path.write_bytes(z.data)
        out[z.key] = path
    return out
