"""Write in-memory splits in the FGVC (VPT) and VTAB-1k layouts, e.g. a built-in task for a dry run.

The protocol benchmark's smoke mode and the tests use these to make small folders that the real
readers (`fgvc.fgvc_split`, `vtab.vtab_split`) must take exactly as they take the released data.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from toast_core.data.base import LabeledImages


def _save(image, path: Path, fmt: str) -> None:  # type: ignore[no-untyped-def]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def export_fgvc(splits: dict[str, LabeledImages], root: str | Path, *, image_dir: str = "images",
                fmt: str = "JPEG") -> Path:
    """`root/<image_dir>/<class>/<split>_<i>.jpg` plus `<split>.json` ({relative path: class id})."""
    root = Path(root)
    ext = ".jpg" if fmt == "JPEG" else ".png"
    for split, data in splits.items():
        table: dict[str, int] = {}
        for i in range(len(data)):
            label = int(data.labels[i])
            rel = f"{label:03d}.{data.class_names[label]}/{split}_{i:05d}{ext}"
            _save(data.images[i], root / image_dir / rel, fmt)
            table[rel] = label
        (root / f"{split}.json").write_text(json.dumps(table, indent=0))
    return root


def export_vtab(splits: dict[str, LabeledImages], root: str | Path, *, fmt: str = "PNG") -> Path:
    """`root/images/<split>/<i>.png` plus `<split>.txt` lines "images/<split>/<i>.png <label>";
    the splits should be named like VTAB's lists (train800, val200, train800val200, test)."""
    root = Path(root)
    ext = ".jpg" if fmt == "JPEG" else ".png"
    for split, data in splits.items():
        lines = []
        for i in range(len(data)):
            rel = f"images/{split}/{i:05d}{ext}"
            _save(data.images[i], root / rel, fmt)
            lines.append(f"{rel} {int(data.labels[i])}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root
