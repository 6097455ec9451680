"""The Few-shot page's helpers: drawing an episode and FORT's position prompts on its support set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
import torch

from toast_core.core.backbone import Backbone
from toast_core.methods import build_method
from toast_core.methods.base import SteeringMethod

from .session import _cached_backbone, active_spec

#: base tuning methods that FORT composes with, and a starting learning rate for each (editable)
FORT_BASES: dict[str, float] = {"full": 1e-4, "lora": 1e-3, "bitfit": 1e-3}


@st.cache_data(show_spinner="Drawing the episode…", max_entries=16)
def fewshot_episode(source: str, n_way: int, k_shot: int, n_query: int, index: int, size: int) -> Any:
    """One N-way K-shot episode from a built-in task (test split, with masks) or an imported folder."""
    from toast_core.data.episodes import sample_episode
    from toast_core.training.fewshot import task_pool

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
    from toast_core.training.train import prepare_batch

    backbone = _cached_backbone(backbone_key)
    ref = _reference(backbone, len(_episode.support.class_names))
    x = prepare_batch(ref, _episode.support.images)
    imp = position_importance(ref, x, _episode.support.labels, lam=lam, head_agg=head_agg, keep_top=keep_top)
    return imp.detach().cpu().numpy()


def position_prompts(backbone: Backbone, episode: Any, episode_key: str, lam: float, prompt_patches: int,
                     head_agg: str, weights: str, keep_top: float = 0.1) -> dict[str, Any]:
    """FORT's importance (S, gh, gw) and position prompts (S, gh, gw) of every support image, and the
    share of each prompt's mass on the deciding object when the data has masks."""
    from toast_core.methods.fort import prompt_targets
    from toast_core.views import focus_share

    imp = _importance(active_spec().key, episode_key, float(lam), head_agg, float(keep_top), episode)
    targets = prompt_targets(torch.from_numpy(imp), int(prompt_patches), weights).reshape(imp.shape).numpy()
    masks = episode.support.masks
    on_object = None if masks is None else np.atleast_1d(focus_share(targets, masks)).astype(float)
    return {"importance": imp, "prompts": targets, "on_object": on_object}
