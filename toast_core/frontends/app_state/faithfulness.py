"""The Explorer's Faithfulness tab: does each module use what its map points at?

Each chosen module's map (the view shown above) ranks the patches; `views.deletion_curves` deletes
them most-relevant-first, least-relevant-first and in a random order through the module's own
steered forward, and the table puts the areas under those curves beside the map's focus on the
scene's mask. Curves are cached per (module, image, map, settings), so reruns cost nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import streamlit as st
import torch

from toast_core.core.backbone import Backbone
from toast_core.methods.base import SteeringMethod
from toast_core.views import DeletionCurves, compare, deletion_curves

from .explorer import ImageChoice, ModuleView, model_input
from .session import active_spec, module_for, module_stamp

#: UI label -> deletion mode of `views.deletion_curves`
DELETION_MODES: dict[str, str] = {
    "Drop the patch tokens (native to a ViT)": "tokens",
    "Mean-fill the pixels (for comparison)": "mean_fill",
}
#: DeletionCurves.summary() keys -> the table's column names
AUC_COLUMNS = {
    "morf_auc": "MoRF AUC (lower = faithful)",
    "lerf_auc": "LeRF AUC (higher = faithful)",
    "random_auc": "random AUC",
    "gap": "LeRF − MoRF",
}


@st.cache_data(show_spinner=False, max_entries=256)
def _cached_curves(
    backbone_key: tuple[str, str, str], module_key: str, module_stamp: float, image_digest: str,
    map_digest: str, steps: int, mode: str, orders: tuple[str, ...], seed: int,
    _method: SteeringMethod, _x: torch.Tensor, _map: object,
) -> DeletionCurves:  # fmt: skip
    return deletion_curves(_method, _x, _map, steps=steps, mode=mode, orders=orders, seed=seed)


def module_curves(
    backbone: Backbone,
    views: Sequence[ModuleView],
    image: ImageChoice,
    steps: int = 20,
    mode: str = "tokens",
    with_random: bool = True,
    seed: int = 0,
) -> list[tuple[ModuleView, DeletionCurves]]:
    """Deletion curves of every module that has a map, ranked by that map."""
    x = model_input(backbone, image)
    orders = ("morf", "lerf", "random") if with_random else ("morf", "lerf")
    out = []
    for mv in views:
        if mv.view is None:
            continue
        digest = hashlib.sha256(mv.view.map.tobytes()).hexdigest()[:16]
        curves = _cached_curves(
            active_spec().key, mv.key, module_stamp(mv.key), image.digest, digest, int(steps), mode, orders,
            int(seed), module_for(mv.key, backbone), x, mv.view.map,
        )  # fmt: skip
        out.append((mv, curves))
    return out


def faithfulness_table(
    pairs: Sequence[tuple[ModuleView, DeletionCurves]], image: ImageChoice
) -> list[dict[str, object]]:
    """Per module: prediction, the AUCs and their gap, and (on a scene) the same map's focus ratio
    on the deciding object, so plausibility and faithfulness read side by side."""
    focus: dict[str, float] = {}
    if image.mask is not None:
        rows = compare.focus_rows([mv for mv, _ in pairs], image.mask, image.size)
        focus = {row["module"]: row["focus_ratio"] for row in rows}
    table = []
    for mv, curves in pairs:
        summary = curves.summary()
        row: dict[str, object] = {"module": mv.label, "prediction": compare.prediction_row(mv)["prediction"]}
        row.update({label: summary[key] for key, label in AUC_COLUMNS.items() if key in summary})
        if focus:
            row["focus ratio"] = focus.get(mv.label)
        table.append(row)
    return table
