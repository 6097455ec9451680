"""Uploaded zips of class folders (Tuning Lab and Few-shot): imported safely under the runs root."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.logger import get_logger

from .session import DATASETS_DIR, MAX_ZIP_MB, runs_root

LOG = get_logger(__name__)


def import_dataset_zip(data: bytes, name: str) -> Path:
    """Extract an uploaded zip of class folders under the runs root (content-addressed, so the same
    zip uploaded twice is imported once) and check it reads as a dataset. Raises ZipImportError /
    ImageFolderError with messages for the user; each refusal is also one line in the server's log."""
    from toast_core.data.folder import ImageFolderError
    from toast_core.data.zip_import import ZipImportError

    try:
        return _import_dataset_zip(data, name)
    except (ZipImportError, ImageFolderError) as exc:
        LOG.warning("zip upload %r refused: %s", name, " ".join(str(exc).split()))
        raise


def _import_dataset_zip(data: bytes, name: str) -> Path:
    from toast_core.data.folder import load_image_folder
    from toast_core.data.zip_import import ZipImportError, import_zip

    if len(data) > MAX_ZIP_MB * 1024 * 1024:
        raise ZipImportError(f"The zip is {len(data) / 2**20:.1f} MB, over the {MAX_ZIP_MB} MB limit.")
    digest = hashlib.sha256(data).hexdigest()[:12]
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(name).stem)[:40] or "dataset"
    dest = runs_root() / DATASETS_DIR / f"{stem}-{digest}"
    if not (dest.is_dir() and any(dest.iterdir())):
        dest.parent.mkdir(parents=True, exist_ok=True)
        import_zip(data, dest, max_total_bytes=MAX_ZIP_MB * 1024 * 1024)
    root = dest / "train" if (dest / "train").is_dir() else dest
    load_image_folder(root, size=32, max_images_per_class=2)  # fails fast on empty classes
    return dest


@st.cache_data(show_spinner=False, max_entries=16)
def dataset_summary(path: str, size: int) -> dict[str, Any]:
    """Classes, counts and skipped files of an imported folder (read once per folder)."""
    from toast_core.data.folder import load_image_folder

    root = Path(path)
    root = root / "train" if (root / "train").is_dir() else root
    data = load_image_folder(root, size=size)
    return {"classes": data.class_names, "counts": data.meta["counts"], "skipped": data.meta["skipped"],
            "images": len(data)}
