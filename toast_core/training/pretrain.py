"""Pretrain the embedded default backbone on generated source scenes (multi-label).

`python -m toast_core.training.pretrain` (defaults = the shipped recipe: 12400 steps of 32, 48 px then 96 px) trains a
standard timm VisionTransformer sized for a 2-core CPU, saves safetensors + a JSON card, and can
resume from its own periodic state file if interrupted. Same seed, same weights on the same machine.

Progressive resizing is what makes a CPU hour enough: a small ViT from scratch learns per image
seen, not per pixel, and a 48 px scene costs a quarter of the tokens of a 96 px one, so most steps
run at 48 px (the same weights; the position table is resampled on the fly) and the last ~11% at
96 px, where the mAP measured at 96 px jumps (0.55 -> 0.90 on the shipped run).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from toast_core.core.backbone import CHECKPOINT_DIR, build_vit
from toast_core.data.base import to_model_input
from toast_core.data.scenes import DATA_VERSION, SOURCE_CLASSES, source_batch, source_batch_dense

EMBEDDED_CONFIG: dict = {
    "img_size": 96,
    "patch_size": 8,
    "embed_dim": 192,
    "depth": 6,
    "num_heads": 3,
    "mlp_ratio": 4.0,
    "num_classes": len(SOURCE_CLASSES),
    "global_pool": "token",
    "class_token": True,
    "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": [3, 96, 96]},
}


class _SourceBatches(Dataset):
    """Batch i of the source stream (generated in a worker process, off the training threads)."""

    def __init__(self, seed: int, batch_size: int, steps: int, start: int, size: int, low_size: int, low_steps: int):
        self.seed, self.batch_size, self.steps, self.start, self.size = seed, batch_size, steps, start, size
        self.low_size, self.low_steps = low_size, low_steps

    def __len__(self) -> int:
        return self.steps - self.start

    def __getitem__(self, i: int):
        step = self.start + i
        size = self.low_size if step < self.low_steps else self.size
        return source_batch_dense(self.seed, "train", step * self.batch_size, self.batch_size, size)


def lr_at(step: int, steps: int, base_lr: float, warmup: int, min_ratio: float = 0.01) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Macro mAP over classes that occur at least once (ties broken by order, as sklearn's AP)."""
    aps = []
    for c in range(targets.shape[1]):
        t = targets[:, c]
        if t.sum() == 0:
            continue
        order = torch.argsort(scores[:, c], descending=True)
        hits = t[order]
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return sum(aps) / max(len(aps), 1)


