"""The Attention Explorer's helpers: images, every module's view of one image, focus, export, presets.

The comparison itself is `toast_core.views.compare` (the path the CLI and the Gradio demo take): its image
type, scene images, model input, overlays on one shared colour scale, focus rows, comparison PNG and
CSV. What is the page's own: caching per (module, image, view), the TOAST pass 1 / pass 2 pair as one
view, the page's captions and table columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st
import torch
from streamlit.logger import get_logger

from toast_core.core.backbone import Backbone
from toast_core.data.images import ImageInputError, load_image
from toast_core.methods.base import SteeringMethod
from toast_core.runs import RunError
from toast_core.storage.checkpoints import CheckpointError
from toast_core.views import AttentionView, ViewUnavailable, cls_maps, compare, compute_view, difference_view

from .session import BASE_KEY, MAX_IMAGE_MB, active_spec, module_for, module_stamp

LOG = get_logger(__name__)


# --- images --------------------------------------------------------------------------------------
class ImageChoice(compare.ImageInput):
    """The image a page shows (`compare.ImageInput`), with a digest that keys the cached maps."""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.rgb.tobytes() + str(self.rgb.shape).encode()).hexdigest()[:16]


@st.cache_data(show_spinner=False, max_entries=64)
def scene_image(task: str, split: str, index: int, size: int = 96, focus: str = "star") -> ImageChoice:
    """One built-in scene with its deciding-object mask (`compare.scene_image`, the training data; on
    a mixed scene `focus` says whether the star or the digit is the mask)."""
    image = compare.scene_image(task, split, index, size, focus=focus)
    return ImageChoice(image.rgb, image.name, image.mask, image.true_label, image.objects)


def decode_upload(data: bytes, name: str = "upload") -> ImageChoice:
    """An uploaded image's raw bytes, decoded by the library's safe decoder (size limit first); raises
    ImageInputError with a user-facing message, logged as one line for the server's log."""
    try:
        rgb = load_image(data, max_bytes=MAX_IMAGE_MB * 1024 * 1024, name=name)
    except ImageInputError as exc:
        LOG.warning("image upload %r refused: %s", name, " ".join(str(exc).split()))
        raise
    return ImageChoice(rgb, name)


def model_input(backbone: Backbone, image: ImageChoice) -> torch.Tensor:
    """The (1, 3, H, W) normalised input the backbone expects (the whole image, stretched)."""
    return compare.model_input(backbone, image.rgb)


# --- views ---------------------------------------------------------------------------------------
TOAST_PASSES = "toast_passes"  # one page view = the library's toast_pass1 and toast_pass2, side by side
#: UI label -> attention view name (toast_core.views.VIEWS, plus TOAST_PASSES)
VIEW_LABELS: dict[str, str] = {
    "CLS attention": "cls",
    "Attention rollout": "rollout",
    "Gradient rollout (FORT)": "grad_rollout",
    "Grad-CAM": "gradcam",
    "Class relevance (Chefer 2021)": "relevance",
    "TOAST pass 1 vs pass 2": TOAST_PASSES,
    "TOAST selection mask": "selection",
}
LAYERED_VIEWS = frozenset({"cls", TOAST_PASSES})
HEAD_VIEWS = frozenset({"cls", TOAST_PASSES})
GRADIENT_VIEWS = frozenset({"grad_rollout", "gradcam", "relevance"})
TOAST_VIEWS = frozenset({TOAST_PASSES, "selection"})


class ModuleView(compare.ModuleView):
    """`compare.ModuleView` with the page's caption: the label is the tile's title already, so the
    caption says only what the module predicts (or why there is no map)."""

    def caption(self) -> str:
        if self.view is None:
            return f"{self.label}: {self.error}"
        if self.is_base and not self.class_names:
            return "no trained head: prediction meaningless"
        return f"{'pretraining head' if self.is_base else 'predicted'}: {self.prediction} ({self.confidence:.2f})"


@st.cache_data(show_spinner=False, max_entries=512)
def _cached_view(
    backbone_key: tuple[str, str, str], module_key: str, module_stamp: float, image_digest: str,
    view: str, kwargs_json: str, _method: SteeringMethod, _x: torch.Tensor,
) -> AttentionView:
    return compute_view(view, _method, _x, **json.loads(kwargs_json))


def _unavailable(key: str, method: SteeringMethod, view: str) -> str | None:
    """Why this module cannot show this view, or None."""
    if view in TOAST_VIEWS and "selection" not in method.views():
        return "TOAST views exist only for TOAST modules"
    if view not in TOAST_VIEWS and view not in method.views():
        return f"'{view}' is not a view of {method.name}"
    if key == BASE_KEY and view in GRADIENT_VIEWS and not getattr(method, "has_trained_head", False):
        return "needs a trained head (this backbone has none)"
    return None


