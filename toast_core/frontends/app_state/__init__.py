"""What the Streamlit pages share, one module per page: `from toast_core.frontends import app_state as S`.

Pages stay thin (widgets and plots); everything they compute goes through here, and everything here
goes through the library (`compare`, `attention`, `viz`, `runs`, `checkpoints`, `data.*`). Shared
objects (the backbone, the RunManager, loaded steering modules) live in `st.cache_resource` and are
never mutated; per-image results live in `st.cache_data`.

- `session`: the backbone (and its warm-up at server start), the run registry, loaded modules;
- `explorer`: images, every module's view of one image (through `toast_core.views.compare`), presets;
- `tuning`: method settings as widgets, submitting runs, what a run panel shows;
- `datasets`: uploaded zips of class folders (Tuning Lab, Few-shot);
- `benchmark`, `backbones`, `fewshot`: those pages' helpers.

Environment:
- `TOAST_LAB_BACKBONE`: "embedded" (default), "fixture" (a tiny RANDOM-INIT ViT for tests, labelled
  as such everywhere), a timm model name, or "<timm arch>@<weights file>".
- `TOAST_LAB_RUNS_DIR`: the run registry folder (default `<repo>/runs`).
"""

from __future__ import annotations

from toast_core.core.backbone import BackboneError

from .backbones import WEIGHT_SUFFIXES, active_runs, save_weights_upload, try_backbone
from .benchmark import FAITH_STEPS, FOCUS_IMAGES, benchmark_rows, run_faithfulness, run_focus, zoo_table
from .datasets import dataset_summary, import_dataset_zip
from .explorer import (
    GRADIENT_VIEWS,
    HEAD_VIEWS,
    LAYERED_VIEWS,
    PRESETS,
    TOAST_PASSES,
    TOAST_VIEWS,
    VIEW_LABELS,
    ImageChoice,
    ModuleView,
    Preset,
    cls_grid,
    decode_upload,
    difference,
    focus_table,
    model_input,
    module_views,
    preset,
    presets,
    scene_image,
    views_csv_bytes,
)
from .faithfulness import AUC_COLUMNS, DELETION_MODES, faithfulness_table, module_curves
from .fewshot import FORT_BASES, fewshot_episode, position_prompts
from .session import (
    BACKBONE_ENV,
    BACKBONE_FILES_DIR,
    BASE_KEY,
    DATASETS_DIR,
    FIXTURE,
    FIXTURE_LABEL,
    MAX_IMAGE_MB,
    MAX_WEIGHTS_MB,
    MAX_ZIP_MB,
    RUNS_DIR_ENV,
    SHIPPED_PREFIX,
    BackboneSpec,
    active_spec,
    backbone_facts,
    backbone_title,
    base_module,
    expected_train_s,
    finished_runs,
    is_fixture,
    load_spec,
    module_for,
    module_stamp,
    require_backbone,
    run_label,
    run_manager,
    run_module,
    runs_root,
    set_active_spec,
    shared_backbone,
    shipped_modules,
    spec_from_env,
    warm_up,
    zoo_first_view,
    zoo_modules,
)
from .tuning import (
    FieldSpec,
    describe_method,
    method_fields,
    module_card,
    needs_episode_prompts,
    parse_tuple,
    probe_image,
    run_snapshot,
    submit_run,
)

__all__ = [
    "presets",
    "AUC_COLUMNS", "DELETION_MODES", "FAITH_STEPS", "faithfulness_table", "module_curves", "run_faithfulness",
    "expected_train_s",
    "zoo_table",
    "zoo_first_view",
    "zoo_modules",
    "BACKBONE_ENV", "BACKBONE_FILES_DIR", "BASE_KEY", "BackboneError", "BackboneSpec", "DATASETS_DIR",
    "FIXTURE", "FIXTURE_LABEL", "FOCUS_IMAGES", "FORT_BASES", "FieldSpec", "GRADIENT_VIEWS", "HEAD_VIEWS",
    "ImageChoice", "LAYERED_VIEWS", "MAX_IMAGE_MB", "MAX_WEIGHTS_MB", "MAX_ZIP_MB", "ModuleView", "PRESETS",
    "Preset", "RUNS_DIR_ENV", "SHIPPED_PREFIX", "TOAST_PASSES", "TOAST_VIEWS", "VIEW_LABELS",
    "WEIGHT_SUFFIXES", "active_runs", "active_spec", "backbone_facts", "backbone_title", "base_module",
    "benchmark_rows", "cls_grid", "dataset_summary", "decode_upload",
    "describe_method", "difference", "fewshot_episode", "finished_runs", "focus_table",
    "import_dataset_zip", "is_fixture", "load_spec", "method_fields", "model_input", "module_card",
    "module_for", "module_stamp", "module_views", "needs_episode_prompts", "parse_tuple",
    "position_prompts", "preset", "probe_image", "require_backbone", "run_focus", "run_label",
    "run_manager", "run_module", "run_snapshot", "runs_root", "save_weights_upload", "scene_image",
    "set_active_spec", "shared_backbone", "shipped_modules", "spec_from_env", "submit_run",
    "try_backbone", "views_csv_bytes", "warm_up",
]
