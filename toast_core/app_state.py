"""What the Streamlit pages share: the frozen backbone, the run registry, loaded modules, view helpers.

Pages stay thin (widgets and plots); everything they compute goes through here, and everything here
goes through the library (`attention`, `viz`, `runs`, `checkpoints`, `data.*`). Shared objects (the
backbone, the RunManager, loaded steering modules) live in `st.cache_resource` and are never mutated;
per-image results live in `st.cache_data`.

Environment:
- `TOAST_LAB_BACKBONE`: "embedded" (default), "fixture" (a tiny RANDOM-INIT ViT for tests, labelled
  as such everywhere), a timm model name, or "<timm arch>@<weights file>".
- `TOAST_LAB_RUNS_DIR`: the run registry folder (default `<repo>/runs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
import torch

from toast_core.attention import (
    AttentionView,
    ViewUnavailable,
    cls_maps,
    compute_view,
    difference_view,
    focus_metrics,
)
from toast_core.backbone import (
    EMBEDDED_NAME,
    REPO_ROOT,
    Backbone,
    BackboneError,
    load_backbone,
    tiny_fixture_backbone,
)
from toast_core.checkpoints import CheckpointError, read_card
from toast_core.data.base import to_model_input
from toast_core.data.images import load_image, resize_for_model
from toast_core.methods import build_method, method_class, method_names
from toast_core.methods.base import SteeringMethod
from toast_core.runs import MODULE_STEM, RunConfig, RunError, RunManager, RunStatus
from toast_core.viz import compose_grid, overlays, view_to_csv

BACKBONE_ENV = "TOAST_LAB_BACKBONE"
RUNS_DIR_ENV = "TOAST_LAB_RUNS_DIR"
FIXTURE = "fixture"
FIXTURE_LABEL = "test fixture, random weights"
#: upload limits (the server's own cap is `server.maxUploadSize` in .streamlit/config.toml)
MAX_IMAGE_MB = 20
MAX_ZIP_MB = 200
MAX_WEIGHTS_MB = 200
BASE_KEY = "base"
DATASETS_DIR = ".datasets"  # under the runs root; a dot folder, so the run registry skips it
BACKBONE_FILES_DIR = ".backbones"
FOCUS_IMAGES = 16  # built-in test images per run for the benchmark's focus column


# --- the backbone ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSpec:
    """Which backbone to load: kind "embedded" | "fixture" | "hub" | "file" (+ timm name, weights path)."""

    kind: str = EMBEDDED_NAME
    name: str = EMBEDDED_NAME
    weights: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.name, self.weights)

    def describe(self) -> str:
        if self.kind == FIXTURE:
            return f"tiny ViT ({FIXTURE_LABEL})"
        if self.kind == "file":
            return f"{self.name} from {Path(self.weights).name}"
        return self.name


def spec_from_env(value: str | None = None) -> BackboneSpec:
    """The default backbone: `TOAST_LAB_BACKBONE` (embedded when unset)."""
    raw = (os.environ.get(BACKBONE_ENV, "") if value is None else value).strip()
    if raw in ("", EMBEDDED_NAME):
        return BackboneSpec()
    if raw == FIXTURE:
        return BackboneSpec(FIXTURE, FIXTURE)
    if "@" in raw:
        arch, _, path = raw.partition("@")
        return BackboneSpec("file", arch.strip(), path.strip())
    return BackboneSpec("hub", raw)


def load_spec(spec: BackboneSpec) -> Backbone:
    """Load a backbone by spec; raises BackboneError with a message for the user."""
    if spec.kind == FIXTURE:
        return tiny_fixture_backbone(img_size=96, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    if spec.kind == "file":
        return load_backbone(spec.name, weights=spec.weights, device="auto")
    return load_backbone(spec.name, device="auto")


@st.cache_resource(show_spinner="Loading the frozen backbone…", max_entries=4)
def _cached_backbone(key: tuple[str, str, str]) -> Backbone:
    return load_spec(BackboneSpec(*key))


def shared_backbone(spec: BackboneSpec | None = None) -> Backbone:
    """The one frozen backbone per spec and process, shared read-only by every page and session."""
    return _cached_backbone((spec or active_spec()).key)


def active_spec() -> BackboneSpec:
    """This session's backbone choice (Backbones page), else the environment's default."""
    spec = st.session_state.get("backbone_spec")
    return spec if isinstance(spec, BackboneSpec) else spec_from_env()


def set_active_spec(spec: BackboneSpec) -> None:
    st.session_state["backbone_spec"] = spec
    for key in ("explorer_modules", "fewshot_result"):
        st.session_state.pop(key, None)


def is_fixture(backbone: Backbone) -> bool:
    return backbone.source == FIXTURE


def backbone_title(backbone: Backbone) -> str:
    """A one-line name that always says when the weights are random."""
    if is_fixture(backbone):
        return f"{backbone.name} — {FIXTURE_LABEL}"
    return backbone.name


def backbone_facts(backbone: Backbone) -> dict[str, str]:
    """Short facts for metric tiles and captions."""
    info = backbone.describe()
    return {
        "Backbone": backbone_title(backbone),
        "Parameters": f"{info['parameters'] / 1e6:.2f} M",
        "Input / patch": f"{info['img_size'][0]} px / {info['patch_size'][0]} px",
        "Blocks × heads": f"{info['depth']} × {info['num_heads']}",
        "Device": str(backbone.device),
        "Weights hash": backbone.weights_hash,
    }


def require_backbone() -> Backbone:
    """The session's backbone, or an error on the page and a stop (never a traceback)."""
    spec = active_spec()
    try:
        backbone = shared_backbone(spec)
    except BackboneError as exc:
        st.error(f"The backbone '{spec.describe()}' could not be loaded: {exc}")
        if spec != spec_from_env():
            st.info("Pick another backbone on the Backbones page.")
        st.stop()
    if is_fixture(backbone):
        st.warning(
            f"Backbone: **{FIXTURE_LABEL}** (TOAST_LAB_BACKBONE=fixture). Its attention and predictions "
            "mean nothing; it exists so the app can be tested without the pretrained checkpoint."
        )
    return backbone


