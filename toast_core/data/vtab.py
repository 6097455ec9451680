"""VTAB-1k as VPT, NOAH and TOAST release it: one folder per task with "path label" lists.

    vtab-1k/caltech101/  train800.txt  val200.txt  train800val200.txt  test.txt  images/...

Each line is `<path relative to the task folder> <integer label>`. The 1k protocol tunes on
train800 / val200 and reports test accuracy after training on train800val200 (1,000 images).
A missing list, a missing image or a test label that the training list never has is an error that
names the file.
"""

from __future__ import annotations

from pathlib import Path

from toast_core.data.files import DatasetLayoutError, FileSet, Fit

VTAB_SPLITS = {"train800": "train800.txt", "val200": "val200.txt", "train800val200": "train800val200.txt",
               "test": "test.txt"}
ALIASES = {"train": "train800", "val": "val200", "trainval": "train800val200"}
#: the 19 VTAB-1k tasks as the released folders name them
VTAB_TASKS = (
    "caltech101", "cifar", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",  # natural
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",  # specialized
    "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
    "smallnorb_ele",  # structured
)


def _read_list(path: Path) -> list[tuple[str, int]]:
    if not path.is_file():
        raise DatasetLayoutError(f"'{path.name}' is missing in '{path.parent}' (VTAB-1k lists: "
                                 f"{', '.join(VTAB_SPLITS.values())}).")
    rows: list[tuple[str, int]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.strip().rpartition(" ")
        if not name or not label.lstrip("-").isdigit():
            raise DatasetLayoutError(f"'{path.name}' line {n} should read '<path> <label>': {line!r}.")
        rows.append((name.strip(), int(label)))
    if not rows:
        raise DatasetLayoutError(f"'{path}' lists no images.")
    return rows


def vtab_split(
    root: str | Path, split: str = "train800val200", *, size: int = 224, fit: Fit = "stretch", num_workers: int | None = None
) -> FileSet:
    """One split of a VTAB-1k task folder as a FileSet; labels are the lists' own integers."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"'{root}' is not a folder.")
    split = ALIASES.get(split, split)
    if split not in VTAB_SPLITS:
        raise DatasetLayoutError(f"split must be one of {', '.join([*VTAB_SPLITS, *ALIASES])}; got '{split}'.")
    rows = _read_list(root / VTAB_SPLITS[split])
    train_file = root / ("train800val200.txt" if (root / "train800val200.txt").is_file() else "train800.txt")
    train_labels = {label for _, label in _read_list(train_file)}
    unseen = sorted({label for _, label in rows} - train_labels)
    if unseen:
        raise DatasetLayoutError(
            f"'{VTAB_SPLITS[split]}' has label(s) {unseen[:5]} that '{train_file.name}' never has; "
            "a model trained on it cannot predict them."
        )
    missing = [name for name, _ in rows if not (root / name).is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{len(missing)} of {len(rows)} images listed in '{VTAB_SPLITS[split]}' are missing under "
            f"'{root}', e.g. {', '.join(missing[:3])}."
        )
    num_classes = max(train_labels | {label for _, label in rows}) + 1
    return FileSet(
        paths=[root / name for name, _ in rows],
        labels=[label for _, label in rows],  # type: ignore[arg-type]
        class_names=[str(i) for i in range(num_classes)],
        size=size,
        fit=fit,
        num_workers=num_workers,
        meta={"source": "vtab-1k", "root": str(root), "split": split},
    )
