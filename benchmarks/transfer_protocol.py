"""The papers' transfer protocol on a real benchmark: every method of TOAST's FGVC table, their recipes.

    python benchmarks/transfer_protocol.py --dataset /data/fgvc --backbone vit_base_patch16_224 \\
        --weights vitb_in1k_bottomup.pth --toast-pretuned vitb_in1k_topdown.pth --out fgvc.md
    torchrun --nproc_per_node=8 benchmarks/transfer_protocol.py ...    # the same, on 8 GPUs
    python benchmarks/transfer_protocol.py --smoke                     # generated folders, fixture ViT

`--dataset` is one FGVC dataset folder (VPT's train/val/test JSON splits), one VTAB-1k task folder
(train800 / val200 / train800val200 / test lists), or a folder holding several of either. For each
method the protocol of the released code (KMnP/vpt `tune_fgvc.py`, configs/base-*.yaml; bfshi/TOAST
visual_classification/README.md and configs/base.yaml) is run:
- SGD, momentum 0.9, batch 32, 100 epochs, 10 warm-up epochs, cosine to 0, no gradient clipping;
- the learning rate (VPT's grids, scaled by batch / 256 as `tune_fgvc.py` does) x weight decay
  {0.01, 0.001, 1e-4, 0} (and VPT's prompt length {1, 5, 10, 50, 100}) picked on the val split
  (FGVC: train -> val; VTAB: train800 -> val200), then the chosen setting trained on the final
  split (FGVC: train, as VPT's JSONDataset knows no trainval; VTAB: train800val200) and scored on test;
- TOAST / TOAST-Lite: the released per-dataset learning rates at batch 32 (CUB 0.03, NABirds 0.01,
  Flowers 0.01, Dogs 0.02, Cars 0.02; other data sets searched over those values), weight decay 1e-4,
  starting from the released pre-tuned top-down checkpoint via `methods.toast_import` when
  `--toast-pretuned` is given (else from scratch, and the row says so).
Not reproduced: the released code's training augmentation (random crop + flip) and its
Resize(256) + CenterCrop(224) test transform; here images are resized to the backbone's input
(`--fit center_crop` keeps the aspect ratio). Say so next to any comparison.

The table has the seeds' / TOAST README's columns (CUB, NABirds, OxfordFlower, Stanford-dogs,
Stanford-cars, Average Acc) and names the backbone in every row, published rows included.
Under torchrun every rank runs this script; training and test evaluation are split over the
ranks (toast_core.training.distributed) and only rank 0 writes the table. Last line:
RESULT datasets=<n> methods=<m> mean_test_acc=<...>
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toast_core.core.backbone import Backbone
from toast_core.core.stats import wilson_interval
from toast_core.data.files import FileSet
from toast_core.methods import build_method
from toast_core.methods.base import SteeringMethod
from toast_core.training import distributed
from toast_core.training.train import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent

COLUMNS = ("CUB", "NABirds", "OxfordFlower", "Stanford-dogs", "Stanford-cars")
FOLDER_COLUMN = {"cub_200_2011": "CUB", "cub": "CUB", "nabirds": "NABirds", "oxfordflower": "OxfordFlower",
                 "oxfordflowers": "OxfordFlower", "flowers": "OxfordFlower", "stanforddogs": "Stanford-dogs",
                 "dogs": "Stanford-dogs", "stanfordcars": "Stanford-cars", "cars": "Stanford-cars"}
PUBLISHED_BACKBONE = "ViT-B/16 ImageNet-1k (TOAST model zoo)"
#: bfshi/TOAST visual_classification/README.md, "Results of ViT-B-in1k on FGVC" (means also in issue 18)
PUBLISHED = {
    "Linear": (76.8, 47.3, 81.7, 97.7, 60.3, 72.8),
    "Fine-tune": (80.5, 60.2, 86.9, 94.7, 83.2, 81.1),
    "VPT": (76.9, 72.2, 80.6, 97.3, 62.8, 78.0),
    "LoRA": (82.5, 71.2, 81.2, 97.5, 76.6, 79.8),
    "TOAST": (85.0, 75.2, 88.7, 97.4, 84.5, 86.2),
    "TOAST-Lite": (84.5, 76.9, 89.4, 97.4, 82.0, 86.0),
}
TOAST_LR = {"CUB": 0.03, "NABirds": 0.01, "OxfordFlower": 0.01, "Stanford-dogs": 0.02, "Stanford-cars": 0.02}
WD_GRID = (0.01, 0.001, 0.0001, 0.0)
BATCH, EPOCHS, WARMUP_EPOCHS = 32, 100, 10


@dataclass(frozen=True)
class Recipe:
    """One row of the table: a registry method, its search grid (lr per 256 images unless `scaled`)."""

    label: str
    method: str
    lr_grid: tuple[float, ...]
    wd_grid: tuple[float, ...] = WD_GRID
    configs: tuple[dict[str, Any], ...] = ({},)
    scaled: bool = True  # VPT's tune_fgvc: lr = lr / 256 * batch
    pretuned: bool = False


RECIPES = (
    Recipe("Linear", "linear", (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)),
    Recipe("Fine-tune", "full", (0.001, 0.0001, 0.0005, 0.005)),
    Recipe("VPT", "vpt", (5.0, 2.5, 1.0, 50.0, 25.0, 10.0, 0.5, 0.25, 0.1),
           configs=tuple({"deep": True, "num_tokens": p} for p in (1, 5, 10, 50, 100))),
    # not in VPT's code: searched over VPT's prompt grid; rank 4 as TOAST's LoRA baseline (methods.md)
    Recipe("LoRA", "lora", (5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05), configs=({"r": 4, "alpha": 4.0},)),
    Recipe("TOAST", "toast", (), wd_grid=(0.0001,), configs=({"official_compat": True},), scaled=False, pretuned=True),
    Recipe("TOAST-Lite", "toast_lite", (), wd_grid=(0.0001,), configs=({"official_compat": True},), scaled=False,
           pretuned=True),
)


@dataclass
class Dataset:
    """One benchmark folder: its column, layout and splits (search train/val, final train, test)."""

    name: str
    column: str
    layout: str
    search_train: FileSet
    search_val: FileSet
    final_train: FileSet
    test: FileSet


@dataclass
class Cell:
    label: str
    dataset: str
    acc: float
    n: int
    chosen: dict[str, Any]
    val_acc: float | None
    trainable_share: float
    seconds: float
    note: str = ""
    tried: list[dict[str, Any]] = field(default_factory=list)


def _is_fgvc(path: Path) -> bool:
    return (path / "train.json").is_file() or (path / "train.csv").is_file()


def _is_vtab(path: Path) -> bool:
    return (path / "train800.txt").is_file() or (path / "train800val200.txt").is_file()


def find_datasets(root: Path, size: int, fit: str, workers: int | None) -> list[Dataset]:
    """The dataset folders under `root` (or `root` itself), each read with the real split readers."""
    from toast_core.data.fgvc import fgvc_split
    from toast_core.data.vtab import vtab_split

    folders = [root] if _is_fgvc(root) or _is_vtab(root) else sorted(
        p for p in root.iterdir() if p.is_dir() and (_is_fgvc(p) or _is_vtab(p)))
    if not folders:
        raise SystemExit(f"No FGVC (train.json) or VTAB-1k (train800.txt) folder at or under '{root}'.")
    out = []
    for folder in folders:
        kw = {"size": size, "fit": fit, "num_workers": workers}
        if _is_fgvc(folder):
            read = lambda s, f=folder, kw=kw: fgvc_split(f, s, **kw)  # noqa: E731
            splits = ("train", "val", "train", "test")
            layout = "fgvc"
        else:
            read = lambda s, f=folder, kw=kw: vtab_split(f, s, **kw)  # noqa: E731
            splits = ("train800", "val200", "train800val200", "test")
            layout = "vtab-1k"
        column = FOLDER_COLUMN.get(folder.name.lower(), folder.name)
        out.append(Dataset(folder.name, column, layout, *(read(s) for s in splits)))
    return out


def _steps(n: int, epochs: float) -> tuple[int, int]:
    per_epoch = math.ceil(n / BATCH)
    return max(1, round(per_epoch * epochs)), round(per_epoch * min(WARMUP_EPOCHS, epochs / 10))


def _build(recipe: Recipe, backbone: Backbone, classes: int, config: dict[str, Any],
           pretuned: dict[str, torch.Tensor] | None) -> tuple[SteeringMethod, str]:
    """A fresh module; TOAST rows start from the released pre-tuned decoders, xi and P when given."""
    method = build_method(recipe.method, backbone, classes, config)
    if not recipe.pretuned:
        return method, ""
    if pretuned is None:
        return method, "not pre-tuned (no --toast-pretuned)"
    from toast_core.methods.toast_import import convert_official

    own = method.state_dict()
    take = {k: v for k, v in convert_official(pretuned).state.items() if k in own and not k.startswith("head.")}
    if not any(k.startswith("decoders.") for k in take):
        raise SystemExit("The pre-tuned checkpoint's decoders do not fit this backbone.")
    method.load_state_dict({**own, **{k: v.to(own[k]) for k, v in take.items()}})
    return method, "pre-tuned: official checkpoint"


def run_one(recipe: Recipe, backbone: Backbone, train_set: FileSet, eval_set: FileSet, lr: float, wd: float,
            config: dict[str, Any], epochs: float, seed: int, pretuned: dict[str, torch.Tensor] | None,
            eval_batch: int) -> tuple[dict[str, float], SteeringMethod, str]:
    """Train one setting on `train_set` (streamed) and score it on `eval_set` (sharded over ranks)."""
    method, note = _build(recipe, backbone, train_set.num_classes, {**config, "seed": seed}, pretuned)
    steps, warmup = _steps(len(train_set), epochs)
    cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=lr, weight_decay=wd, optimizer="sgd", momentum=0.9,
                      warmup_steps=warmup, min_lr=0.0, grad_clip=None, seed=seed, eval_batch_size=eval_batch)
    batches = train_set.batches()
    try:
        train(method, batches, config=cfg)
    finally:
        batches.close()
    return distributed.evaluate(method, eval_set, distributed.current(), eval_batch), method, note


def candidates(recipe: Recipe, column: str, grid: str) -> list[tuple[float, float, dict[str, Any]]]:
    """(lr, wd, method config) settings to try, lr already in the batch-32 scale."""
    lrs = recipe.lr_grid
    if recipe.pretuned:
        lrs = (TOAST_LR[column],) if column in TOAST_LR else tuple(sorted(set(TOAST_LR.values())))
    lrs = tuple(lr / 256 * BATCH if recipe.scaled else lr for lr in lrs)
    wds = recipe.wd_grid if grid == "search" else (recipe.wd_grid[-2] if len(recipe.wd_grid) > 1 else recipe.wd_grid[0],)
    configs = recipe.configs
    if grid == "smoke":
        lrs, configs = lrs[-2:], configs[:1]
    return [(lr, wd, c) for c in configs for wd in wds for lr in lrs]


def run_dataset(ds: Dataset, backbone: Backbone, recipes: list[Recipe], args: argparse.Namespace,
                pretuned: dict[str, torch.Tensor] | None, log: Any) -> list[Cell]:
    cells = []
    for recipe in recipes:
        t0 = time.perf_counter()
        tried = []
        settings = candidates(recipe, ds.column, args.grid)
        if len(settings) > 1:
            for lr, wd, config in settings:
                got, _, _ = run_one(recipe, backbone, ds.search_train, ds.search_val, lr, wd, config,
                                    args.epochs, args.seed, pretuned, args.eval_batch)
                tried.append({"lr": lr, "wd": wd, **config, "val_acc": got["acc"]})
                log(f"  {ds.name} {recipe.label:10s} lr={lr:g} wd={wd:g} {config} val {got['acc']:.4f}")
            best = max(range(len(tried)), key=lambda i: tried[i]["val_acc"])  # first best on ties
            lr, wd, config = settings[best]
            val_acc: float | None = tried[best]["val_acc"]
        else:
            (lr, wd, config), val_acc = settings[0], None
        got, method, note = run_one(recipe, backbone, ds.final_train, ds.test, lr, wd, config, args.epochs,
                                    args.seed, pretuned, args.eval_batch)
        cells.append(Cell(recipe.label, ds.name, got["acc"], got["n"], {"lr": lr, "wd": wd, **config}, val_acc,
                          method.trainable_share(), time.perf_counter() - t0, note, tried))
        log(f"{ds.name} {recipe.label:10s} test {got['acc']:.4f} (n={got['n']}) {cells[-1].chosen} {note}")
    return cells


def table(cells: list[Cell], datasets: list[Dataset], backbone_name: str) -> str:
    """Markdown in the TOAST README's columns; every row names its backbone; ours carry n and 95% CI."""
    cols = [c for c in COLUMNS if any(d.column == c for d in datasets)]
    cols += [d.column for d in datasets if d.column not in COLUMNS]
    head = "| Method | Backbone | " + " | ".join(cols) + " | Average Acc |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for label, values in PUBLISHED.items():
        pub = dict(zip((*COLUMNS, "mean"), values))
        row = [f"{pub[c]:.1f}" if c in pub else "-" for c in cols]
        lines.append(f"| {label} (published) | {PUBLISHED_BACKBONE} | " + " | ".join(row) + f" | {pub['mean']:.1f} |")
    for label in dict.fromkeys(c.label for c in cells):
        mine = {next(d.column for d in datasets if d.name == c.dataset): c for c in cells if c.label == label}
        row = []
        for col in cols:
            c = mine.get(col)
            if c is None:
                row.append("-")
                continue
            lo, hi = wilson_interval(round(c.acc * c.n), c.n)
            row.append(f"{100 * c.acc:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] n={c.n}")
        mean = sum(c.acc for c in mine.values()) / len(mine)
        note = next((c.note for c in mine.values() if c.note), "")
        lines.append(f"| {label} (this run{', ' + note if note else ''}) | {backbone_name} | " + " | ".join(row)
                     + f" | {100 * mean:.1f} |")
    return "\n".join(lines)


