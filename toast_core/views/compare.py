"""Several steering modules' view of one image, side by side: the Streamlit-free comparison core.

The CLI (`python -m toast_core compare`), the Gradio demo and bundle figures all answer the same
question — "where does each module look on this image?" — so they share this one path: image in,
`views.compute_view` per module (the one steered forward), `viz.overlays` with ONE shared
normalisation across modules (so colours compare), focus scores from `views.focus_metrics`.
Nothing here imports Streamlit, so headless tools and the Spaces demo can use it.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from toast_core.core.backbone import Backbone
from toast_core.methods import build_method
from toast_core.methods.base import SteeringMethod
from toast_core.views import VIEWS as VIEW_FUNCTIONS
from toast_core.views import AttentionView, ViewUnavailable, compute_view, focus_metrics, method_label
from toast_core.views.inputs import ImageInput, model_input, open_image, parse_scene_ref, scene_image
from toast_core.views.viz import compose_grid, draw_outline, overlays, view_to_csv

BASE_KEY = "base"
#: views that read one layer (and one head or the head mean); the others span all layers
LAYERED_VIEWS = frozenset({"cls", "toast_pass1", "toast_pass2"})
GRADIENT_VIEWS = frozenset({"grad_rollout", "gradcam", "relevance"})
VIEW_NAMES: tuple[str, ...] = tuple(VIEW_FUNCTIONS)
BOX_COLOUR = (255, 255, 255)
LABEL_HEIGHT = 30  # two lines of the default font: module, then prediction


@dataclass
class ModuleView:
    """One module's view of the image, or the reason there is none (never an exception per module)."""

    key: str
    label: str
    view: AttentionView | None
    error: str | None = None
    class_names: list[str] | None = None
    is_base: bool = False

    @property
    def prediction(self) -> str:
        """The predicted label (or class index), '' when there is no view."""
        if self.view is None:
            return ""
        k = int(self.view.pred[0])
        names = self.class_names
        return names[k] if names and 0 <= k < len(names) else f"class {k}"

    @property
    def confidence(self) -> float | None:
        return None if self.view is None else float(self.view.conf[0])

    def caption(self) -> str:
        if self.view is None:
            return f"{self.label}: {self.error}"
        if self.is_base and not self.class_names:
            return f"{self.label}: no trained head (prediction meaningless)"
        return f"{self.label}: {self.prediction} ({self.confidence:.2f})"


# --- modules -------------------------------------------------------------------------------------
def base_module(backbone: Backbone) -> SteeringMethod:
    """The unsteered backbone as a module: a linear readout that reuses the backbone's own head (the
    embedded backbone's pretraining head and class names) when it has one. `has_trained_head` says
    whether its predictions (and gradient views) mean anything."""
    head = getattr(backbone.model, "head", None)
    has_head = isinstance(head, torch.nn.Linear) and head.out_features > 0
    method = build_method("linear", backbone, head.out_features if has_head else 2)
    if has_head:
        with torch.no_grad():
            method.head.weight.copy_(head.weight)
            method.head.bias.copy_(head.bias)
        names = list(backbone.class_names)
        method.class_names = names if len(names) == head.out_features else None  # type: ignore[attr-defined]
        method.label = "base backbone"  # type: ignore[attr-defined]
    else:
        method.class_names = None  # type: ignore[attr-defined]
        method.label = "base backbone (no head)"  # type: ignore[attr-defined]
    method.has_trained_head = has_head  # type: ignore[attr-defined]
    method.is_base = True  # type: ignore[attr-defined]
    method.eval()
    return method


def view_kwargs(view: str, layer: int, head: str | int) -> dict[str, Any]:
    """The options a view takes: layer and head only for single-layer views."""
    if view in LAYERED_VIEWS:
        return {"layer": int(layer), "head": head}
    return {}


def check_view_args(backbone: Backbone, view: str, layer: int, head: str | int) -> str | int:
    """Validate view / layer / head against the backbone; returns the head as "mean" or an int."""
    if view not in VIEW_FUNCTIONS:
        raise ValueError(f"Unknown view '{view}'; views: {', '.join(VIEW_FUNCTIONS)}.")
    depth, heads = backbone.layout.depth, backbone.layout.num_heads
    if not -depth <= int(layer) < depth:
        raise ValueError(f"Layer {layer} does not exist: this backbone has {depth} blocks (use 0..{depth - 1} or -1).")
    if isinstance(head, str) and head.strip().lower() == "mean":
        return "mean"
    try:
        h = int(head)
    except (TypeError, ValueError):
        raise ValueError(f"Head must be 'mean' or a head index, got {head!r}.") from None
    if not 0 <= h < heads:
        raise ValueError(f"Head {h} does not exist: this backbone has {heads} heads (0..{heads - 1}).")
    return h


