"""The Tuning Lab's helpers: a widget per method setting, submitting runs, what a run panel shows."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st
import torch

from toast_core.methods import method_class, method_names
from toast_core.runs import MODULE_STEM, RunConfig, RunError, RunManager, RunStatus
from toast_core.storage.checkpoints import CheckpointError, read_card

from .session import _cached_run_module, active_spec, runs_root, shared_backbone


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
        "a_init": tuple(lora.INITS),
    }
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


def submit_run(manager: RunManager, *, processes: int = 1, **config: Any) -> str:
    """Build and submit a RunConfig; ValueError / RunError carry messages for the user. With
    `processes` > 1 the run is launched over that many GPUs with torchrun (`runs.torchrun.submit`)."""
    run_config = RunConfig(**config)
    if processes > 1:
        from toast_core.runs import torchrun

        return torchrun.submit(manager, run_config, processes)
    return manager.submit(run_config)


@st.cache_data(show_spinner=False, max_entries=32)
def probe_image(config: dict[str, Any], size: int) -> np.ndarray | None:
    """The run's probe image (what its attention snapshots are of) as RGB (H, W, 3) uint8, or None when
    the run's data can no longer be read (a deleted folder, a config from another version)."""
    from toast_core.runs import load_task_data

    try:
        cfg = RunConfig.from_dict(config)
        train_set, val_set = load_task_data(cfg, size)
    except (ValueError, KeyError, TypeError, OSError):
        return None
    pool = val_set if val_set is not None and len(val_set) else train_set
    idx = int(config.get("probe_index", 0))
    return pool.images[idx].permute(1, 2, 0).numpy() if idx < len(pool) else None


@st.cache_data(show_spinner="Computing the final module's attention…", max_entries=32)
def _final_attention(backbone_key: tuple[str, str, str], run_id: str, stamp: float, config_json: str,
                     size: int) -> np.ndarray | None:
    from toast_core.training.train import cls_attention_grid

    probe = probe_image(json.loads(config_json), size)
    if probe is None:
        return None
    try:
        method = _cached_run_module(str(runs_root()), backbone_key, run_id, stamp)
    except (RunError, CheckpointError):
        return None
    return cls_attention_grid(method, torch.from_numpy(probe).permute(2, 0, 1)[None])[0]


def run_snapshot(status: RunStatus, size: int) -> tuple[np.ndarray, int] | None:
    """(CLS-attention grid, step) the run panel shows: the latest snapshot on record. A done run whose
    record lacks the final one (an imported bundle, a record from before runs took it at their end)
    gets it computed once from its saved module, when that module fits the loaded backbone."""
    stale = status.snapshot is None or status.snapshot_step != status.step
    if status.state == "done" and status.checkpoint and stale:
        if status.backbone.get("weights_hash") == shared_backbone().weights_hash:
            grid = _final_attention(active_spec().key, status.run_id, float(status.ended or 0.0),
                                    json.dumps(status.config, sort_keys=True), int(size))
            if grid is not None:
                return grid, status.step
    if status.snapshot is None:
        return None
    return status.snapshot, int(status.snapshot_step or 0)


def module_card(manager: RunManager, run_id: str) -> dict[str, Any] | None:
    """The saved module's card of a done run (trainable share, config), or None."""
    try:
        return read_card(manager.run_dir(run_id) / MODULE_STEM)
    except (CheckpointError, RunError):
        return None
