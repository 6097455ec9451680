"""FGVC as VPT and TOAST use it: an image folder plus one split file per split.

VPT's released splits (KMnP/vpt, `src/data/datasets/json_dataset.py`; TOAST reuses that code)
put `train.json`, `val.json` and `test.json` in each dataset's folder, each mapping an image path
(relative to the dataset's image folder) to an integer class id:

    CUB_200_2011/  train.json  val.json  test.json  images/001.Black_footed_Albatross/....jpg
    OxfordFlower/  train.json  ...  jpg/image_00001.jpg
    StanfordDogs/  ...  Images/n02085620-Chihuahua/....jpg
    StanfordCars/  ...  cars_train/00001.jpg          (paths relative to the folder itself)
    nabirds/       ...  images/0295/....jpg

The image folder is the candidate (`images/`, `Images/`, `jpg/`, the dataset folder) under which
most of the first listed paths exist; pass `image_dir` to fix it. A `<split>.csv` (`path,label`, header
optional) works in place of the JSON. Class ids are mapped to 0..C-1 in sorted order over every
split file present; "trainval" is train + val (the final-run training set of the protocol).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from toast_core.data.files import DatasetLayoutError, FileSet, Fit

FGVC_SPLITS = ("train", "val", "test", "trainval")
IMAGE_DIR_CANDIDATES = ("images", "Images", "jpg", "")
#: the five FGVC datasets of the VPT / TOAST tables and their class counts
FGVC_DATASETS = {"CUB_200_2011": 200, "nabirds": 555, "OxfordFlower": 102, "StanfordDogs": 120, "StanfordCars": 196}


def _read_split(root: Path, split: str) -> dict[str, str]:
    """{relative path: class id as text} from `<split>.json` or `<split>.csv`."""
    js, cs = root / f"{split}.json", root / f"{split}.csv"
    if js.is_file():
        try:
            data = json.loads(js.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetLayoutError(f"'{js}' is not readable JSON: {exc}") from None
        if not isinstance(data, dict) or not data:
            raise DatasetLayoutError(f"'{js}' should map image paths to class ids (a non-empty JSON object).")
        return {str(k): str(v) for k, v in data.items()}
    if cs.is_file():
        rows = [r for r in csv.reader(cs.read_text().splitlines()) if r and any(c.strip() for c in r)]
        if rows and not rows[0][-1].strip().lstrip("-").isdigit():
            rows = rows[1:]  # a header row
        if not rows or any(len(r) < 2 for r in rows):
            raise DatasetLayoutError(f"'{cs}' should hold 'path,label' rows.")
        return {r[0].strip(): r[-1].strip() for r in rows}
    raise DatasetLayoutError(
        f"No split file for '{split}' in '{root}': expected {split}.json (VPT's FGVC splits) or {split}.csv."
    )


def _class_key(value: str) -> tuple[int, int | str]:
    return (0, int(value)) if value.lstrip("-").isdigit() else (1, value)


def _image_dir(root: Path, names: list[str], image_dir: str | None) -> Path:
    """The folder the listed paths are relative to: the candidate holding most of the first 20."""
    if image_dir is not None:
        base = root / image_dir
        if not base.is_dir():
            raise DatasetLayoutError(f"Image folder '{base}' does not exist.")
        return base
    sample = names[:20]
    hits = {c: sum((root / c / n).is_file() for n in sample) for c in IMAGE_DIR_CANDIDATES}
    best = max(IMAGE_DIR_CANDIDATES, key=lambda c: hits[c])
    if hits[best] == 0:
        tried = ", ".join(f"'{root / c}'" for c in IMAGE_DIR_CANDIDATES)
        raise DatasetLayoutError(
            f"None of the first listed images (e.g. '{sample[0]}') is under {tried}; pass image_dir."
        )
    return root / best


def fgvc_split(
    root: str | Path,
    split: str = "train",
    *,
    size: int = 224,
    image_dir: str | None = None,
    fit: Fit = "stretch",
    num_workers: int | None = None,
) -> FileSet:
    """One split of an FGVC dataset folder as a FileSet (see the module docstring for the layout)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"'{root}' is not a folder.")
    if split not in FGVC_SPLITS:
        raise DatasetLayoutError(f"split must be one of {', '.join(FGVC_SPLITS)}; got '{split}'.")
    present = {s: _read_split(root, s) for s in ("train", "val", "test") if (root / f"{s}.json").is_file()
               or (root / f"{s}.csv").is_file()}
    parts = ("train", "val") if split == "trainval" else (split,)
    for s in parts:
        if s not in present:
            _read_split(root, s)  # raises the missing-file message
    entries: dict[str, str] = {}
    for s in parts:
        entries.update(present[s])
    classes = sorted({v for table in present.values() for v in table.values()}, key=_class_key)
    train_classes = set(present.get("train", {}).values())
    unseen = sorted(set(entries.values()) - train_classes, key=_class_key) if "train" in present else []
    if unseen:
        raise DatasetLayoutError(
            f"Split '{split}' of '{root.name}' has {len(unseen)} class(es) that train.json never lists "
            f"({', '.join(unseen[:5])}); a model trained on train cannot predict them."
        )
    names = list(entries)
    base = _image_dir(root, names, image_dir)
    missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{len(missing)} of {len(names)} images listed in '{split}' are missing under '{base}', e.g. "
            f"{', '.join(missing[:3])}."
        )
    index = {c: i for i, c in enumerate(classes)}
    return FileSet(
        paths=[base / n for n in names],
        labels=[index[entries[n]] for n in names],  # type: ignore[arg-type]
        class_names=classes,
        size=size,
        fit=fit,
        num_workers=num_workers,
        meta={"source": "fgvc", "root": str(root), "split": split, "image_dir": str(base)},
    )