def _available(method: SteeringMethod) -> set[str]:
    names = set(method.views())
    if "toast_pass1" in names:
        names.add("toast_pass2")
    return names


def compare_runs(
    backbone: Backbone,
    modules: Mapping[str, SteeringMethod] | Sequence[SteeringMethod],
    image: ImageInput | np.ndarray,
    view: str = "cls",
    layer: int = -1,
    head: str | int = "mean",
) -> list[ModuleView]:
    """The same view of every module on one image, in order. A module that cannot produce the view
    (e.g. a TOAST view of a LoRA module, a gradient view of a headless base) gets an error text
    instead of a map, so one bad choice never hides the others."""
    head = check_view_args(backbone, view, layer, head)
    rgb = image.rgb if isinstance(image, ImageInput) else image
    items = list(modules.items()) if isinstance(modules, Mapping) else [(method_label(m), m) for m in modules]
    x = model_input(backbone, rgb)
    kwargs = view_kwargs(view, layer, head)
    out: list[ModuleView] = []
    for key, method in items:
        label = method_label(method)
        names = getattr(method, "class_names", None)
        is_base = bool(getattr(method, "is_base", False))
        if method.backbone.weights_hash != backbone.weights_hash:
            out.append(ModuleView(key, label, None, "belongs to another backbone", names, is_base))
            continue
        if view not in _available(method):
            out.append(ModuleView(key, label, None, f"'{view}' is not a view of {method.name}", names, is_base))
            continue
        if is_base and view in GRADIENT_VIEWS and not getattr(method, "has_trained_head", False):
            out.append(ModuleView(key, label, None, "needs a trained head (this backbone has none)", names, is_base))
            continue
        try:
            v = compute_view(view, method, x, **kwargs)
        except ViewUnavailable as exc:
            out.append(ModuleView(key, label, None, str(exc), names, is_base))
            continue
        v.method = label
        out.append(ModuleView(key, label, v, None, names, is_base))
    return out


# --- rendering -----------------------------------------------------------------------------------
def _draw_box(tile: np.ndarray, box: Sequence[float] | None) -> np.ndarray:
    if box is None:
        return tile
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    out = np.ascontiguousarray(tile.copy())
    thickness = max(1, round(min(out.shape[:2]) / 120))
    cv2.rectangle(out, (min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1)), BOX_COLOUR, thickness)
    return out


def overlay_tiles(
    image: ImageInput | np.ndarray,
    results: Sequence[ModuleView],
    alpha: float = 0.5,
    cmap: str = "jet",
    box: Sequence[float] | None = None,
    outline: np.ndarray | None = None,
) -> list[np.ndarray]:
    """One overlay per module that has a map, all on ONE shared colour scale (global min/max),
    with the focus region drawn on: a box (x0, y0, x1, y1) and/or a mask's outline."""
    rgb = image.rgb if isinstance(image, ImageInput) else image
    maps = [r.view for r in results if r.view is not None]
    tiles = overlays(rgb, maps, alpha=alpha, cmap=cmap) if maps else []
    return mark_region(tiles, box, outline)


def mark_region(
    tiles: Sequence[np.ndarray], box: Sequence[float] | None = None, outline: np.ndarray | None = None
) -> list[np.ndarray]:
    """Copies of overlay tiles with the focus region drawn on (no overlay is recomputed)."""
    return [draw_outline(_draw_box(t, box), outline, BOX_COLOUR) for t in tiles]


