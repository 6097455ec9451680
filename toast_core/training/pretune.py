"""TOAST stage 1 (pre-tuning) on the source scenes, with the backbone frozen and P = identity.

`python -m toast_core.training.pretune` (400 steps of 32 by default) trains the decoders and ξ with the source task loss on
pass 2 plus the variational loss (λ = 0.1: each W1_l learns to invert block l), then writes
`checkpoints/toast_pretuned.{safetensors,json}`. TOAST tuning (stage 2) starts from this module by
default. The official vision pre-tuning code and recipe were never released; this is ours.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from toast_core.core.backbone import CHECKPOINT_DIR, load_backbone
from toast_core.data.scenes import DATA_VERSION, SOURCE_CLASSES, source_batch, source_stream
from toast_core.methods import build_method
from toast_core.storage.checkpoints import save_module
from toast_core.training.pretrain import mean_average_precision
from toast_core.training.train import TrainConfig, predict, train

PRETUNED_STEM = CHECKPOINT_DIR / "toast_pretuned"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--var-weight", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-images", type=int, default=512)
    ap.add_argument("--out", type=Path, default=PRETUNED_STEM)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    backbone = load_backbone("embedded", device="cpu")
    method = build_method(
        "toast", backbone, len(SOURCE_CLASSES), {"seed": args.seed, "var_loss_weight": args.var_weight, "init": "scratch"}
    )
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=1e-4,
        warmup_steps=max(1, args.steps // 20), min_lr=0.01, seed=args.seed, device="cpu",
    )
    t0 = time.time()

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if step % 25 == 0 or step == total:
            print(f"step {step}/{total} loss {metrics.get('loss', float('nan')):.4f} ({time.time() - t0:.0f} s)", flush=True)

    from toast_core.training.train import Callbacks

    result = train(method, source_stream(args.seed, "train"), None, config, callbacks=Callbacks(on_step=progress))
    images, targets, _ = source_batch(args.seed, "val", 0, args.val_images)
    val_map = mean_average_precision(predict(method, images, multilabel=True), targets)
    print(f"pass-2 source val mAP {val_map:.4f} after {result.steps_done} steps ({(time.time() - t0) / 60:.1f} min)", flush=True)
    method.config.var_loss_weight = 0.0  # a loss setting of stage 1, not part of the module
    card = save_module(
        method,
        args.out,
        task=f"source scenes ({DATA_VERSION}, multi-label)",
        metrics={"source_val_map": round(val_map, 4), "val_images": args.val_images},
        timings={"minutes": round((time.time() - t0) / 60, 2), **result.timings},
        extra={
            "stage": "pre-tuning (stage 1)",
            "class_names": list(SOURCE_CLASSES),
            "recipe": {**config.to_dict(), "var_loss_weight": args.var_weight, "loss": "BCE on pass 2 + variational"},
            "command": "python -m toast_core.training.pretune " + " ".join(argv or []),
        },
    )
    print("saved", card, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
