"""Focus that can tell "on the object that decides" from "on any object".

A frozen backbone pretrained on objects already puts ~3x its area share of attention on every
object, distractors included, so the deciding object's area ratio alone rewards that prior. The
deciding object's share of the attention that lands on *objects* — against its share of the
objects' area (the chance level) — is the number that moves only when attention picks the right
object.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from toast_core.core.stats import bootstrap_interval, ratio_of_means
from toast_core.views.base import AttentionView
from toast_core.views.focus import Region, _map_and_weights, region_to_grid


def object_masses(
    attn: AttentionView | np.ndarray | Tensor, target: Region, objects: Region
) -> dict[str, np.ndarray]:
    """Per image: map mass share on the deciding object and on all objects, and their area shares."""
    m, w_target, _ = _map_and_weights(attn, target, None)
    w_objects = np.broadcast_to(
        region_to_grid(objects, (m.shape[-2], m.shape[-1])).astype(np.float64), m.shape
    )
    w_objects = np.maximum(w_objects, w_target)  # the deciding object is an object
    mass = m.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1.0)
    return {
        "on_target": (m * w_target).sum(axis=(1, 2)) / safe,
        "on_objects": (m * w_objects).sum(axis=(1, 2)) / safe,
        "area_target": w_target.mean(axis=(1, 2)),
        "area_objects": w_objects.mean(axis=(1, 2)),
    }


def focus_report(
    attn: AttentionView | np.ndarray | Tensor,
    target: Region,
    objects: Region | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Focus on the deciding object with 95% bootstrap intervals over images, plus (given every
    object's mask) the deciding object's share of the attention on objects and its chance level.

    Keys: n, focus_share (+ _lo/_hi), area_share, focus_ratio (+ _lo/_hi) and, with `objects`,
    object_share (+ _lo/_hi), object_chance (+ _lo/_hi) and objects_ratio (attention on objects /
    object area: the backbone's object prior). All are ratios of means over images, as
    `focus_summary`."""
    if objects is None:
        m, w, _ = _map_and_weights(attn, target, None)
        mass = m.sum(axis=(1, 2))
        cols = {
            "on_target": (m * w).sum(axis=(1, 2)) / np.where(mass > 0, mass, 1.0),
            "area_target": w.mean(axis=(1, 2)),
        }
    else:
        cols = object_masses(attn, target, objects)
    on_t, area_t = cols["on_target"], cols["area_target"]
    out: dict[str, float] = {"n": float(len(on_t))}
    out["focus_share"] = float(np.mean(on_t))
    out["focus_share_lo"], out["focus_share_hi"] = bootstrap_interval((on_t,), np.mean, n_boot, seed)
    out["area_share"] = float(np.mean(area_t))
    out["focus_ratio"] = ratio_of_means(on_t, area_t)
    out["focus_ratio_lo"], out["focus_ratio_hi"] = bootstrap_interval((on_t, area_t), ratio_of_means, n_boot, seed)
    if objects is not None:
        on_o, area_o = cols["on_objects"], cols["area_objects"]
        out["object_share"] = ratio_of_means(on_t, on_o)
        out["object_share_lo"], out["object_share_hi"] = bootstrap_interval((on_t, on_o), ratio_of_means, n_boot, seed)
        out["object_chance"] = ratio_of_means(area_t, area_o)
        out["object_chance_lo"], out["object_chance_hi"] = bootstrap_interval(
            (area_t, area_o), ratio_of_means, n_boot, seed
        )
        out["objects_ratio"] = ratio_of_means(on_o, area_o)
    return out
