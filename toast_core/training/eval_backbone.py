"""Measure the embedded backbone's quality, the numbers its card reports.

`python -m toast_core.training.eval_backbone [--write-card]` prints source-task validation mAP, how much of
the last-layer CLS attention falls on objects compared with their area, and a linear probe per
downstream task (50 training images per class) with its focus on the deciding object. Its last line
is `RESULT map=… focus_ratio=… probe_acc_min=…`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from toast_core.core.backbone import EMBEDDED_CARD, Backbone, load_backbone
from toast_core.core.forward import Capture, steered_forward
from toast_core.data.base import to_model_input
from toast_core.data.scenes import TASKS, make_task_split, source_batch
from toast_core.training.pretrain import mean_average_precision
from toast_core.views import focus_summary
from toast_core.views.viz import compose_grid, draw_outline, normalise_maps, overlay

FIGURE = Path(__file__).resolve().parents[2] / "assets" / "embedded_scenes.png"


def _last_layer_cls_map(backbone: Backbone, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Head-mean CLS attention of the last block over patch tokens, (N, gh, gw)."""
    layout, maps = backbone.layout, []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = to_model_input(images[i : i + batch].to(backbone.device), layout.mean, layout.std, layout.img_size)
            out = steered_forward(backbone.model, x, capture=Capture(cls_attn=[-1]))
            row = out.cls_attn[layout.depth - 1].mean(dim=1)[:, out.patch_start :]
            maps.append(row.reshape(-1, *out.grid).cpu())
    return torch.cat(maps)


def _focus(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """The card's three focus numbers (views.focus_summary)."""
    summary = focus_summary(maps, masks)
    return {k: summary[k] for k in ("focus_share", "area_share", "focus_ratio")}


def source_quality(backbone: Backbone, n: int, seed: int) -> dict[str, float]:
    images, targets, masks = source_batch(seed, "val", 0, n, backbone.layout.img_size[0])
    layout, scores = backbone.layout, []
    with torch.no_grad():
        for i in range(0, n, 128):
            x = to_model_input(images[i : i + 128].to(backbone.device), layout.mean, layout.std, layout.img_size)
            scores.append(backbone.model(x).sigmoid().cpu())
    stats = _focus(_last_layer_cls_map(backbone, images), masks)
    return {"map": mean_average_precision(torch.cat(scores), targets), **stats}


def probe_quality(backbone: Backbone, task: str, per_class: int, seed: int, steps: int) -> dict[str, float]:
    """Linear probe through the project's own method + training loop, then its test accuracy and focus."""
    from toast_core.methods import build_method
    from toast_core.training.train import TrainConfig, evaluate, train

    size = backbone.layout.img_size[0]
    train_set = make_task_split(task, "train", per_class, seed, size)
    test_set = make_task_split(task, "test", 30, seed, size)
    method = build_method("linear", backbone, train_set.num_classes, {"seed": seed})
    config = TrainConfig(steps=steps, batch_size=64, lr=3e-3, weight_decay=1e-4, warmup_steps=10, seed=seed, eval_every=0)
    train(method, train_set, None, config)
    metrics = evaluate(method, test_set, batch_size=128)
    stats = _focus(_last_layer_cls_map(backbone, test_set.images), test_set.masks)
    return {"probe_acc": float(metrics["acc"]), **stats}


def _mask_tile(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image dimmed outside the mask, with the mask's outline drawn, so masks can be checked by eye."""
    return draw_outline(np.where(mask[..., None], image, (image * 0.3).astype(np.uint8)), mask)


def quality_figure(backbone: Backbone, path: Path = FIGURE, per_row: int = 2, tile: int = 192) -> Path:
    """Scenes, their masks and the backbone's last-layer CLS attention: 4 source scenes, 2 per task.

    Source masks are every labelled object; task masks are the deciding object only.
    """
    size = backbone.layout.img_size[0]
    images, masks, titles = [], [], []
    src_images, src_targets, src_masks = source_batch(0, "val", 0, 4, size)
    names = backbone.class_names
    for i in range(len(src_images)):
        labels = [names[c] for c in torch.nonzero(src_targets[i]).flatten().tolist()] if names else []
        images.append(src_images[i]), masks.append(src_masks[i]), titles.append("source: " + ", ".join(labels))
    for task in TASKS:
        data = make_task_split(task, "test", 1, 0, size)
        for i in (0, 3):
            images.append(data.images[i]), masks.append(data.masks[i])
            titles.append(f"{task}: {data.class_names[int(data.labels[i])]}")
    maps = _last_layer_cls_map(backbone, torch.stack(images))
    tiles, labels = [], []
    for img, mask, m, title in zip(images, masks, maps, titles, strict=True):
        rgb = img.permute(1, 2, 0).numpy()
        norm = normalise_maps([m.numpy()], per_map=True)[0]
        big = [cv2.resize(t, (tile, tile), interpolation=cv2.INTER_NEAREST) for t in (rgb, _mask_tile(rgb, mask.numpy()))]
        tiles += [*big, cv2.resize(overlay(rgb, norm), (tile, tile), interpolation=cv2.INTER_LINEAR)]
        labels += [title[:30], "mask", "CLS attention (last layer)"]
    path.parent.mkdir(parents=True, exist_ok=True)
    compose_grid(tiles, labels, ncols=3 * per_row).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--probe-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-card", action="store_true", help="store the numbers in checkpoints/embedded_vit.json")
    ap.add_argument("--figure", type=Path, nargs="?", const=FIGURE, help=f"also draw scenes, masks and attention (default {FIGURE.name})")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    backbone = load_backbone("embedded", device="cpu")
    src = source_quality(backbone, args.val_images, args.seed)
    print(f"source val mAP {src['map']:.4f}; CLS attention on objects {src['focus_share']:.3f} vs area {src['area_share']:.3f} (ratio {src['focus_ratio']:.2f})")
    probes = {}
    for task in TASKS:
        probes[task] = probe_quality(backbone, task, args.per_class, args.seed, args.probe_steps)
        p = probes[task]
        print(f"{task}: linear probe test acc {p['probe_acc']:.3f}; focus on deciding object {p['focus_share']:.3f} vs area {p['area_share']:.3f} (ratio {p['focus_ratio']:.2f})")
    if args.write_card:
        card = json.loads(EMBEDDED_CARD.read_text())
        card["quality"] = {
            "source_val_map": round(src["map"], 4),
            "source_val_images": args.val_images,
            "object_focus_share": round(src["focus_share"], 4),
            "object_area_share": round(src["area_share"], 4),
            "object_focus_ratio": round(src["focus_ratio"], 3),
            "linear_probe": {t: {k: round(v, 4) for k, v in p.items()} for t, p in probes.items()},
            "probe_images_per_class": args.per_class,
            "command": "python -m toast_core.training.eval_backbone --write-card",
        }
        EMBEDDED_CARD.write_text(json.dumps(card, indent=2))
    if args.figure:
        print("figure", quality_figure(backbone, args.figure))
    print(f"({(time.time() - t0):.0f} s)")
    print(f"RESULT map={src['map']:.4f} focus_ratio={src['focus_ratio']:.2f} probe_acc_min={min(p['probe_acc'] for p in probes.values()):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