# --- runs ----------------------------------------------------------------------------------------
def runs_root() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV) or REPO_ROOT / "runs")


@st.cache_resource(show_spinner=False, max_entries=4)
def _cached_manager(root: str, key: tuple[str, str, str]) -> RunManager:
    return RunManager(root, _cached_backbone(key))


def run_manager(spec: BackboneSpec | None = None) -> RunManager:
    """The process-wide RunManager for this registry folder and backbone (its workers live with it)."""
    return _cached_manager(str(runs_root()), (spec or active_spec()).key)


def finished_runs(manager: RunManager, backbone: Backbone) -> list[RunStatus]:
    """Done runs whose module belongs to this backbone (same weights hash), newest first."""
    runs = [
        r for r in manager.list(history=False)
        if r.state == "done" and r.checkpoint and r.backbone.get("weights_hash") == backbone.weights_hash
    ]
    return sorted(runs, key=lambda r: r.created, reverse=True)


def run_label(status: RunStatus) -> str:
    acc = status.final.get("val_acc")
    return f"{status.name}" + (f" (val acc {acc:.2f})" if isinstance(acc, int | float) else "")


@st.cache_resource(show_spinner="Loading a steering module…", max_entries=64)
def _cached_run_module(root: str, key: tuple[str, str, str], run_id: str, stamp: float) -> SteeringMethod:
    manager = _cached_manager(root, key)
    method = manager.load_run_module(run_id)
    method.label = manager.status(run_id, history=False).name  # type: ignore[attr-defined]
    return method


def run_module(run_id: str) -> SteeringMethod:
    """A done run's module on the shared backbone (loaded once; `stamp` re-loads a re-trained run)."""
    status = run_manager().status(run_id, history=False)
    return _cached_run_module(str(runs_root()), active_spec().key, run_id, float(status.ended or 0.0))


def base_module(backbone: Backbone) -> SteeringMethod:
    """The unsteered backbone as a module: a linear readout that reuses the backbone's own head when it
    has one (the embedded backbone's pretraining head, with its class names)."""
    return _cached_base((active_spec().key), backbone.weights_hash)