def smoke_folders(root: Path) -> Path:
    """A tiny FGVC folder and a tiny VTAB-1k folder of built-in scenes (48 px, resized to the backbone)."""
    from toast_core.data.base import LabeledImages
    from toast_core.data.layouts import export_fgvc, export_vtab
    from toast_core.data.scenes import make_task_split

    def split(name: str, per_class: int) -> LabeledImages:
        data = make_task_split("stars", name, per_class=per_class, seed=0, size=48)
        keep = [i for i in range(len(data)) if int(data.labels[i]) < 4]  # 4 of the 8 classes: quick
        return LabeledImages(data.images[keep], data.labels[keep], data.class_names[:4])

    train_s, val_s, test_s = split("train", 4), split("val", 2), split("test", 3)
    export_fgvc({"train": train_s, "val": val_s, "test": test_s}, root / "CUB_200_2011")
    both = LabeledImages(torch.cat([train_s.images, val_s.images]), torch.cat([train_s.labels, val_s.labels]),
                         train_s.class_names)
    export_vtab({"train800": train_s, "val200": val_s, "train800val200": both, "test": test_s}, root / "dtd")
    return root


def smoke_pretuned(backbone: Backbone, path: Path) -> Path:
    """A top-down checkpoint in the released names (`{"model": ...}`: decoders, prompt, top_down_transform,
    backbone), made from a fresh TOAST module on the fixture: it exercises the importer, it is not trained."""
    from safetensors.torch import save_file

    toast = build_method("toast", backbone, 2, {"official_compat": True})
    state = {"prompt": toast.xi.detach(), "top_down_transform": toast.P.detach()}
    for k, v in toast.state_dict().items():
        if k.startswith("decoders."):
            state[k] = v
    state.update({k: v for k, v in backbone.model.state_dict().items() if not k.startswith("head")})
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, help="an FGVC / VTAB-1k folder, or a folder of them")
    p.add_argument("--backbone", default="vit_base_patch16_224", help="timm name, 'arch@weights', 'embedded', 'fixture'")
    p.add_argument("--weights", default=None, help="local weights for the --backbone architecture")
    p.add_argument("--toast-pretuned", type=Path, default=None, help="released top-down (pre-tuned) checkpoint")
    p.add_argument("--methods", default=",".join(r.label for r in RECIPES))
    p.add_argument("--grid", choices=("search", "lr", "smoke"), default="search",
                   help="search: lr x wd (x prompt length) as VPT; lr: lr only at wd 1e-4")
    p.add_argument("--epochs", type=float, default=EPOCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit", choices=("stretch", "center_crop"), default="stretch")
    p.add_argument("--workers", type=int, default=None, help="DataLoader decode workers per process")
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--out", type=Path, default=None, help="write the table (.md) and every run (.json) here")
    p.add_argument("--smoke", action="store_true", help="generated folders, fixture backbone, 2 epochs")
    args = p.parse_args()
    world = distributed.init_from_env()
    log = print if world is None or world.is_main else (lambda *_: None)
    from toast_core.frontends.cli import backbone_from_spec

    tmp = tempfile.TemporaryDirectory(prefix="transfer_smoke_") if args.smoke else None
    try:
        if tmp is not None:
            args.dataset = smoke_folders(Path(tmp.name))
            args.backbone, args.weights, args.grid = "fixture", None, "smoke"
            args.epochs, args.workers = min(args.epochs, 2.0), 1 if args.workers is None else args.workers
        if args.dataset is None:
            p.error("--dataset is required (or --smoke)")
        backbone = backbone_from_spec(args.backbone, args.weights, distributed.device_for(world, "auto"))
        if tmp is not None and args.toast_pretuned is None:
            args.toast_pretuned = smoke_pretuned(backbone, Path(tmp.name) / "topdown.safetensors")
        pretuned = None
        if args.toast_pretuned is not None:
            from toast_core.methods.toast_import import (
                check_backbone_matches,
                convert_official,
                read_official,
            )

            pretuned = read_official(args.toast_pretuned)
            check_backbone_matches(backbone, convert_official(pretuned).backbone_state)  # same ViT or refuse
        wanted = [s.strip() for s in args.methods.split(",") if s.strip()]
        recipes = [r for r in RECIPES if r.label in wanted]
        if len(recipes) != len(wanted):
            p.error(f"--methods takes {', '.join(r.label for r in RECIPES)}")
        datasets = find_datasets(args.dataset, int(backbone.layout.img_size[0]), args.fit, args.workers)
        backbone_name = f"{args.backbone}" + (f" ({Path(args.weights).name})" if args.weights else "")
        cells: list[Cell] = []
        for ds in datasets:
            log(f"{ds.name} ({ds.layout}): search {len(ds.search_train)}/{len(ds.search_val)}, "
                f"final {len(ds.final_train)}, test {len(ds.test)}, {ds.final_train.num_classes} classes")
            cells += run_dataset(ds, backbone, recipes, args, pretuned, log)
        text = table(cells, datasets, backbone_name)
        log(text)
        if args.out is not None and (world is None or world.is_main):
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
            args.out.with_suffix(".json").write_text(json.dumps([c.__dict__ for c in cells], indent=1, default=str))
        mean = sum(c.acc for c in cells) / max(len(cells), 1)
        log(f"RESULT datasets={len(datasets)} methods={len(recipes)} mean_test_acc={mean:.4f}")
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
