"""Batches in, numbers out: preparing inputs, the task loss, and evaluation / prediction / views.

Split from `train.py` so the loop stays one screen of reading: these are what every consumer of a
trained module needs (the CLI's eval, few-shot scoring, pages) and what the loop calls per step.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from toast_core.core.device import pick_device
from toast_core.core.forward import POOLED_ONLY
from toast_core.data.base import LabeledImages, to_model_input
from toast_core.methods.base import SteeringMethod
from toast_core.views import AttentionView, cls_view, compute_view


def method_device(method: SteeringMethod) -> torch.device:
    """Where the method's own tensors live (its head always exists)."""
    return method.head.weight.device


def prepare_batch(method: SteeringMethod, images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> the normalised, resized float input this method's backbone expects."""
    layout = method.layout
    images = images.to(method_device(method), non_blocking=True)
    return to_model_input(images, layout.mean, layout.std, layout.img_size)


def _is_multilabel(targets: Tensor) -> bool:
    return targets.is_floating_point() and targets.ndim == 2


def task_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for class indices, BCE-with-logits for float multi-hot targets."""
    logits = logits.float()
    if _is_multilabel(targets):
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets.long())


def correct_count(logits: Tensor, targets: Tensor) -> int:
    """Top-1 hits; for multi-hot targets a hit is a top-1 class that is one of the positives."""
    pred = logits.argmax(dim=-1)
    if _is_multilabel(targets):
        return int((targets.gather(1, pred[:, None]).squeeze(1) > 0.5).sum())
    return int((pred == targets.long()).sum())


def cls_attention_grid(method: SteeringMethod, images: Tensor) -> np.ndarray:
    """Last-layer CLS attention, head mean, over the patch tokens, (B, gh, gw) float32, for uint8 images.

    The app's own CLS view (`views.cls_view`: the method's steered forward with
    `Capture(cls_attn=[-1])`, in eval mode, prompts excluded), so snapshots match what pages show.
    """
    return cls_view(method, prepare_batch(method, images), layer=-1, head="mean").map


def resolve_device(method: SteeringMethod, requested: str | torch.device | None) -> torch.device:
    """The method runs where its shared backbone lives; a different explicit request is refused."""
    here = method_device(method)
    if requested is None or str(requested) == "auto":
        return here
    want = pick_device(str(requested))
    if want.type != here.type or (want.index is not None and want.index != here.index):
        raise ValueError(
            f"The method and its shared backbone live on {here}, but device {requested!r} was asked "
            "for; load the backbone on that device instead."
        )
    return here


def evaluate(
    method: SteeringMethod,
    data: LabeledImages,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    *,
    cancel: threading.Event | None = None,
) -> dict[str, float]:
    """Accuracy and mean task loss over `data` in eval mode: {"acc", "loss", "n"}."""
    resolve_device(method, device)
    was_training = method.training
    method.eval()
    total_loss, correct, n = 0.0, 0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                if cancel is not None and cancel.is_set():
                    break
                images = data.images[start : start + batch_size]
                targets = data.labels[start : start + batch_size].to(method_device(method))
                logits = method(prepare_batch(method, images), POOLED_ONLY).logits
                total_loss += float(task_loss(logits, targets)) * len(images)
                correct += correct_count(logits, targets)
                n += len(images)
    finally:
        method.train(was_training)
    return {"acc": correct / max(n, 1), "loss": total_loss / max(n, 1), "n": n}


def predict(
    method: SteeringMethod, images: Tensor, batch_size: int = 64, *, multilabel: bool = False
) -> Tensor:
    """Class probabilities (softmax; sigmoid with `multilabel`) for uint8 images, on the CPU."""
    was_training = method.training
    method.eval()
    outs = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = prepare_batch(method, images[start : start + batch_size])
                logits = method(batch, POOLED_ONLY).logits.float()
                outs.append((logits.sigmoid() if multilabel else logits.softmax(dim=-1)).cpu())
    finally:
        method.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0, method.num_classes)


def view_over(
    method: SteeringMethod, images: Tensor, view: str = "cls", batch_size: int = 64, **options: Any
) -> AttentionView:
    """One attention view (maps, predictions, confidences) of many uint8 images, in batches."""
    views = [
        compute_view(view, method, prepare_batch(method, images[i : i + batch_size]), **options)
        for i in range(0, len(images), batch_size)
    ]
    if len(views) == 1:
        return views[0]
    return replace(
        views[0],
        map=np.concatenate([v.map for v in views]),
        pred=np.concatenate([v.pred for v in views]),
        conf=np.concatenate([v.conf for v in views]),
    )
