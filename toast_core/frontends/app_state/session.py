"""What every page shares: the frozen backbone (and its warm-up), the run registry, loaded modules.

Shared objects live in `st.cache_resource` and are never mutated, so every session and page reads the
same backbone, RunManager and modules; the run registry is the folder `TOAST_LAB_RUNS_DIR` names.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from toast_core.core.backbone import (
    EMBEDDED_NAME,
    REPO_ROOT,
    Backbone,
    BackboneError,
    load_backbone,
    tiny_fixture_backbone,
)
from toast_core.methods.base import SteeringMethod
from toast_core.runs import RunManager, RunStatus
from toast_core.storage.checkpoints import CheckpointError, read_card

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


def warm_up() -> None:
    """Load the default backbone into the shared cache ahead of the first page (app.py runs this in a
    thread at server start). A failure is left for the page to report: it loads the backbone itself
    and shows the error; this only logs it."""
    # the cache looks for a session on this thread; there is none, and that is expected here
    expected = f"Thread '{threading.current_thread().name}': missing ScriptRunContext"
    logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").addFilter(
        lambda record: expected not in record.getMessage()
    )
    try:
        _cached_backbone(spec_from_env().key)
    except Exception as exc:  # noqa: BLE001 - any failure is the page's to report, with its own message
        logging.getLogger(__name__).info("backbone warm-up failed (the page will report it): %s", exc)


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


# --- runs and their modules -----------------------------------------------------------------------
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
    from toast_core.views.compare import base_module

    return base_module(_cached_backbone(key))


SHIPPED_PREFIX = "shipped:"


def shipped_modules(backbone: Backbone) -> dict[str, str]:
    """Steering modules shipped in checkpoints/ for this backbone (e.g. the pre-tuned TOAST): key -> label."""
    from toast_core.core.backbone import CHECKPOINT_DIR

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
    from toast_core.core.backbone import CHECKPOINT_DIR
    from toast_core.storage.checkpoints import load_module

    method = load_module(CHECKPOINT_DIR / stem, _cached_backbone(key))
    method.label = f"{method.name} (shipped: {stem})"  # type: ignore[attr-defined]
    return method


def zoo_modules(backbone: Backbone, task: str | None = None) -> dict[str, str]:
    """The lecture zoo's shipped modules for this backbone (all tasks, or one): key -> label."""
    from toast_core.training.zoo.catalog import zoo_entries

    return {e.key: e.label for e in zoo_entries(backbone, task=task)}


def expected_train_s(task: str, method: str, steps: int, batch_size: int) -> float | None:
    """Expected training seconds of a recipe run (from the zoo build's measurement), or None."""
    from toast_core.training.zoo.catalog import expected_train_s as measured

    return measured(task, method, steps, batch_size)


def zoo_first_view(backbone: Backbone, task: str) -> list[str]:
    """Keys of the zoo modules a first view of `task` compares (>= 6 when the zoo is shipped)."""
    from toast_core.training.zoo.catalog import first_view

    return [e.key for e in first_view(backbone, task)]


@st.cache_resource(show_spinner="Loading a zoo module…", max_entries=64)
def _cached_zoo(key: tuple[str, str, str], zoo_key: str) -> SteeringMethod:
    from toast_core.training.zoo.catalog import find_entry, load_entry

    backbone = _cached_backbone(key)
    return load_entry(find_entry(zoo_key, backbone), backbone)


def module_for(key: str, backbone: Backbone) -> SteeringMethod:
    """A module by page key: the base backbone, a shipped checkpoint, a zoo module, or a done run."""
    from toast_core.training.zoo.catalog import ZOO_PREFIX

    if key == BASE_KEY:
        return base_module(backbone)
    if key.startswith(SHIPPED_PREFIX):
        return _cached_shipped(active_spec().key, key.removeprefix(SHIPPED_PREFIX))
    if key.startswith(ZOO_PREFIX):
        return _cached_zoo(active_spec().key, key)
    return run_module(key)


def module_stamp(key: str) -> float:
    """Changes when the module behind a key changes (a re-trained run), so cached maps refresh."""
    from toast_core.training.zoo.catalog import ZOO_PREFIX

    if key == BASE_KEY or key.startswith((SHIPPED_PREFIX, ZOO_PREFIX)):
        return 0.0
    return float(run_manager().status(key, history=False).ended or 0.0)