def module_views(
    backbone: Backbone, keys: Sequence[str], image: ImageChoice, view: str, layer: int, head: str | int
) -> list[ModuleView]:
    """The chosen view for every chosen module (base backbone, shipped module or run) on one image.
    TOAST_PASSES gives two maps per TOAST module (pass 1, pass 2) under one view name, so they share
    a colour scale and can be subtracted."""
    x = model_input(backbone, image)
    out: list[ModuleView] = []
    for key in keys:
        try:
            method = module_for(key, backbone)
        except (RunError, CheckpointError) as exc:
            out.append(ModuleView(key, key, None, f"could not be loaded: {exc}"))
            continue
        label = str(getattr(method, "label", method.name))
        names = getattr(method, "class_names", None)
        is_base = key == BASE_KEY
        reason = _unavailable(key, method, view)
        if reason is not None:
            out.append(ModuleView(key, label, None, reason, names, is_base))
            continue
        parts = (("toast_pass1", " · pass 1"), ("toast_pass2", " · pass 2")) if view == TOAST_PASSES else ((view, ""),)
        for name, suffix in parts:
            try:
                v = _cached_view(active_spec().key, key, module_stamp(key), image.digest, name,
                                 json.dumps(compare.view_kwargs(name, layer, head)), method, x)
            except ViewUnavailable as exc:
                out.append(ModuleView(key, label + suffix, None, str(exc), names, is_base))
                continue
            if view == TOAST_PASSES:
                v = dataclasses.replace(v, name=TOAST_PASSES, method=v.method + suffix)
            out.append(ModuleView(key, label + suffix, v, None, names, is_base))
    return out


def cls_grid(backbone: Backbone, key: str, image: ImageChoice) -> tuple[np.ndarray, tuple[int, ...]]:
    """(L, H, gh, gw) CLS maps of every layer and head of one module, for the layer × head figure."""
    method = module_for(key, backbone)
    maps = cls_maps(method, model_input(backbone, image))
    return maps.maps[0], maps.layers


def difference(a: ModuleView, b: ModuleView) -> AttentionView:
    """a − b of the same view (each map scaled to unit mass first)."""
    if a.view is None or b.view is None:
        raise ValueError("Both modules need a map to subtract.")
    return difference_view(a.view, b.view, normalise=True)


#: compare.focus_rows keys -> the page's column names
FOCUS_COLUMNS = {
    "focus_share": "focus share",
    "area_share": "area share (chance)",
    "focus_ratio": "focus ratio",
    "pointing_game": "peak inside",
    "entropy": "entropy",
    "object_share": "share of object attention",
    "object_chance": "its chance (object area share)",
}


def focus_table(
    views: Sequence[ModuleView],
    region: np.ndarray | tuple[float, float, float, float],
    image_size: tuple[int, int],
    objects: np.ndarray | None = None,
) -> list[dict[str, object]]:
    """Focus scores of each module's map against a mask or a box (x0, y0, x1, y1) in image pixels;
    with every object's mask also the deciding object's share of the attention on objects."""
    return [
        {"module": row["module"], **{label: row[key] for key, label in FOCUS_COLUMNS.items() if key in row}}
        for row in compare.focus_rows(views, region, image_size, objects)
    ]


def views_csv_bytes(views: Sequence[ModuleView]) -> bytes:
    """Every map as CSV rows (view, method, layer, head, image, row, col, value), one header."""
    with tempfile.TemporaryDirectory() as tmp:
        return compare.write_views_csv(views, Path(tmp) / "views.csv").read_bytes()


# --- presets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """A lecture shortcut: a built-in scene with a fixed index, and the view that makes the point."""

    key: str
    title: str
    task: str
    split: str
    index: int
    view: str
    note: str


PRESETS: tuple[Preset, ...] = (
    Preset("stars-cls", "Which star? Last-layer CLS attention", "stars", "test", 3, "cls",
           "The label is decided by one star among letters and shapes: does each module look at it?"),
    Preset("stars-rollout", "Stars: rollout across all layers", "stars", "test", 11, "rollout",
           "Rollout follows attention through the residual stream; compare how sharp it gets after tuning."),
    Preset("glyphs-gradcam", "Which digit? Grad-CAM vs attention", "glyphs", "test", 5, "gradcam",
           "Digits were never pretraining labels; Grad-CAM shows what the trained head actually uses."),
    Preset("glyphs-toast", "TOAST: pass 1 vs pass 2", "glyphs", "test", 7, TOAST_PASSES,
           "Top-down steering changes only the values in pass 2: compare with the unsteered pass 1."),
    Preset("stars-fort", "FORT: gradient rollout on a star", "stars", "test", 14, "grad_rollout",
           "The importance FORT turns into position prompts; with few shots it picks the key object."),
)


@st.cache_data(show_spinner=False, max_entries=4)
def _lecture_presets(weights_hash: str) -> tuple[Preset, ...]:
    from toast_core.training.zoo.presets import read_presets

    return tuple(Preset(p.key, p.title, p.task, p.split, p.index, p.view, p.note) for p in read_presets(weights_hash))


def presets(backbone: Backbone) -> tuple[Preset, ...]:
    """The lecture presets for this backbone: chosen from the test split by the zoo's measured
    criteria (`toast_core.training.zoo.presets`), or, without a zoo for it, the fixed example scenes."""
    return _lecture_presets(backbone.weights_hash) or PRESETS


def preset(key: str, backbone: Backbone | None = None) -> Preset | None:
    pool = (*(presets(backbone) if backbone is not None else ()), *PRESETS)
    return next((p for p in pool if p.key == key), None)
