"""The Benchmark page's rows: accuracy, trainable share, step time and attention focus per run."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st
import torch

from toast_core.core.backbone import Backbone
from toast_core.methods.base import SteeringMethod
from toast_core.runs import RunError, RunManager
from toast_core.storage.checkpoints import CheckpointError
from toast_core.views import ViewUnavailable, compute_view, faithfulness_summary, focus_summary

from .explorer import ImageChoice, model_input, scene_image
from .session import _cached_backbone, _cached_run_module, active_spec, runs_root
from .tuning import module_card

FOCUS_IMAGES = 16  # built-in test images per run for the benchmark's focus column
FAITH_STEPS = 10  # deletion steps per curve in the benchmark's faithfulness columns


def _run_and_scenes(
    backbone_key: tuple[str, str, str], run_id: str, stamp: float, task: str
) -> tuple[Backbone, SteeringMethod, list[ImageChoice], list[str]] | None:
    """The backbone, the run's module and FOCUS_IMAGES test scenes of its (base) task with the
    task's class names; None for tasks that are not built-in (no masks)."""
    from toast_core.data.scenes import TASKS

    base_task = task.rsplit(":", 1)[-1] if task.startswith("episode:") else task
    if base_task not in TASKS:
        return None
    backbone = _cached_backbone(backbone_key)
    method = _cached_run_module(str(runs_root()), backbone_key, run_id, stamp)
    size = int(backbone.layout.img_size[0])
    images = [scene_image(base_task, "test", i, size) for i in range(FOCUS_IMAGES)]
    return backbone, method, images, list(TASKS[base_task].classes)


@st.cache_data(show_spinner="Measuring focus on built-in test scenes…", max_entries=256)
def run_focus(backbone_key: tuple[str, str, str], run_id: str, stamp: float, task: str) -> float | None:
    """Focus ratio (last-layer CLS attention on the deciding object over its area share, as
    `views.focus_summary` defines it for every table) on FOCUS_IMAGES built-in test scenes;
    None for tasks without masks."""
    found = _run_and_scenes(backbone_key, run_id, stamp, task)
    if found is None:
        return None
    backbone, method, images, _ = found
    batch = torch.cat([model_input(backbone, img) for img in images])  # one forward, not 16
    view = compute_view("cls", method, batch, layer=-1, head="mean")
    masks = np.stack([img.mask for img in images])
    return focus_summary(view, masks, images[0].size)["focus_ratio"]


@st.cache_data(show_spinner="Deleting patches on built-in test scenes…", max_entries=256)
def run_faithfulness(backbone_key: tuple[str, str, str], run_id: str, stamp: float, task: str) -> dict[str, Any] | None:
    """Deletion faithfulness of the same last-layer CLS map on the same FOCUS_IMAGES scenes
    (`views.faithfulness_summary`: token deletion, FAITH_STEPS steps, bootstrap 95% intervals);
    None for tasks that are not built-in."""
    from toast_core.data.base import LabeledImages

    found = _run_and_scenes(backbone_key, run_id, stamp, task)
    if found is None:
        return None
    _, method, images, classes = found
    rgb = torch.from_numpy(np.stack([img.rgb for img in images])).permute(0, 3, 1, 2).contiguous()
    data = LabeledImages(rgb, torch.arange(len(images)) % len(classes), classes)  # scene i has label i mod k
    return faithfulness_summary(method, data, "cls", steps=FAITH_STEPS, batch_size=FOCUS_IMAGES, layer=-1, head="mean")


def benchmark_rows(
    manager: RunManager, backbone: Backbone, with_focus: bool = True, with_faithfulness: bool = False
) -> list[dict[str, Any]]:
    """One row per run: method, task, state, accuracy, trainable %, step time, focus, faithfulness."""
    rows = []
    for r in manager.list(history=False):
        card = module_card(manager, r.run_id) if r.state == "done" else None
        share = (card or {}).get("describe", {}).get("trainable_share")
        own = r.backbone.get("weights_hash") == backbone.weights_hash
        focus = None
        if with_focus and own and r.state == "done" and r.checkpoint:
            try:
                focus = run_focus(active_spec().key, r.run_id, float(r.ended or 0), r.task)
            except (RunError, CheckpointError, ViewUnavailable):
                focus = None
        faith = None
        if with_faithfulness and own and r.state == "done" and r.checkpoint:
            try:
                faith = run_faithfulness(active_spec().key, r.run_id, float(r.ended or 0), r.task)
            except (RunError, CheckpointError, ViewUnavailable):
                faith = None
        rows.append({
            "run": r.name,
            "run_id": r.run_id,
            "method": r.method,
            "task": r.task,
            "state": r.state,
            "val acc": r.final.get("val_acc"),
            "train acc": r.final.get("train_acc"),
            "trainable %": None if share is None else 100.0 * float(share),
            "ms / image (train)": r.timings.get("train_ms_per_img"),
            "focus ratio": focus,
            "MoRF AUC": None if faith is None else faith["morf_auc"],
            "LeRF − MoRF": None if faith is None else faith["gap"],
            "gap 95% CI": None if faith is None else f"[{faith['gap_lo']:.3f}, {faith['gap_hi']:.3f}]",
            "steps": r.step,
            "device": r.device,
            "backbone": r.backbone.get("name", ""),
            "this backbone": own,
        })
    return rows


@st.cache_data(show_spinner=False, max_entries=8)
def zoo_table(backbone_key: tuple[str, str, str]) -> list[dict[str, Any]]:
    """The lecture zoo's rows for this backbone, from the shipped cards (no model is run)."""
    from toast_core.training.zoo.report import zoo_rows

    return zoo_rows(_cached_backbone(backbone_key))
