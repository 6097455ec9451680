"""FGVC (VPT split JSON / CSV) and VTAB-1k (path-label lists) folders, read on demand in workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from toast_core.data.base import LabeledImages
from toast_core.data.fgvc import fgvc_split
from toast_core.data.files import DatasetLayoutError
from toast_core.data.layouts import export_fgvc, export_vtab
from toast_core.data.vtab import vtab_split
from toast_core.methods import build_method
from toast_core.training import distributed
from toast_core.training.evaluation import evaluate
from toast_core.training.train import TrainConfig, train


def _split(n: int, classes: int = 3, seed: int = 0, size: int = 40) -> LabeledImages:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size + 8), generator=gen, dtype=torch.uint8)  # not square
    return LabeledImages(images, torch.arange(n) % classes, [f"k{i}" for i in range(classes)])


@pytest.fixture()
def fgvc_root(tmp_path: Path) -> Path:
    return export_fgvc({"train": _split(9), "val": _split(3, seed=1), "test": _split(6, seed=2)}, tmp_path / "cub")


@pytest.fixture()
def vtab_root(tmp_path: Path) -> Path:
    splits = {"train800": _split(8), "val200": _split(4, seed=1), "test": _split(6, seed=2)}
    splits["train800val200"] = LabeledImages(
        torch.cat([splits["train800"].images, splits["val200"].images]),
        torch.cat([splits["train800"].labels, splits["val200"].labels]), splits["train800"].class_names)
    return export_vtab(splits, tmp_path / "caltech101")


def test_fgvc_split_reads_the_vpt_layout(fgvc_root: Path) -> None:
    train_set = fgvc_split(fgvc_root, "train", size=32, num_workers=0)
    assert len(train_set) == 9 and train_set.class_names == ["0", "1", "2"]
    assert train_set.meta["image_dir"].endswith("images")
    loaded = train_set.load(batch_size=4)
    assert loaded.images.shape == (9, 3, 32, 32) and loaded.images.dtype == torch.uint8
    assert loaded.labels.tolist() == [i % 3 for i in range(9)]
    assert len(fgvc_split(fgvc_root, "trainval", size=32)) == 12


def test_fgvc_csv_in_place_of_json(fgvc_root: Path) -> None:
    table = json.loads((fgvc_root / "test.json").read_text())
    (fgvc_root / "test.json").unlink()
    (fgvc_root / "test.csv").write_text("path,label\n" + "".join(f"{k},{v}\n" for k, v in table.items()))
    assert fgvc_split(fgvc_root, "test", size=32).labels.tolist() == list(table.values())


def test_fgvc_errors_name_what_is_missing(fgvc_root: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="No split file for 'val'.*val.json"):
        (fgvc_root / "val.json").unlink()
        fgvc_split(fgvc_root, "val")
    table = json.loads((fgvc_root / "test.json").read_text())
    first = next(iter(table))
    (fgvc_root / "images" / first).unlink()
    with pytest.raises(DatasetLayoutError, match="1 of 6 images listed in 'test' are missing"):
        fgvc_split(fgvc_root, "test")
    table = {k: 7 for k in list(table)[1:]}
    (fgvc_root / "test.json").write_text(json.dumps(table))
    with pytest.raises(DatasetLayoutError, match="class.*train.json never lists.*7"):
        fgvc_split(fgvc_root, "test")


def test_vtab_split_reads_the_1k_lists(vtab_root: Path) -> None:
    train_set = vtab_split(vtab_root, "train800val200", size=32, num_workers=0)
    assert len(train_set) == 12 and train_set.num_classes == 3
    assert len(vtab_split(vtab_root, "val", size=32)) == 4  # alias of val200
    test = vtab_split(vtab_root, "test", size=32).load()
    assert test.images.shape == (6, 3, 32, 32)


def test_vtab_errors_name_the_file(vtab_root: Path) -> None:
    (vtab_root / "test.txt").write_text("images/test/00000.png 0\nimages/test/nope.png 1\n")
    with pytest.raises(DatasetLayoutError, match="1 of 2 images listed in 'test.txt' are missing"):
        vtab_split(vtab_root, "test")
    (vtab_root / "test.txt").write_text("images/test/00000.png 9\n")
    with pytest.raises(DatasetLayoutError, match=r"label\(s\) \[9\]"):
        vtab_split(vtab_root, "test")
    (vtab_root / "val200.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="'val200.txt' is missing"):
        vtab_split(vtab_root, "val200")
    (vtab_root / "train800.txt").write_text("no-label-here\n")
    with pytest.raises(DatasetLayoutError, match="line 1 should read"):
        vtab_split(vtab_root, "train800")


def test_streamed_training_equals_in_memory_training(fgvc_root: Path, fixture_backbone) -> None:
    """Decoding in 2 DataLoader workers, the loop sees the batches the in-memory run sees."""
    files = fgvc_split(fgvc_root, "train", size=32, num_workers=2)
    config = TrainConfig(steps=5, batch_size=4, lr=1e-2, seed=3)
    streamed = build_method("lora", fixture_backbone, 3)
    train(streamed, files.batches(), config=config)
    in_memory = build_method("lora", fixture_backbone, 3)
    train(in_memory, files.load(), config=config)
    for (name, a), b in zip(streamed.state_dict().items(), in_memory.state_dict().values()):
        assert torch.equal(a, b), name
    test = fgvc_split(fgvc_root, "test", size=32, num_workers=2)
    assert distributed.evaluate(streamed, test, None, batch_size=4) == pytest.approx(
        evaluate(streamed, test.load(), batch_size=64))


def test_a_broken_image_names_its_path(fgvc_root: Path, fixture_backbone) -> None:
    files = fgvc_split(fgvc_root, "train", size=32, num_workers=0)
    files.paths[0].write_bytes(b"not an image")
    with pytest.raises(ValueError, match=files.paths[0].name):
        files.load()