@st.cache_resource(show_spinner=False, max_entries=4)
def _cached_base(key: tuple[str, str, str], weights_hash: str) -> SteeringMethod:
    """One shared base module per backbone (the library's `compare.base_module`, cached for the app)."""
    from toast_core.compare import base_module

    return base_module(_cached_backbone(key))


SHIPPED_PREFIX = "shipped:"


def shipped_modules(backbone: Backbone) -> dict[str, str]:
    """Steering modules shipped in checkpoints/ for this backbone (e.g. the pre-tuned TOAST): key -> label."""
    from toast_core.backbone import CHECKPOINT_DIR

    out: dict[str, str] = {}
    for card_path in sorted(CHECKPOINT_DIR.glob("*.json")):
        try:
            card = read_card(card_path)
        except CheckpointError:
            continue  # the backbone's own card and anything that is not a module card
        if (card.get("backbone") or {}).get("weights_hash") == backbone.weights_hash:
            out[SHIPPED_PREFIX + card_path.stem] = f"{card['method']} (shipped: {card_path.stem})"
    return out


@st.cache_resource(show_spinner="Loading a shipped module…", max_entries=8)
def _cached_shipped(key: tuple[str, str, str], stem: str) -> SteeringMethod:
    from toast_core.backbone import CHECKPOINT_DIR
    from toast_core.checkpoints import load_module

    method = load_module(CHECKPOINT_DIR / stem, _cached_backbone(key))
    method.label = f"{method.name} (shipped: {stem})"  # type: ignore[attr-defined]
    return method


def module_for(key: str, backbone: Backbone) -> SteeringMethod:
    """A module by page key: the base backbone, a shipped checkpoint, or a done run."""
    if key == BASE_KEY:
        return base_module(backbone)
    if key.startswith(SHIPPED_PREFIX):
        return _cached_shipped(active_spec().key, key.removeprefix(SHIPPED_PREFIX))
    return run_module(key)


def module_stamp(key: str) -> float:
    """Changes when the module behind a key changes (a re-trained run), so cached maps refresh."""
    if key == BASE_KEY or key.startswith(SHIPPED_PREFIX):
        return 0.0
    return float(run_manager().status(key, history=False).ended or 0.0)


# --- images --------------------------------------------------------------------------------------
@dataclass
class ImageChoice:
    """The image a page shows: original RGB (H, W, 3) uint8, optional ground-truth mask (H, W) bool."""

    rgb: np.ndarray
    name: str
    mask: np.ndarray | None = None
    true_label: str | None = None

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.rgb.tobytes() + str(self.rgb.shape).encode()).hexdigest()[:16]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


@st.cache_data(show_spinner=False, max_entries=64)
def scene_image(task: str, split: str, index: int, size: int = 96) -> ImageChoice:
    """One built-in scene (the same pure function of (task, split, index) that training uses)."""
    from toast_core.data.scenes import TASKS, task_scene

    spec = TASKS[task]
    label = index % len(spec.classes)
    scene = task_scene(task, 0, split, index, label, size)
    return ImageChoice(scene.image, f"{task}/{split}/{index}", scene.index_map == 1, spec.classes[label])


def decode_upload(data: bytes, name: str = "upload") -> ImageChoice:
    """An uploaded image, decoded safely; raises ImageInputError with a user-facing message."""
    rgb = load_image(data, max_bytes=MAX_IMAGE_MB * 1024 * 1024)
    return ImageChoice(rgb, name)


def model_input(backbone: Backbone, image: ImageChoice) -> torch.Tensor:
    """The (1, 3, H, W) normalised input the backbone expects (the whole image, stretched)."""
    layout = backbone.layout
    small = resize_for_model(image.rgb, layout.img_size)
    return to_model_input(small[None], layout.mean, layout.std)


