"""What a zoo card says about a module on a split: accuracy and focus, each with its 95% interval."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from toast_core.data.base import LabeledImages
from toast_core.methods.base import SteeringMethod
from toast_core.stats import wilson_interval
from toast_core.train import view_over
from toast_core.views.objects import focus_report


def score_split(method: SteeringMethod, data: LabeledImages, batch_size: int = 64) -> dict[str, Any]:
    """Accuracy (Wilson interval) and last-layer CLS focus on the deciding object (bootstrap
    intervals; with every object's mask also the deciding object's share of the attention on
    objects and its chance level), from one batched forward per batch of images."""
    view = view_over(method, data.images, "cls", batch_size, layer=-1, head="mean")
    pred = torch.from_numpy(np.asarray(view.pred))
    hits, n = int((pred == data.labels).sum()), len(data)
    lo, hi = wilson_interval(hits, n)
    out: dict[str, Any] = {"acc": hits / max(n, 1), "acc_lo": lo, "acc_hi": hi, "n": n}
    if data.masks is not None:
        focus = focus_report(view.map, data.masks, data.objects)
        out.update({k: v for k, v in focus.items() if k != "n"})
    return out
