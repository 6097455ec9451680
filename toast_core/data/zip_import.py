"""Safe extraction of an uploaded zip of class folders.

A zip from a browser is hostile until proven otherwise: member names can climb out of the target
(`../`, absolute paths, drive letters), entries can be symlinks, headers can lie about sizes, and a
few kilobytes can inflate to gigabytes. Every member is checked before anything is written, sizes
are enforced again while decompressing, and extraction happens in a temporary folder that is moved
into place only when everything passed, so a rejected zip leaves nothing behind.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from toast_core.data.images import IMAGE_EXTENSIONS

DEFAULT_MAX_TOTAL_BYTES = 200 * 1024 * 1024
DEFAULT_MAX_FILES = 5000
DEFAULT_MAX_RATIO = 100
# Small members may compress far better than max_ratio legitimately (a flat-colour BMP); a bomb
# needs size, so the per-member ratio is enforced only above this many uncompressed bytes.
RATIO_FLOOR_BYTES = 1024 * 1024
_CHUNK = 64 * 1024
_JUNK_DIRS = frozenset({"__MACOSX"})
_JUNK_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_DRIVE = re.compile(r"^[A-Za-z]:")


class ZipImportError(ValueError):
    """A zip that was refused; the message says why, for the user."""


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]


def _safe_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name, refusing anything that could land outside the target."""
    if "\x00" in name:
        raise ZipImportError(f"Refused: member name {name!r} contains a NUL byte.")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise ZipImportError(f"Refused: member '{name}' has an absolute path.")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ZipImportError(f"Refused: member '{name}' tries to leave the folder ('..' in its path).")
    return parts


def _is_junk(parts: tuple[str, ...]) -> bool:
    return any(p in _JUNK_DIRS for p in parts) or parts[-1] in _JUNK_FILES or parts[-1].startswith("._")


def _check_member(info: zipfile.ZipInfo, parts: tuple[str, ...], max_ratio: float) -> None:
    name = info.filename
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise ZipImportError(f"Refused: member '{name}' is a symbolic link.")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ZipImportError(f"Refused: member '{name}' is not a regular file.")
    if info.flag_bits & 0x1 or info.flag_bits & 0x40:
        raise ZipImportError(f"Refused: member '{name}' is encrypted; upload an unencrypted zip.")
    if Path(parts[-1]).suffix.lower() not in IMAGE_EXTENSIONS:
        raise ZipImportError(
            f"Refused: member '{name}' is not an image (allowed: {', '.join(IMAGE_EXTENSIONS)})."
        )
    if info.file_size > RATIO_FLOOR_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
        raise ZipImportError(
            f"Refused: member '{name}' expands {info.file_size / max(info.compress_size, 1):.0f}x "
            f"(limit {max_ratio:g}x); this looks like a zip bomb."
        )


def _plan(zf: zipfile.ZipFile, max_total_bytes: int, max_files: int, max_ratio: float) -> list[_Member]:
    """Validate every entry from the central directory; returns the image members to extract."""
    infos = zf.infolist()
    if len(infos) > 3 * max_files + 100:
        raise ZipImportError(f"Refused: the zip has {len(infos)} entries (limit {max_files} images).")
    members: list[_Member] = []
    seen: set[tuple[str, ...]] = set()
    for info in infos:
        parts = _safe_parts(info.filename)
        if not parts or _is_junk(parts):
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ZipImportError(f"Refused: member '{info.filename}' is a symbolic link.")
        if info.is_dir():
            continue
        _check_member(info, parts, max_ratio)
        if parts in seen:
            raise ZipImportError(f"Refused: member '{info.filename}' appears twice.")
        seen.add(parts)
        members.append(_Member(info, parts))
    if not members:
        raise ZipImportError("The zip contains no images.")
    if len(members) > max_files:
        raise ZipImportError(f"Refused: the zip has {len(members)} images (limit {max_files}).")
    declared = sum(m.info.file_size for m in members)
    if declared > max_total_bytes:
        raise ZipImportError(
            f"Refused: the images would take {declared / 2**20:.1f} MB unpacked (limit {max_total_bytes / 2**20:.1f} MB)."
        )
    packed = sum(m.info.compress_size for m in members)
    if declared > RATIO_FLOOR_BYTES and declared > max_ratio * max(packed, 1):
        raise ZipImportError(
            f"Refused: the zip expands {declared / max(packed, 1):.0f}x (limit {max_ratio:g}x); this looks like a zip bomb."
        )
    return members


def _strip_wrapper(members: list[_Member]) -> list[_Member]:
    """Class folders at the top, or inside exactly one wrapper folder; images never loose at the top."""
    tops = {m.parts[0] for m in members}
    if len(tops) == 1 and all(len(m.parts) >= 3 for m in members):
        members = [_Member(m.info, m.parts[1:]) for m in members]
    loose = [m.info.filename for m in members if len(m.parts) < 2]
    if loose:
        raise ZipImportError(
            f"Images must sit in one folder per class ('<class>/<image>'); '{loose[0]}' is not in a class folder."
        )
    return members


def _extract(
    zf: zipfile.ZipFile, members: list[_Member], target: Path, max_total_bytes: int, max_ratio: float
) -> None:
    """Decompress with the limits enforced on the bytes actually produced, not on the headers."""
    written = 0
    root = target.resolve()
    for m in members:
        out = target.joinpath(*m.parts)
        if not out.resolve().is_relative_to(root):  # belt and braces after _safe_parts
            raise ZipImportError(f"Refused: member '{m.info.filename}' resolves outside the folder.")
        out.parent.mkdir(parents=True, exist_ok=True)
        produced = 0
        with zf.open(m.info) as src, open(out, "xb") as dst:
            while chunk := src.read(_CHUNK):
                produced += len(chunk)
                written += len(chunk)
                if produced > m.info.file_size:
                    raise ZipImportError(
                        f"Refused: member '{m.info.filename}' is larger than its header says."
                    )
                if written > max_total_bytes:
                    raise ZipImportError(
                        f"Refused: unpacking passed the {max_total_bytes / 2**20:.1f} MB limit."
                    )
                if produced > RATIO_FLOOR_BYTES and produced > max_ratio * max(m.info.compress_size, 1):
                    raise ZipImportError(
                        f"Refused: member '{m.info.filename}' expands beyond {max_ratio:g}x."
                    )
                dst.write(chunk)


def import_zip(
    source: str | Path | bytes | bytearray | BinaryIO,
    dest_dir: str | Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> Path:
    """Extract a zip of class folders into `dest_dir` (must not exist or be empty); returns the dataset root.

    The returned folder holds `<class>/<image>` directly (a single wrapper folder is removed), ready
    for `load_image_folder`.
    """
    dest = Path(dest_dir)
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise FileNotFoundError(f"No zip file at '{source}'.")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"'{dest}' already exists and is not an empty folder.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fileobj: str | Path | BinaryIO = (
        io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.importing-", dir=dest.parent))
    try:
        try:
            with zipfile.ZipFile(fileobj) as zf:
                members = _strip_wrapper(_plan(zf, max_total_bytes, max_files, max_ratio))
                _extract(zf, members, tmp, max_total_bytes, max_ratio)
        except ZipImportError:
            raise
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            zlib.error,
            EOFError,
            OSError,
            ValueError,
            NotImplementedError,
        ) as exc:
            raise ZipImportError(f"The upload is not a valid or supported zip archive: {exc}") from exc
        os.replace(tmp, dest)  # atomic on one filesystem; replaces an empty dest folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