# --- views ---------------------------------------------------------------------------------------
TOAST_PASSES = "toast_passes"  # one page view = the library's toast_pass1 and toast_pass2, side by side
#: UI label -> attention view name (toast_core.attention.VIEWS, plus TOAST_PASSES)
VIEW_LABELS: dict[str, str] = {
    "CLS attention": "cls",
    "Attention rollout": "rollout",
    "Gradient rollout (FORT)": "grad_rollout",
    "Grad-CAM": "gradcam",
    "TOAST pass 1 vs pass 2": TOAST_PASSES,
    "TOAST selection mask": "selection",
}
LAYERED_VIEWS = frozenset({"cls", TOAST_PASSES})
HEAD_VIEWS = frozenset({"cls", TOAST_PASSES})
GRADIENT_VIEWS = frozenset({"grad_rollout", "gradcam"})
TOAST_VIEWS = frozenset({TOAST_PASSES, "selection"})


def view_kwargs(view: str, layer: int, head: str | int) -> dict[str, Any]:
    """The keyword options a view takes from the page's layer / head widgets."""
    out: dict[str, Any] = {}
    if view in LAYERED_VIEWS:
        out["layer"] = int(layer)
    if view in HEAD_VIEWS:
        out["head"] = head
    return out


@dataclass
class ModuleView:
    """One module's view of the image, or why there is none."""

    key: str
    label: str
    view: AttentionView | None
    error: str | None = None
    class_names: list[str] | None = None

    def caption(self) -> str:
        if self.view is None:
            return f"{self.label}: {self.error}"
        return prediction_text(self.view, self.class_names, self.key == BASE_KEY)


def prediction_text(view: AttentionView, class_names: Sequence[str] | None, is_base: bool = False) -> str:
    """"predicted: <label> (<confidence>)", with a warning when the head is untrained."""
    k = int(view.pred[0])
    label = class_names[k] if class_names and 0 <= k < len(class_names) else f"class {k}"
    text = f"{'pretraining head' if is_base else 'predicted'}: {label} ({float(view.conf[0]):.2f})"
    if is_base and not class_names:
        text = "no trained head: prediction meaningless"
    return text


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
    kwargs = view_kwargs(view, layer, head)
    out: list[ModuleView] = []
    for key in keys:
        try:
            method = module_for(key, backbone)
        except (RunError, CheckpointError) as exc:
            out.append(ModuleView(key, key, None, f"could not be loaded: {exc}"))
            continue
        label = str(getattr(method, "label", method.name))
        names = getattr(method, "class_names", None)
        reason = _unavailable(key, method, view)
        if reason is not None:
            out.append(ModuleView(key, label, None, reason, names))
            continue
        parts = (("toast_pass1", " · pass 1"), ("toast_pass2", " · pass 2")) if view == TOAST_PASSES else ((view, ""),)
        for name, suffix in parts:
            try:
                v = _cached_view(active_spec().key, key, module_stamp(key), image.digest, name,
                                 json.dumps(kwargs), method, x)
            except ViewUnavailable as exc:
                out.append(ModuleView(key, label + suffix, None, str(exc), names))
                continue
            if view == TOAST_PASSES:
                v = dataclasses.replace(v, name=TOAST_PASSES, method=v.method + suffix)
            out.append(ModuleView(key, label + suffix, v, None, names))
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


def focus_table(
    views: Sequence[ModuleView], region: Any, image_size: tuple[int, int]
) -> list[dict[str, Any]]:
    """Focus scores of each module's map against a mask or a box (x0, y0, x1, y1) in image pixels."""
    rows = []
    for mv in views:
        if mv.view is None:
            continue
        m = focus_metrics(mv.view, region, image_size)
        rows.append({
            "module": mv.label,
            "focus share": float(m["focus_share"][0] if np.ndim(m["focus_share"]) else m["focus_share"]),
            "area share (chance)": float(m["area_share"]),
            "focus ratio": float(m["focus_ratio"][0] if np.ndim(m["focus_ratio"]) else m["focus_ratio"]),
            "peak inside": bool(m["pointing_game"][0] if np.ndim(m["pointing_game"]) else m["pointing_game"]),
            "entropy": float(m["entropy"][0] if np.ndim(m["entropy"]) else m["entropy"]),
        })
    return rows


