"""What a zoo card says about a module on a split: accuracy, focus and faithfulness, each with its
95% interval."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from toast_core.core.stats import wilson_interval
from toast_core.data.base import LabeledImages
from toast_core.methods.base import SteeringMethod
from toast_core.training.train import view_over
from toast_core.views import faithfulness_summary
from toast_core.views.objects import focus_report

#: faithfulness is scored on the first FAITH_PER_CLASS test images of each class (two deletion curves of
#: FAITH_STEPS steps cost ~2 x FAITH_STEPS forwards per image: the whole split would dominate the build)
FAITH_PER_CLASS = 8
FAITH_STEPS = 10


def score_split(method: SteeringMethod, data: LabeledImages, batch_size: int = 64,
                per_image: bool = False) -> dict[str, Any]:
    """Accuracy (Wilson interval) and last-layer CLS focus on the deciding object (bootstrap
    intervals; with every object's mask also the deciding object's share of the attention on
    objects and its chance level), from one batched forward per batch of images. `per_image` adds
    `correct` (bool per image, for paired comparisons between modules on the same images)."""
    view = view_over(method, data.images, "cls", batch_size, layer=-1, head="mean")
    pred = torch.from_numpy(np.asarray(view.pred))
    hits, n = int((pred == data.labels).sum()), len(data)
    lo, hi = wilson_interval(hits, n)
    out: dict[str, Any] = {"acc": hits / max(n, 1), "acc_lo": lo, "acc_hi": hi, "n": n}
    if per_image:
        out["correct"] = (pred == data.labels).numpy()
    if data.masks is not None:
        focus = focus_report(view.map, data.masks, data.objects)
        out.update({k: v for k, v in focus.items() if k != "n"})
    return out


def per_class_subset(data: LabeledImages, per_class: int) -> LabeledImages:
    """The first `per_class` images of every class, in split order (a fixed, stratified subset)."""
    seen: dict[int, int] = {}
    keep = []
    for i, label in enumerate(data.labels.tolist()):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    return data.subset(keep)


def score_faithfulness(method: SteeringMethod, data: LabeledImages, seed: int = 0) -> dict[str, Any]:
    """MoRF / LeRF / random token-deletion AUCs of the last-layer CLS map (the map the focus columns
    score) and the gap LeRF - MoRF, means with bootstrap 95% intervals over the subset's images."""
    subset = per_class_subset(data, FAITH_PER_CLASS)
    return faithfulness_summary(method, subset, "cls", steps=FAITH_STEPS, batch_size=32, seed=seed,
                                layer=-1, head="mean")