def patch_targets(class_maps: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Per-patch class mix (B, gh*gw, C+1) from pixel class maps (0 = background)."""
    onehot = F.one_hot(class_maps.long(), num_classes + 1).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, grid).flatten(2).transpose(1, 2)


def pretrain_loss(
    model: torch.nn.Module,
    patch_head: torch.nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    class_maps: torch.Tensor,
    aux_gap: float,
    dense: float,
) -> torch.Tensor:
    """Multi-label BCE on the CLS readout, plus a dense per-patch class loss from the scene masks.

    A small ViT trained from scratch on ~2 labels per image sits on the class-prior plateau for a
    long time; 144 soft patch labels per image (from the pixel masks) give every token a direct
    signal. The patch head is training-only and is not shipped; inference uses the CLS readout.
    """
    tokens = model.forward_features(x)
    loss = F.binary_cross_entropy_with_logits(model.forward_head(tokens), targets)
    patches = tokens[:, model.num_prefix_tokens :]
    if aux_gap > 0:
        loss = loss + aux_gap * F.binary_cross_entropy_with_logits(model.head(patches.mean(dim=1)), targets)
    if dense > 0:
        patch = model.patch_embed.patch_size
        soft = patch_targets(class_maps, (x.shape[-2] // patch[0], x.shape[-1] // patch[1]), targets.shape[1])
        logp = F.log_softmax(patch_head(patches), dim=-1)
        loss = loss + dense * -(soft * logp).sum(-1).mean()
    return loss


def quick_map(model: torch.nn.Module, seed: int, n: int, device: torch.device) -> float:
    model.eval()
    images, targets, _ = source_batch(seed, "val", 0, n, EMBEDDED_CONFIG["img_size"])
    mean, std = EMBEDDED_CONFIG["pretrained_cfg"]["mean"], EMBEDDED_CONFIG["pretrained_cfg"]["std"]
    with torch.no_grad():
        scores = model(to_model_input(images.to(device), mean, std)).sigmoid().cpu()
    return mean_average_precision(scores, targets)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=12400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    ap.add_argument("--state", type=Path, default=Path(".pretrain_state.safetensors"))
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--val-images", type=int, default=512)
    ap.add_argument("--aux-gap", type=float, default=0.0, help="weight of the mean-patch-token loss (through the same head)")
    ap.add_argument("--dense", type=float, default=1.0, help="weight of the per-patch class loss (training-only head)")
    ap.add_argument("--low-res", type=int, default=48, help="image size of the first phase (progressive resizing)")
    ap.add_argument("--low-res-fraction", type=float, default=0.887, help="share of the steps trained at --low-res")
    ap.add_argument("--log-map-every", type=int, default=500)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    low_steps = int(round(args.low_res_fraction * args.steps))
    # dynamic_img_size only while training: the weights are the same shapes, the shipped config is fixed-size
    model = build_vit({**EMBEDDED_CONFIG, "dynamic_img_size": low_steps > 0})
    model.to(device)
    patch_head = torch.nn.Linear(EMBEDDED_CONFIG["embed_dim"], len(SOURCE_CLASSES) + 1).to(device)
    decay, no_decay = [], []
    for name, p in [*model.named_parameters(), *(("patch_head." + n, p) for n, p in patch_head.named_parameters())]:
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    start, elapsed_before = 0, 0.0
    if args.state.is_file():
        saved = load_file(str(args.state))
        model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
        patch_head.load_state_dict({k[11:]: v for k, v in saved.items() if k.startswith("patch_head.")})
        opt_state = json.loads(Path(str(args.state) + ".json").read_text())
        start, elapsed_before = int(opt_state["step"]), float(opt_state["elapsed_s"])
        for i, group in enumerate(opt.param_groups):
            for j, p in enumerate(group["params"]):
                opt.state[p] = {
                    "step": torch.tensor(float(start)),
                    "exp_avg": saved[f"opt.{i}.{j}.m"].to(device),
                    "exp_avg_sq": saved[f"opt.{i}.{j}.v"].to(device),
                }
        print(f"resumed at step {start}", flush=True)

    mean, std = EMBEDDED_CONFIG["pretrained_cfg"]["mean"], EMBEDDED_CONFIG["pretrained_cfg"]["std"]
    loader = DataLoader(
        _SourceBatches(args.seed, args.batch_size, args.steps, start, EMBEDDED_CONFIG["img_size"], args.low_res, low_steps),
        batch_size=None, num_workers=1, prefetch_factor=4, persistent_workers=False,
    )
    t0 = time.time()
    model.train()
    for i, (images, targets, class_maps) in enumerate(loader):
        step = start + i
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x = to_model_input(images.to(device), mean, std)
        loss = pretrain_loss(model, patch_head, x, targets.to(device), class_maps.to(device), args.aux_gap, args.dense)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            spent = elapsed_before + time.time() - t0
            print(f"step {step}/{args.steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} elapsed {spent / 60:.1f} min", flush=True)
        if args.log_map_every and (step + 1) % args.log_map_every == 0:
            print(f"step {step + 1} val mAP (128 images) {quick_map(model, args.seed, 128, device):.4f}", flush=True)
            model.train()
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            _save_state(model, patch_head, opt, step + 1, elapsed_before + time.time() - t0, args.state)
    train_seconds = elapsed_before + time.time() - t0

    model.eval()
    images, targets, _ = source_batch(args.seed, "val", 0, args.val_images, EMBEDDED_CONFIG["img_size"])
    with torch.no_grad():
        scores = torch.cat([model(to_model_input(images[i : i + 128].to(device), mean, std)).cpu() for i in range(0, len(images), 128)])
    val_map = mean_average_precision(scores.sigmoid(), targets)
    print(f"val mAP {val_map:.4f} on {args.val_images} images; trained {train_seconds / 60:.1f} min", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(args.out / "embedded_vit.safetensors"))
    card = {
        "name": "toast-lab/vit-scenes-s8-96",
        "architecture": "timm VisionTransformer",
        "config": EMBEDDED_CONFIG,
        "class_names": list(SOURCE_CLASSES),
        "data_version": DATA_VERSION,
        "training": {
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
            "warmup": args.warmup, "seed": args.seed, "images_seen": args.steps * args.batch_size,
            "loss": f"multi-label BCE on the CLS readout + {args.dense} x per-patch soft class CE from the scene masks (training-only linear patch head, not shipped)" + (f" + {args.aux_gap} x BCE on the mean patch token" if args.aux_gap else ""), "optimizer": "AdamW, warmup + cosine, clip 1.0",
            "resolution_schedule": (f"{args.low_res} px for steps 0-{low_steps - 1}, then {EMBEDDED_CONFIG['img_size']} px" if low_steps else f"{EMBEDDED_CONFIG['img_size']} px throughout"),
            "device": str(device), "threads": args.threads, "train_minutes": round(train_seconds / 60, 2),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__,
        },
        "quality": {"source_val_map_at_training_end": round(val_map, 4), "val_images": args.val_images},
        "command": "python -m toast_core.training.pretrain " + " ".join(argv or []),
    }
    (args.out / "embedded_vit.json").write_text(json.dumps(card, indent=2))
    print("saved", args.out / "embedded_vit.safetensors", flush=True)
    return 0


def _save_state(model: torch.nn.Module, patch_head: torch.nn.Module, opt: torch.optim.Optimizer, step: int, elapsed: float, path: Path) -> None:
    """Periodic resumable state (safetensors + JSON, written atomically)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"patch_head.{k}": v.detach().cpu().contiguous() for k, v in patch_head.state_dict().items()})
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            st = opt.state.get(p)
            if st:
                tensors[f"opt.{i}.{j}.m"] = st["exp_avg"].detach().cpu().contiguous()
                tensors[f"opt.{i}.{j}.v"] = st["exp_avg_sq"].detach().cpu().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    meta = Path(str(path) + ".json")
    meta.with_suffix(".tmp").write_text(json.dumps({"step": step, "elapsed_s": elapsed}))
    meta.with_suffix(".tmp").replace(meta)


if __name__ == "__main__":
    raise SystemExit(main())