def overlay_tiles(image: ImageChoice, views: Sequence[ModuleView], alpha: float, cmap: str) -> list[np.ndarray]:
    """Overlays of every available map on the original image, one shared normalisation."""
    maps = [mv.view for mv in views if mv.view is not None]
    return overlays(image.rgb, maps, alpha=alpha, cmap=cmap) if maps else []


def comparison_png_bytes(image: ImageChoice, views: Sequence[ModuleView], alpha: float, cmap: str) -> bytes:
    """The image and each module's overlay, labelled with module and prediction, as PNG bytes."""
    usable = [mv for mv in views if mv.view is not None]
    tiles = [image.rgb, *overlay_tiles(image, usable, alpha, cmap)]
    labels = ["image", *(f"{mv.label}: {mv.caption()}" for mv in usable)]
    buf = io.BytesIO()
    compose_grid(tiles, labels).save(buf, format="PNG")
    return buf.getvalue()


def views_csv_bytes(views: Sequence[ModuleView]) -> bytes:
    """Every map as CSV rows (view, method, layer, head, image, row, col, value), one header."""
    chunks: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, mv in enumerate(v for v in views if v.view is not None):
            path = view_to_csv(mv.view, Path(tmp) / f"{i}.csv")  # type: ignore[arg-type]
            lines = path.read_text().splitlines(keepends=True)
            chunks.extend(lines if not chunks else lines[1:])
    return "".join(chunks).encode()


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


def preset(key: str) -> Preset | None:
    return next((p for p in PRESETS if p.key == key), None)


# --- tuning-lab helpers --------------------------------------------------------------------------
@dataclass
class FieldSpec:
    """One setting of a method's config, as a page widget should offer it."""

    name: str
    kind: str  # "bool" | "int" | "float" | "choice" | "tuple" | "optional_int" | "optional_float" | "text"
    default: Any
    choices: tuple[str, ...] = ()
    help: str = ""


def _choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of string settings, read from the method modules that define them."""
    from toast_core.methods import fort, lora, toast, visual_prompt

    out: dict[str, tuple[str, ...]] = {
        "kind": tuple(visual_prompt.KINDS),
        "init": tuple(toast.INIT_MODES),
        "head_agg": tuple(fort.HEAD_AGGS),
        "prompt_weights": tuple(fort.PROMPT_WEIGHTS),
        "target_mass": tuple(fort.TARGET_MASS),
        "importance_head": tuple(fort.IMPORTANCE_HEADS),
    }
    a_init = getattr(lora, "A_INITS", None)
    out["a_init"] = tuple(a_init) if a_init else ("kaiming", "normal")
    return out


def method_fields(name: str) -> list[FieldSpec]:
    """The method's settings (defaults = its config dataclass, i.e. methods.md), seed excluded."""
    cls = method_class(name).config_cls
    defaults = cls()
    choices = _choices()
    doc = (cls.__doc__ or "").strip()
    specs = []
    for f in dataclasses.fields(cls):
        if f.name == "seed":
            continue
        value = getattr(defaults, f.name)
        t = str(f.type)
        if f.name in choices and isinstance(value, str):
            spec = FieldSpec(f.name, "choice", value, choices[f.name])
        elif "bool" in t:
            spec = FieldSpec(f.name, "bool", bool(value))
        elif "tuple" in t:
            spec = FieldSpec(f.name, "tuple", value)
        elif t.startswith("int") and "None" not in t:
            spec = FieldSpec(f.name, "int", int(value))
        elif t.startswith("float") and "None" not in t:
            spec = FieldSpec(f.name, "float", float(value))
        elif "int" in t and "None" in t:
            spec = FieldSpec(f.name, "optional_int", value)
        elif "float" in t and "None" in t:
            spec = FieldSpec(f.name, "optional_float", value)
        else:
            spec = FieldSpec(f.name, "text", value)
        spec.help = doc
        specs.append(spec)
    return specs


