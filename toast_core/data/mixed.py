"""Mixed scenes: one star and one digit among distractors, both deciding objects' masks known.

The test set of task-dependent attention (the TOAST papers' signature figure): a stars module should
look at the star and a glyphs module at the digit of the same image. Drawn with the built-in scenes'
renderer on a stream of their own, so a mixed scene never repeats a task scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toast_core.data.scenes import (
    DEFAULT_SIZE,
    DIGIT_CLASSES,
    SOURCE_CLASSES,
    STAR_CLASSES,
    TASKS,
    Scene,
    _channels_first,
    _rng,
    render_scene,
)


@dataclass
class MixedScenes:
    """Scenes holding one star and one digit among distractors: images (N, 3, H, W) uint8, each
    deciding object's mask (N, H, W) bool, every object's mask, and both labels. A stars module
    should look at the star and a glyphs module at the digit of the same image."""

    images: torch.Tensor
    star_masks: torch.Tensor
    digit_masks: torch.Tensor
    objects: torch.Tensor
    star_labels: torch.Tensor
    digit_labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


#: the name a mixed scene goes by where a built-in task's name would (scene references, presets, pages)
MIXED_TASK = "mixed"
MIXED_DESCRIPTION = ("One star and one digit among distractors: a stars module should look at the star, a "
                     "glyphs module at the digit of the same image.")

MIXED_STREAM = 1 + len(TASKS)  # after the tasks' own streams: mixed scenes never repeat a task scene


def mixed_scene(seed: int, index: int, size: int = DEFAULT_SIZE) -> tuple[Scene, int, int]:
    """Test-split scene `index` with a star (label index % 8) and a digit (label (index // 8) % 10),
    both at the tasks' deciding-object size and drawn last (so mostly visible), after 1-3 distractors."""
    rng = _rng(seed, "test", MIXED_STREAM, index)
    star, digit = index % len(STAR_CLASSES), (index // len(STAR_CLASSES)) % len(DIGIT_CLASSES)
    n_dis = int(rng.integers(1, 4))
    kinds = [SOURCE_CLASSES[int(c)] for c in rng.integers(0, len(SOURCE_CLASSES), n_dis)]
    diameters = [float(rng.uniform(0.22, 0.3) * size) for _ in kinds]
    pair = [STAR_CLASSES[star], DIGIT_CLASSES[digit]]
    if rng.random() < 0.5:
        pair.reverse()
    kinds += pair
    diameters += [float(rng.uniform(*TASKS["stars"].size_range) * size) for _ in pair]
    scene = render_scene(rng, kinds, diameters, size)
    relabel = np.full(len(kinds) + 1, 3, np.uint8)  # 0 background, 1 the star, 2 the digit, 3 distractors
    relabel[0] = 0
    relabel[kinds.index(STAR_CLASSES[star]) + 1] = 1
    relabel[kinds.index(DIGIT_CLASSES[digit]) + 1] = 2
    scene.index_map = relabel[scene.index_map]
    return scene, star, digit


def make_mixed_split(n: int, seed: int = 0, size: int = DEFAULT_SIZE) -> MixedScenes:
    images = np.empty((n, size, size, 3), np.uint8)
    maps = np.empty((n, size, size), np.uint8)
    stars, digits = np.empty(n, np.int64), np.empty(n, np.int64)
    for i in range(n):
        scene, stars[i], digits[i] = mixed_scene(seed, i, size)
        images[i], maps[i] = scene.image, scene.index_map
    m = torch.from_numpy(maps)
    return MixedScenes(_channels_first(images), m == 1, m == 2, m > 0, torch.from_numpy(stars), torch.from_numpy(digits))
