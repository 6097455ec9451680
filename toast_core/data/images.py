"""Safe decoding of user images: uploads are untrusted, so every failure becomes one clear message.

Images arrive from the browser (bytes) or from an extracted folder (paths). They may be huge,
truncated, not images at all, or decompression bombs; they come in every colour mode PIL knows.
`load_image` turns all of that into either an (H, W, 3) uint8 RGB array or an `ImageInputError`
whose text can be shown to the user as is.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000

# Formats a user plausibly uploads. Restricting `Image.open` to these keeps exotic decoders out of
# reach (EPS would even start Ghostscript). Multi-picture JPEGs (MPO) open through "JPEG".
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageInputError(ValueError):
    """An upload that cannot be used as an image; the message is meant for the user."""


def _read_bytes(
    source: bytes | bytearray | memoryview | str | Path, max_bytes: int, label: str | None = None
) -> tuple[bytes, str]:
    """The raw bytes and a name for messages; the size limit is checked before reading a file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), f"'{label}'" if label else "the upload"
    else:
        path = Path(source)
        name = f"'{path.name}'"
        if not path.is_file():
            raise ImageInputError(f"{name} is not a file.")
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageInputError(f"{name} is {_mb(size)}, over the {_mb(max_bytes)} limit for images.")
        data = path.read_bytes()
    if len(data) == 0:
        raise ImageInputError(f"{name} is empty (0 bytes).")
    if len(data) > max_bytes:
        raise ImageInputError(f"{name} is {_mb(len(data))}, over the {_mb(max_bytes)} limit for images.")
    return data, name


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def _open_checked(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open and fully decode, refusing bombs before any pixel buffer is allocated."""
    try:
        # PIL warns above Image.MAX_IMAGE_PIXELS and raises above twice that; make the warning an
        # error too, so no path allocates a giant buffer. Our own, smaller limit is checked below
        # from the header alone, before `load()` decodes anything.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"{name} declares too many pixels to decode safely ({exc}).") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageInputError(
            f"{name} is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})."
        ) from exc
    except Exception as exc:  # any parser failure on a hostile header is the upload's fault
        raise ImageInputError(f"{name} could not be read as an image: {exc}") from exc
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageInputError(f"{name} has no pixels ({width}x{height}).")
    if width * height > max_pixels:
        raise ImageInputError(
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
            f"{max_pixels / 1e6:.1f} megapixel limit (possible decompression bomb)."
        )
    try:
        im.seek(0)  # animated GIF / multi-page TIFF: the first frame
        im.load()
    except Exception as exc:  # truncated or corrupt pixel data
        raise ImageInputError(f"{name} is corrupt or truncated: {exc}") from exc
    return im


def _sixteen_bit_to_rgb(im: Image.Image) -> np.ndarray:
    """16/32-bit greyscale -> 8-bit: scale by the container range (PIL's convert would clip at 255)."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        arr8 = np.round(arr.astype(np.float32) / 257.0)
    elif im.mode == "I" and arr.min() >= 0 and arr.max() <= 65535:
        arr8 = np.round(arr.astype(np.float32) / 257.0)  # a 16-bit image held in 32-bit ints
    else:  # "F" or out-of-range "I": stretch what is there
        arr = arr.astype(np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr8 = np.zeros_like(arr) if hi <= lo else (np.nan_to_num(arr, nan=lo) - lo) * (255.0 / (hi - lo))
    grey = np.clip(arr8, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _to_rgb(im: Image.Image, name: str) -> np.ndarray:
    """Any PIL mode -> RGB uint8; transparency is composited on white (how viewers show it)."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _sixteen_bit_to_rgb(im)
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    try:
        if has_alpha:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        elif mode == "1":
            rgb = im.convert("L").convert("RGB")
        else:
            rgb = im.convert("RGB")  # L, P, CMYK, YCbCr, RGBX, ...
    except (ValueError, OSError) as exc:
        raise ImageInputError(f"{name} has colour mode {mode}, which cannot be converted to RGB.") from exc
    return np.asarray(rgb, dtype=np.uint8)


def load_image(
    source: bytes | bytearray | memoryview | str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> np.ndarray:
    """Decode an untrusted image to (H, W, 3) uint8 RGB, upright per EXIF, or raise ImageInputError.
    `name` (an upload's file name) is what messages about raw bytes call them; default "the upload"."""
    data, name = _read_bytes(source, max_bytes, name)
    im = _open_checked(data, name, max_pixels)
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as exc:  # broken EXIF blocks are common in the wild
        raise ImageInputError(f"{name} has an unreadable EXIF orientation: {exc}") from exc
    rgb = _to_rgb(im, name)
    return np.ascontiguousarray(rgb)


def resize_for_model(
    rgb: np.ndarray, size: int | tuple[int, int], fit: Literal["stretch", "center_crop"] = "stretch"
) -> torch.Tensor:
    """(H, W, 3) uint8 -> uint8 tensor (3, h, w), antialiased.

    "stretch" keeps the whole picture (attention overlays then cover everything the user sent);
    "center_crop" keeps the aspect ratio by cutting the longer side first.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.dtype} {tuple(rgb.shape)}.")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size}.")
    im = Image.fromarray(rgb)
    if fit == "center_crop":
        src_h, src_w = rgb.shape[:2]
        scale = max(h / src_h, w / src_w)
        crop_h, crop_w = min(src_h, round(h / scale)), min(src_w, round(w / scale))
        top, left = (src_h - crop_h) // 2, (src_w - crop_w) // 2
        im = im.crop((left, top, left + crop_w, top + crop_h))
    elif fit != "stretch":
        raise ValueError(f"fit must be 'stretch' or 'center_crop', got {fit!r}.")
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