def parse_tuple(text: str, default: tuple | None) -> tuple | None:
    """"q, v" -> ("q", "v"); "0, 1" -> (0, 1); empty -> None when the default is None, else ()."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        return None if default is None else ()
    return tuple(int(p) if p.lstrip("-").isdigit() else p for p in parts)


def describe_method(name: str) -> str:
    """One line on what the method is: its module's summary line, plus the class's own when it is a
    variant defined in the same module (e.g. TOAST-Lite next to TOAST)."""
    import sys

    cls = method_class(name)
    first = lambda doc: (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""  # noqa: E731
    module_line = first(getattr(sys.modules.get(cls.__module__), "__doc__", ""))
    class_line = first(cls.__doc__)
    siblings = [n for n in method_names() if method_class(n).__module__ == cls.__module__]
    if class_line and (not module_line or len(siblings) > 1):
        return f"{module_line} {class_line}".strip()
    return module_line or class_line


def needs_episode_prompts(name: str) -> bool:
    """FORT methods need position prompts prepared on their support set before training."""
    from toast_core.methods.fort import FortMixin

    return issubclass(method_class(name), FortMixin)


def tunable_methods() -> list[str]:
    return method_names()


def import_dataset_zip(data: bytes, name: str) -> Path:
    """Extract an uploaded zip of class folders under the runs root (content-addressed, so the same
    zip uploaded twice is imported once) and check it reads as a dataset. Raises ZipImportError /
    ImageFolderError with messages for the user."""
    from toast_core.data.folder import load_image_folder
    from toast_core.data.zip_import import import_zip

    if len(data) > MAX_ZIP_MB * 1024 * 1024:
        from toast_core.data.zip_import import ZipImportError

        raise ZipImportError(f"The zip is {len(data) / 2**20:.1f} MB, over the {MAX_ZIP_MB} MB limit.")
    digest = hashlib.sha256(data).hexdigest()[:12]
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(name).stem)[:40] or "dataset"
    dest = runs_root() / DATASETS_DIR / f"{stem}-{digest}"
    if not (dest.is_dir() and any(dest.iterdir())):
        dest.parent.mkdir(parents=True, exist_ok=True)
        import_zip(data, dest, max_total_bytes=MAX_ZIP_MB * 1024 * 1024)
    root = dest / "train" if (dest / "train").is_dir() else dest
    load_image_folder(root, size=32, max_images_per_class=2)  # fails fast on empty classes
    return dest


@st.cache_data(show_spinner=False, max_entries=16)
def dataset_summary(path: str, size: int) -> dict[str, Any]:
    """Classes, counts and skipped files of an imported folder (read once per folder)."""
    from toast_core.data.folder import load_image_folder

    root = Path(path)
    root = root / "train" if (root / "train").is_dir() else root
    data = load_image_folder(root, size=size)
    return {"classes": data.class_names, "counts": data.meta["counts"], "skipped": data.meta["skipped"],
            "images": len(data)}


def submit_run(manager: RunManager, **config: Any) -> str:
    """Build and submit a RunConfig; ValueError / RunError carry messages for the user."""
    return manager.submit(RunConfig(**config))


@st.cache_data(show_spinner=False, max_entries=32)
def probe_image(config: dict[str, Any], size: int) -> np.ndarray | None:
    """The run's probe image (what its attention snapshots are of), as RGB, for built-in tasks."""
    from toast_core.runs import load_task_data, parse_task

    try:
        ref = parse_task(config["task"])
        if ref.kind != "builtin":
            return None
        cfg = RunConfig.from_dict(config)
        train_set, val_set = load_task_data(cfg, size)
    except (ValueError, KeyError, OSError):
        return None
    pool = val_set if val_set is not None and len(val_set) else train_set
    idx = int(config.get("probe_index", 0))
    return pool.images[idx].permute(1, 2, 0).numpy() if idx < len(pool) else None


def module_card(manager: RunManager, run_id: str) -> dict[str, Any] | None:
    """The saved module's card of a done run (trainable share, config), or None."""
    try:
        return read_card(manager.run_dir(run_id) / MODULE_STEM)
    except (CheckpointError, RunError):
        return None