def comparison_image(
    image: ImageInput | np.ndarray,
    results: Sequence[ModuleView],
    alpha: float = 0.5,
    cmap: str = "jet",
    box: Sequence[float] | None = None,
    min_tile: int = 192,
) -> Image.Image:
    """The image, then every module's overlay, labelled with module and prediction, as one picture.
    Small images are enlarged (nearest neighbour) to `min_tile` px so labels stay readable."""
    rgb = image.rgb if isinstance(image, ImageInput) else image
    usable = [r for r in results if r.view is not None]
    if not usable:
        raise ValueError("None of the modules produced this view: " + "; ".join(r.caption() for r in results))
    tiles = [_draw_box(rgb, box), *overlay_tiles(rgb, usable, alpha, cmap, box)]
    scale = max(1, -(-min_tile // max(1, min(rgb.shape[:2]))))
    if scale > 1:
        tiles = [cv2.resize(t, (t.shape[1] * scale, t.shape[0] * scale), interpolation=cv2.INTER_NEAREST) for t in tiles]
    width = tiles[0].shape[1]
    labels = [_fit(image.name if isinstance(image, ImageInput) else "image", width)]
    for r in usable:
        second = "no trained head" if r.is_base and not r.class_names else f"{r.prediction} ({r.confidence:.2f})"
        labels.append(_fit(r.label, width) + "\n" + _fit(second, width))
    return compose_grid(tiles, labels, label_height=LABEL_HEIGHT)


def _fit(text: str, width: int) -> str:
    """Shorten a label (with an ellipsis) so it fits the tile width in the default font."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def comparison_png_bytes(image: ImageInput | np.ndarray, results: Sequence[ModuleView], **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    comparison_image(image, results, **kwargs).save(buf, format="PNG")
    return buf.getvalue()


def _task_for_figures(task: str) -> str | None:
    """The built-in task whose test scenes illustrate a run (its own task, or an episode's base)."""
    from toast_core.data.scenes import TASKS

    base = task.rsplit(":", 1)[-1] if task.startswith("episode:") else task
    return base if base in TASKS else None


def comparison_figures(
    module: Any, backbone: Backbone, task: str, scenes: int = 2, views: Sequence[str] = ("cls", "rollout")
) -> dict[str, bytes]:
    """PNG figures (a run bundle's): base backbone vs `module` on the first test scenes of its task,
    one shared colour scale per figure (`compare_runs`). Empty for tasks without built-in scenes."""
    base_task = _task_for_figures(task)
    if base_task is None:
        return {}
    size = int(backbone.layout.img_size[0])
    modules = {"base": base_module(backbone), "run": module}
    figures: dict[str, bytes] = {}
    for index in range(scenes):
        image = scene_image(base_task, "test", index, size)
        for view in views:
            results = compare_runs(backbone, modules, image, view=view)
            if any(r.view is not None for r in results):
                figures[f"{view}_{base_task}_test{index}.png"] = comparison_png_bytes(image, results)
    return figures


def prediction_row(r: ModuleView) -> dict[str, Any]:
    """Module, prediction and confidence; a base without a trained head predicts nothing."""
    if r.is_base and not r.class_names:
        return {"module": r.label, "prediction": "(no trained head)", "confidence": None}
    return {"module": r.label, "prediction": r.prediction, "confidence": r.confidence}


def focus_rows(
    results: Sequence[ModuleView], region: Any, image_size: tuple[int, int], objects: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Focus scores of each map against a mask (H, W) or a box (x0, y0, x1, y1) in image pixels:
    focus share (mass inside), area share (chance level), focus ratio, pointing game, entropy; with
    every object's mask (and a mask region) also the region's share of the attention on objects
    and its chance level (its share of the objects' area)."""
    from toast_core.views.objects import object_masses

    rows = []
    for r in results:
        if r.view is None:
            continue
        m = focus_metrics(r.view, region, image_size)
        first = {k: (v[0] if np.ndim(v) else v) for k, v in m.items()}
        row = {
            **prediction_row(r),
            "focus_share": float(first["focus_share"]),
            "area_share": float(first["area_share"]),
            "focus_ratio": float(first["focus_ratio"]),
            "pointing_game": bool(first["pointing_game"]),
            "entropy": float(first["entropy"]),
        }
        if objects is not None and not isinstance(region, tuple | list):
            mass = {k: float(v[0]) for k, v in object_masses(r.view.map[:1], region[None], objects[None]).items()}
            row["object_share"] = mass["on_target"] / mass["on_objects"] if mass["on_objects"] > 0 else float("nan")
            row["object_chance"] = mass["area_target"] / mass["area_objects"] if mass["area_objects"] > 0 else float("nan")
        rows.append(row)
    return rows


def write_views_csv(results: Sequence[ModuleView], path: str | Path) -> Path:
    """Every module's map as CSV rows (`viz.CSV_FIELDS`), one header, modules in order."""
    out = Path(path)
    rows: list[list[str]] = []
    header: list[str] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, r in enumerate(x for x in results if x.view is not None):
            with view_to_csv(r.view, Path(tmp) / f"{i}.csv").open(newline="") as fh:  # type: ignore[arg-type]
                reader = csv.reader(fh)
                head = next(reader)
                header = header or head
                rows.extend(reader)
    if header is None:
        raise ValueError("No module produced a map, so there is nothing to write.")
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return out


__all__ = [
    "BASE_KEY",
    "ImageInput",
    "ModuleView",
    "VIEW_NAMES",
    "base_module",
    "check_view_args",
    "load_module_ref",
    "module_choices",
    "compare_runs",
    "comparison_image",
    "comparison_png_bytes",
    "focus_rows",
    "prediction_row",
    "model_input",
    "open_image",
    "overlay_tiles",
    "parse_scene_ref",
    "scene_image",
    "view_kwargs",
    "write_views_csv",
]


# --- finding modules -----------------------------------------------------------------------------
def _run_module(run_dir: Path, backbone: Backbone) -> SteeringMethod:
    from toast_core.runs.registry import read_run
    from toast_core.storage.checkpoints import load_module

    status = read_run(run_dir)
    if status.state != "done" or not status.checkpoint:
        raise ValueError(f"Run '{status.run_id}' is {status.state}; only done runs have a trained module.")
    method = load_module(run_dir / "module", backbone)
    method.label = status.name  # type: ignore[attr-defined]
    method.run_id = status.run_id  # type: ignore[attr-defined]
    return method


def load_module_ref(ref: str, backbone: Backbone, roots: Sequence[str | Path] = ()) -> SteeringMethod:
    """A module by reference: "base" (the plain backbone), "zoo:<task>/<entry>" (a shipped zoo module),
    a run id in one of the registry `roots`, a run folder, or a module file (stem, .json card or .safetensors). Loading always goes through
    `checkpoints.load_module` (safetensors, backbone hash checked)."""
    from toast_core.runs import RunError
    from toast_core.runs.registry import find_run
    from toast_core.storage.checkpoints import load_module, paths_for

    if ref == BASE_KEY:
        return base_module(backbone)
    from toast_core.training.zoo.catalog import ZOO_PREFIX, find_entry, load_entry

    if ref.startswith(ZOO_PREFIX):
        return load_entry(find_entry(ref, backbone), backbone)
    try:
        return _run_module(find_run(ref, list(roots)), backbone)
    except RunError:
        pass
    weights, card = paths_for(ref)
    if weights.is_file() and card.is_file():
        method = load_module(card, backbone)
        extra = (getattr(method, "card", {}) or {}).get("extra", {}) or {}
        method.label = str(extra.get("run_name") or card.stem)  # type: ignore[attr-defined]
        return method
    where = ", ".join(str(r) for r in roots) or "no registry"
    raise ValueError(f"No run or module '{ref}': not 'base', not 'zoo:<task>/<entry>', not a run id in {where}, "
                     "not a run folder or module file.")


def module_choices(backbone: Backbone, roots: Sequence[str | Path] = (), module_dirs: Sequence[str | Path] = ()) -> list[tuple[str, str]]:
    """(label, reference) of every module that fits `backbone`: the base, the shipped lecture zoo,
    done runs in the registries (first registry wins on a shared id), and loose module files (cards)
    in `module_dirs`."""
    from toast_core.runs.registry import list_runs
    from toast_core.storage.checkpoints import CheckpointError, read_card
    from toast_core.training.zoo.catalog import zoo_entries

    out: list[tuple[str, str]] = [("base backbone", BASE_KEY)]
    out += [(f"{e.label} [{e.method}, shipped]", e.key) for e in zoo_entries(backbone)]
    seen: set[str] = set()
    for root in roots:
        for r in reversed(list_runs(root)):
            if r.run_id in seen or r.state != "done" or not r.checkpoint:
                continue
            if (r.backbone or {}).get("weights_hash") != backbone.weights_hash:
                continue
            seen.add(r.run_id)
            acc = (r.final or {}).get("val_acc")
            label = f"{r.name} [{r.method}, {r.task}" + (f", val acc {acc:.2f}]" if isinstance(acc, int | float) else "]")
            out.append((label, r.run_id))
    for folder in module_dirs:
        for card_path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
            try:
                card = read_card(card_path)
            except CheckpointError:
                continue
            if (card.get("backbone") or {}).get("weights_hash") != backbone.weights_hash:
                continue
            out.append((f"{card_path.stem} [{card.get('method')}, {card.get('task')}, shipped]", str(card_path)))
    return out
