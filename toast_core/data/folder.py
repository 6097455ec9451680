"""Image folders (one subfolder per class) as LabeledImages, with optional masks.

This is how users bring their own data (directly or via `zip_import`) and how the built-in tasks
exported by `scenes.export_imagefolder` come back in: `<split>/<class>/<name>.png` with masks in a
sibling tree `masks/<split>/<class>/<name>.png`. A user folder may also keep its masks inside
itself as `masks/<class>/<name>.png`. Unreadable files do not abort a load; they are reported in
`meta["skipped"]` so the page can show them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toast_core.data.base import LabeledImages
from toast_core.data.images import IMAGE_EXTENSIONS, ImageInputError, load_image, resize_for_model

JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
MASKS_DIR = "masks"


class ImageFolderError(ValueError):
    """A folder that cannot be read as a classification dataset; the message names the problem."""


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))


def _class_files(class_dir: Path, extensions: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under a class folder, sorted; junk and hidden files are ignored."""
    images, others = [], []
    for p in sorted(class_dir.rglob("*")):
        rel_parts = p.relative_to(class_dir).parts
        if not p.is_file() or p.name in JUNK_NAMES or any(s.startswith((".", "__MACOSX")) for s in rel_parts):
            continue
        (images if p.suffix.lower() in extensions else others).append(p)
    return images, others


def _find_mask_root(root: Path, class_names: set[str]) -> Path | None:
    """The masks tree for `root`: `root/masks/` (inside) or `root/../masks/<root.name>/` (export layout)."""
    inside = root / MASKS_DIR
    if inside.is_dir():
        sub = {p.name for p in _visible_dirs(inside)}
        if sub and sub <= class_names:
            return inside
    sibling = root.parent / MASKS_DIR / root.name
    if sibling.is_dir():
        return sibling
    return None


def _mask_for(image_path: Path, class_dir: Path, mask_root: Path, class_name: str) -> Path | None:
    rel = image_path.relative_to(class_dir)
    base = mask_root / class_name / rel
    for candidate in (base, *(base.with_suffix(ext) for ext in IMAGE_EXTENSIONS)):
        if candidate.is_file():
            return candidate
    return None


def _load_mask(path: Path, image_hw: tuple[int, int], size: int) -> torch.Tensor | None:
    """A white-on-black mask resized like its image (stretch), or None when unusable."""
    try:
        rgb = load_image(path)
    except ImageInputError:
        return None
    if rgb.shape[:2] != image_hw:
        return None
    grey = Image.fromarray(rgb.max(axis=2))
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(grey) >= 128)


def load_image_folder(
    root: str | Path,
    *,
    size: int = 96,
    max_images_per_class: int | None = None,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
) -> LabeledImages:
    """Read `root/<class>/**/<image>` (classes sorted by name), resized to size x size."""
    root = Path(root).resolve()  # "." has no name and no meaningful sibling masks tree
    if not root.is_dir():
        raise ImageFolderError(f"'{root}' is not a folder.")
    if max_images_per_class is not None and max_images_per_class < 1:
        raise ValueError("max_images_per_class must be at least 1.")
    extensions = tuple(e.lower() for e in extensions)
    class_dirs = _visible_dirs(root)
    names = {p.name for p in class_dirs}
    mask_root = _find_mask_root(root, names)
    if mask_root is not None and mask_root.parent == root:
        class_dirs = [p for p in class_dirs if p != mask_root]
    if not class_dirs:
        loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in extensions]
        hint = (
            f" It holds {len(loose)} images directly; put them in one subfolder per class." if loose else ""
        )
        raise ImageFolderError(
            f"No class folders in '{root.name}': expected '<class>/<image>' subfolders.{hint}"
        )
    if (root / "metadata.json").is_file() and {p.name for p in class_dirs} & {"train", "val", "test"}:
        raise ImageFolderError(
            f"'{root.name}' looks like an exported dataset with splits; load one split, e.g. '{root.name}/train'."
        )
    if len(class_dirs) < 2:
        raise ImageFolderError(
            f"Found only one class folder ('{class_dirs[0].name}'); a classifier needs at least 2 classes."
        )

    images: list[torch.Tensor] = []
    masks: list[torch.Tensor | None] = []
    labels: list[int] = []
    skipped: list[dict[str, str]] = []
    counts: dict[str, int] = {}
    for label, class_dir in enumerate(class_dirs):
        files, others = _class_files(class_dir, extensions)
        skipped += [{"path": str(p.relative_to(root)), "reason": "not an image file"} for p in others]
        n = 0
        for path in files:
            if max_images_per_class is not None and n >= max_images_per_class:
                break
            try:
                rgb = load_image(path)
            except ImageInputError as exc:
                skipped.append({"path": str(path.relative_to(root)), "reason": str(exc)})
                continue
            images.append(resize_for_model(rgb, size))
            labels.append(label)
            if mask_root is not None:
                mask_path = _mask_for(path, class_dir, mask_root, class_dir.name)
                masks.append(None if mask_path is None else _load_mask(mask_path, rgb.shape[:2], size))
            n += 1
        if n == 0:
            detail = f" ({len(files) + len(others)} files, none readable)" if files or others else ""
            raise ImageFolderError(f"Class folder '{class_dir.name}' has no usable images{detail}.")
        counts[class_dir.name] = n

    mask_tensor, mask_note = None, "none"
    if mask_root is not None:
        missing = sum(m is None for m in masks)
        if missing == 0:
            mask_tensor, mask_note = torch.stack(masks), "loaded"  # type: ignore[arg-type]
        else:
            mask_note = f"not loaded: {missing} of {len(masks)} images have no usable mask"
    return LabeledImages(
        images=torch.stack(images),
        labels=torch.tensor(labels, dtype=torch.long),
        class_names=[p.name for p in class_dirs],
        masks=mask_tensor,
        meta={
            "source": "folder",
            "root": str(root),
            "size": size,
            "counts": counts,
            "skipped": skipped,
            "masks": mask_note,
        },
    )