# --- benchmark -----------------------------------------------------------------------------------
@st.cache_data(show_spinner="Measuring focus on built-in test scenes…", max_entries=256)
def run_focus(backbone_key: tuple[str, str, str], run_id: str, stamp: float, task: str) -> float | None:
    """Mean focus ratio (last-layer CLS attention on the deciding object / its area share) over
    FOCUS_IMAGES built-in test scenes; None for tasks without masks."""
    from toast_core.data.scenes import TASKS

    base_task = task.rsplit(":", 1)[-1] if task.startswith("episode:") else task
    if base_task not in TASKS:
        return None
    backbone = _cached_backbone(backbone_key)
    method = _cached_run_module(str(runs_root()), backbone_key, run_id, stamp)
    size = int(backbone.layout.img_size[0])
    ratios = []
    for i in range(FOCUS_IMAGES):
        img = scene_image(base_task, "test", i, size)
        v = compute_view("cls", method, model_input(backbone, img), layer=-1, head="mean")
        ratios.append(float(focus_metrics(v, img.mask, img.size)["focus_ratio"][0]))
    return float(np.nanmean(ratios))


def benchmark_rows(manager: RunManager, backbone: Backbone, with_focus: bool = True) -> list[dict[str, Any]]:
    """One row per run: method, task, state, accuracy, trainable %, step time, focus."""
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
            "steps": r.step,
            "device": r.device,
            "backbone": r.backbone.get("name", ""),
            "this backbone": own,
        })
    return rows


# --- backbones page --------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def save_weights_upload(data: bytes, name: str) -> Path:
    """Store an uploaded weights file under the runs root (content-addressed) so timm can read it by
    path; nothing is unpickled here (the backbone loader reads safetensors or weights_only tensors)."""
    suffix = Path(name).suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(f"'{name}' is not a weights file: use {', '.join(WEIGHT_SUFFIXES)}.")
    if len(data) > MAX_WEIGHTS_MB * 1024 * 1024:
        raise BackboneError(f"'{name}' is {len(data) / 2**20:.0f} MB, over the {MAX_WEIGHTS_MB} MB upload limit; "
                            "give its path on this machine instead.")
    digest = hashlib.sha256(data).hexdigest()[:16]
    folder = runs_root() / BACKBONE_FILES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}{suffix}"
    if not path.is_file():
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def try_backbone(spec: BackboneSpec) -> tuple[Backbone | None, str | None]:
    """Load (and cache) a backbone; (backbone, None) or (None, the reason it failed)."""
    try:
        return shared_backbone(spec), None
    except BackboneError as exc:
        return None, str(exc)
    except (OSError, RuntimeError, ValueError) as exc:  # anything else the loader could not phrase
        return None, f"{type(exc).__name__}: {exc}"


def active_runs(spec: BackboneSpec | None = None) -> list[RunStatus]:
    """Queued or running runs of this session's manager (switching backbone would orphan them)."""
    try:
        manager = run_manager(spec)
    except BackboneError:
        return []
    return [r for r in manager.list(history=False) if r.state in ("queued", "running")]


# --- few-shot page -------------------------------------------------------------------------------
#: base tuning methods that FORT composes with, and a starting learning rate for each (editable)
FORT_BASES: dict[str, float] = {"full": 1e-4, "lora": 1e-3, "bitfit": 1e-3}


@st.cache_data(show_spinner="Drawing the episode…", max_entries=16)
def fewshot_episode(source: str, n_way: int, k_shot: int, n_query: int, index: int, size: int) -> Any:
    """One N-way K-shot episode from a built-in task (test split, with masks) or an imported folder."""
    from toast_core.data.episodes import sample_episode
    from toast_core.fewshot import task_pool

    if source.startswith("folder:"):
        from toast_core.data.folder import load_image_folder

        root = Path(source.removeprefix("folder:"))
        pool = load_image_folder(root / "train" if (root / "train").is_dir() else root, size=size)
    else:
        pool = task_pool(source, per_class=k_shot + n_query, seed=0, split="test")
    return sample_episode(pool, n_way, k_shot, n_query, (0, index))


def _reference(backbone: Backbone, n_way: int) -> SteeringMethod:
    """The frozen forward with an n_way head: what FORT's importance is computed on before tuning."""
    return build_method("linear", backbone, n_way)


