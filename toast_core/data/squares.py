"""Coloured squares: the smallest task whose answer has a place — grey (or random) noise with one
coloured square, the colour is the label and the square is the mask. Tests and the benchmarks'
smoke modes train on it because a 2-block fixture ViT learns it in a few steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from toast_core.data.base import LabeledImages

#: red, green, blue, yellow, magenta: well apart on the noise's grey (90..139)
PALETTE = ((230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 230, 40), (200, 40, 220))
RGB_NAMES = ("red", "green", "blue")


def coloured_squares(
    n_classes: int = 3,
    per_class: int = 8,
    size: int = 32,
    seed: int = 0,
    *,
    side: int | None = None,
    random_colours: bool = False,
    noise: tuple[int, int] = (90, 140),
    masks: bool = True,
    class_names: Sequence[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> LabeledImages:
    """`per_class` images of each class, labels cycling 0..n_classes-1, one square of side `side`
    (default size // 3) at a uniformly drawn place. Colours: PALETTE (n_classes <= 5), or drawn from
    the seed (`random_colours`, any n_classes). Everything comes from one generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    if random_colours:
        colours = torch.randint(0, 256, (n_classes, 3), generator=g, dtype=torch.uint8)
    elif n_classes <= len(PALETTE):
        colours = torch.tensor(PALETTE[:n_classes], dtype=torch.uint8)
    else:
        raise ValueError(f"The palette has {len(PALETTE)} colours; use random_colours for {n_classes} classes.")
    n = per_class * n_classes
    images = torch.randint(noise[0], noise[1], (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % n_classes
    square = torch.zeros(n, size, size, dtype=torch.bool)
    side = side or size // 3
    for i in range(n):
        top, left = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
        images[i, :, top : top + side, left : left + side] = colours[labels[i]].view(3, 1, 1)
        square[i, top : top + side, left : left + side] = True
    names = list(class_names) if class_names is not None else [f"c{i}" for i in range(n_classes)]
    return LabeledImages(images, labels, names, square if masks else None, dict(meta or {}))
