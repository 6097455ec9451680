"""The image being explained, wherever it comes from: a built-in task scene (with its deciding
object's mask), a mixed scene (a star and a digit, either as the focus region), or a safely decoded
file; and the model's input made from it. `toast_core.views.compare` is the page-facing API over it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toast_core.core.backbone import Backbone
from toast_core.data.base import to_model_input
from toast_core.data.images import load_image, resize_for_model

SCENE_PREFIX = "scene:"


@dataclass
class ImageInput:
    """The image being explained: RGB (H, W, 3) uint8 at its original size, and, when it is a built-in
    scene, the deciding object's mask and every object's mask (H, W) bool."""

    rgb: np.ndarray
    name: str
    mask: np.ndarray | None = None
    true_label: str | None = None
    objects: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


def scene_image(task: str, split: str, index: int, size: int = 96, seed: int = 0, focus: str = "star") -> ImageInput:
    """Built-in scene `index` of a task split: the same image `make_task_split(task, split, n, seed)`
    holds at that index (label = index mod classes), with its deciding-object mask. Task 'mixed'
    (test split only) is a scene with one star and one digit (`data.mixed`); `focus` picks which of
    the two is the mask, and the label names both."""
    from toast_core.data.mixed import MIXED_TASK
    from toast_core.data.scenes import SPLITS, TASKS, task_scene

    if task not in TASKS and task != MIXED_TASK:
        raise ValueError(f"Unknown built-in task '{task}'; built-in tasks: {', '.join(TASKS)}, {MIXED_TASK}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split '{split}'; use one of {', '.join(SPLITS)}.")
    if index < 0:
        raise ValueError(f"The scene index must be >= 0, got {index}.")
    if task == MIXED_TASK:
        return _mixed_image(split, index, size, seed, focus)
    spec = TASKS[task]
    label = index % len(spec.classes)
    scene = task_scene(task, seed, split, index, label, size)
    return ImageInput(
        scene.image, f"{task}/{split}/{index}", scene.index_map == 1, spec.classes[label], scene.index_map > 0
    )


def _mixed_image(split: str, index: int, size: int, seed: int, focus: str) -> ImageInput:
    from toast_core.data.mixed import MIXED_TASK, mixed_scene
    from toast_core.data.scenes import DIGIT_CLASSES, STAR_CLASSES

    if split != "test":
        raise ValueError(f"Mixed scenes are a test set only; use split 'test', not '{split}'.")
    if focus not in ("star", "digit"):
        raise ValueError(f"focus is 'star' or 'digit', got '{focus}'.")
    scene, star, digit = mixed_scene(seed, index, size)
    mask = scene.index_map == (1 if focus == "star" else 2)
    label = f"{STAR_CLASSES[star]} (stars) · {DIGIT_CLASSES[digit]} (glyphs)"
    return ImageInput(scene.image, f"{MIXED_TASK}/{split}/{index}", mask, label, scene.index_map > 0)


def parse_scene_ref(ref: str) -> tuple[str, str, int]:
    """'scene:<task>:<split>:<index>' -> (task, split, index); ValueError naming the form otherwise."""
    parts = ref[len(SCENE_PREFIX) :].split(":") if ref.startswith(SCENE_PREFIX) else []
    if len(parts) != 3 or not parts[2].strip().isdigit():
        raise ValueError(f"'{ref}' is not a scene reference; use 'scene:<task>:<split>:<index>', e.g. 'scene:stars:test:3'.")
    return parts[0].strip(), parts[1].strip(), int(parts[2])


def open_image(ref: str | Path, size: int = 96) -> ImageInput:
    """An image file (decoded safely: `data.images.load_image`) or a built-in scene reference."""
    text = str(ref)
    if text.startswith(SCENE_PREFIX):
        task, split, index = parse_scene_ref(text)
        return scene_image(task, split, index, size)
    return ImageInput(load_image(Path(text)), Path(text).name)


def model_input(backbone: Backbone, rgb: np.ndarray) -> torch.Tensor:
    """(1, 3, H, W) normalised input for the backbone: the whole image, stretched (overlays then
    cover exactly what the model saw)."""
    layout = backbone.layout
    small = resize_for_model(rgb, layout.img_size)
    return to_model_input(small[None], layout.mean, layout.std).to(backbone.device)
