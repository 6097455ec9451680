"""The one in-memory dataset shape every data source produces and every consumer reads.

Downstream sets in this project are small (tens of images per class), so they live in memory as
uint8 tensors; normalisation to the backbone's mean/std happens once, in `to_model_input`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LabeledImages:
    """Images (N, 3, H, W) uint8, labels (N,) long, optional masks (N, H, W) bool of the object that
    decides the label, and optional `objects` (N, H, W) bool of every object (deciding + distractors),
    so "looks at the right object" can be told from "looks at objects"."""

    images: Tensor
    labels: Tensor
    class_names: list[str]
    masks: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    objects: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError("images must be a uint8 tensor of shape (N, 3, H, W).")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError("images and labels differ in length.")
        if self.masks is not None and self.masks.shape != (
            self.images.shape[0],
            *self.images.shape[2:],
        ):
            raise ValueError("masks must have shape (N, H, W) matching the images.")
        if self.objects is not None and self.objects.shape != (self.images.shape[0], *self.images.shape[2:]):
            raise ValueError("objects must have shape (N, H, W) matching the images.")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: Tensor | list[int]) -> LabeledImages:
        idx = torch.as_tensor(index, dtype=torch.long)
        return LabeledImages(
            images=self.images[idx],
            labels=self.labels[idx],
            class_names=list(self.class_names),
            masks=None if self.masks is None else self.masks[idx],
            meta=dict(self.meta),
            objects=None if self.objects is None else self.objects[idx],
        )


def to_model_input(
    images: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    size: tuple[int, int] | None = None,
) -> Tensor:
    """uint8 (N, 3, H, W) -> float normalised input, resized (bilinear, antialiased) if `size` differs."""
    x = images.float().div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