@st.cache_data(show_spinner="Computing position prompts…", max_entries=64)
def _importance(backbone_key: tuple[str, str, str], episode_key: str, lam: float, head_agg: str,
                keep_top: float, _episode: Any) -> np.ndarray:
    from toast_core.methods.fort import position_importance
    from toast_core.train import prepare_batch

    backbone = _cached_backbone(backbone_key)
    ref = _reference(backbone, len(_episode.support.class_names))
    x = prepare_batch(ref, _episode.support.images)
    imp = position_importance(ref, x, _episode.support.labels, lam=lam, head_agg=head_agg, keep_top=keep_top)
    return imp.detach().cpu().numpy()


def position_prompts(backbone: Backbone, episode: Any, episode_key: str, lam: float, prompt_patches: int,
                     head_agg: str, weights: str, keep_top: float = 0.1) -> dict[str, Any]:
    """FORT's importance (S, gh, gw) and position prompts (S, gh, gw) of every support image, and the
    share of each prompt's mass on the deciding object when the data has masks."""
    from toast_core.attention import focus_share
    from toast_core.methods.fort import prompt_targets

    imp = _importance(active_spec().key, episode_key, float(lam), head_agg, float(keep_top), episode)
    targets = prompt_targets(torch.from_numpy(imp), int(prompt_patches), weights).reshape(imp.shape).numpy()
    masks = episode.support.masks
    on_object = None if masks is None else np.atleast_1d(focus_share(targets, masks)).astype(float)
    return {"importance": imp, "prompts": targets, "on_object": on_object}


@dataclass
class EpisodeRun:
    """One tuned module on one episode: query accuracy/focus and its query attention."""

    label: str
    method: str
    acc: float
    focus: float | None
    area: float | None
    seconds: float
    view: AttentionView  # last-layer head-mean CLS attention of every query image
    prompt_on_object: float | None = None


def tune_on_episode(backbone: Backbone, episode: Any, base: str, steps: int, lr: float, fort: dict[str, Any],
                    seed: int = 0) -> list[EpisodeRun]:
    """Fine-tune `base` and `fort_<base>` on the support set exactly as `fewshot.run_episode` does
    (ridge head init, shared importance, batch = n_way, constant lr) and keep the tuned modules' query
    attention. Uses fewshot's episode cache so both runs share features, head and importance."""
    import time as _time

    from toast_core import fewshot
    from toast_core.attention import cls_view
    from toast_core.methods.fort import FortMixin, ridge_head, support_features
    from toast_core.train import TrainConfig, prepare_batch, train

    n_way = len(episode.support.class_names)
    config = fewshot.FewShotConfig(n_way=n_way, k_shot=max(1, len(episode.support) // n_way),
                                   n_query=max(1, len(episode.query) // n_way), episodes=1, steps=steps,
                                   seed=seed, device="auto")
    cache = fewshot._EpisodeCache(backbone, episode, config)
    out = []
    for label, name, cfg in ((f"{base}", base, {}), (f"{base} + FORT", f"fort_{base}", dict(fort))):
        t0 = _time.perf_counter()
        method = build_method(name, backbone, n_way, cfg)
        shared = cache.same_start(method)
        w, b = cache.head if shared else ridge_head(support_features(method, cache.x), cache.labels, n_way,
                                                    config.ridge_lam)
        fewshot._set_head(method, w, b)
        on_object = fewshot._prepare_fort(method, cache, shared) if isinstance(method, FortMixin) else None
        tc = TrainConfig(steps=steps, batch_size=n_way, lr=lr, weight_decay=config.weight_decay, min_lr=1.0,
                         grad_clip=None, seed=seed)
        if steps > 0:
            train(method, episode.support, None, tc)
        acc, focus, area = fewshot.score_queries(method, episode.query)
        view = cls_view(method, prepare_batch(method, episode.query.images), layer=-1, head="mean")
        out.append(EpisodeRun(label, name, acc, focus, area, _time.perf_counter() - t0, view, on_object))
    return out
