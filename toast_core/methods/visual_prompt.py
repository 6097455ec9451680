"""Pixel-space visual prompt (Bahng et al. 2022): a learnable additive perturbation of the normalised input.

Kinds (as in hjbahng/visual_prompting): "padding" (four border strips of width w; 30 px on 224 gives
69,840 parameters), "fixed_patch" (a square in the top-left corner) and "random_patch" (the square
moves to a random location on every training call; at eval it sits in the top-left corner).
The backbone stays frozen and a linear head is trained with the prompt. The official recipe is
extreme (SGD lr 40, 1000 epochs): the prompt needs long runs to pay off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from toast_core.methods.base import MethodConfig, SteeringMethod

KINDS = ("padding", "fixed_patch", "random_patch")
REFERENCE_SIZE, REFERENCE_WIDTH = 224, 30


@dataclass
class VisualPromptConfig(MethodConfig):
    """kind: padding | fixed_patch | random_patch; size: strip width (padding) or square side (patches),
    None = round(30 · H / 224) for an H-pixel input; init_std: N(0, init_std) init (official: 1)."""

    kind: str = "padding"
    size: int | None = None
    init_std: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Visual prompt kind must be one of {', '.join(KINDS)}; got {self.kind!r}.")
        if self.size is not None and self.size < 1:
            raise ValueError(f"Visual prompt size must be >= 1, got {self.size}.")


def default_size(img_size: tuple[int, int]) -> int:
    """The official 30 px on 224 px, scaled to this input height."""
    return max(1, round(REFERENCE_WIDTH * img_size[0] / REFERENCE_SIZE))


def padding_count(height: int, width: int, w: int) -> int:
    """Parameters of a padding prompt: top + bottom strips (w × W) and left + right (w × (H - 2w)), 3 channels."""
    return 3 * (2 * w * width + 2 * w * (height - 2 * w))


class VisualPrompt(SteeringMethod):
    """Padding strips `pad_up/pad_down/pad_left/pad_right` or one square `patch`, plus the head."""

    name = "visual_prompt"
    config_cls = VisualPromptConfig
    #: what the official recipe used; expose to pages so a user knows short runs under-sell it
    train_hints: ClassVar[dict[str, Any]] = {
        "official_optimizer": "sgd",
        "official_lr": 40.0,
        "official_epochs": 1000,
        "note": "pixel prompts need long runs; short runs mostly train the head",
    }

    def build(self) -> None:
        h, w = self.layout.img_size
        size = self.config.size if self.config.size is not None else default_size((h, w))
        self.size = int(size)
        std = self.config.init_std
        if self.config.kind == "padding":
            if 2 * size >= min(h, w):
                raise ValueError(f"Padding width {size} leaves no image inside a {h}x{w} input.")
            self.pad_up = nn.Parameter(torch.randn(1, 3, size, w) * std)
            self.pad_down = nn.Parameter(torch.randn(1, 3, size, w) * std)
            self.pad_left = nn.Parameter(torch.randn(1, 3, h - 2 * size, size) * std)
            self.pad_right = nn.Parameter(torch.randn(1, 3, h - 2 * size, size) * std)
        else:
            if size > min(h, w):
                raise ValueError(f"Patch side {size} does not fit a {h}x{w} input.")
            self.patch = nn.Parameter(torch.randn(1, 3, size, size) * std)

    def prompt_image(self, height: int, width: int, training: bool | None = None) -> Tensor:
        """The full additive prompt (1, 3, H, W) as used now (training chooses the random location)."""
        training = self.training if training is None else training
        s = self.size
        if self.config.kind == "padding":
            base = self.pad_up.new_zeros(1, 3, height - 2 * s, width - 2 * s)
            middle = torch.cat([self.pad_left, base, self.pad_right], dim=3)
            return torch.cat([self.pad_up, middle, self.pad_down], dim=2)
        top, left = 0, 0
        if self.config.kind == "random_patch" and training:
            stream = self.stream("cpu")
            top = int(torch.randint(0, height - s + 1, (1,), generator=stream).item())
            left = int(torch.randint(0, width - s + 1, (1,), generator=stream).item())
        # pad the square into place (differentiable, no in-place writes on a leaf)
        return nn.functional.pad(self.patch, (left, width - s - left, top, height - s - top))

    def transform_input(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        if (h, w) != tuple(self.layout.img_size):
            raise ValueError(
                f"The visual prompt was built for {self.layout.img_size} inputs, got {(h, w)}; "
                "resize images with prepare_batch first."
            )
        return images + self.prompt_image(h, w).to(images.dtype)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["prompt_kind"] = self.config.kind
        info["prompt_size"] = self.size
        info["train_hints"] = dict(self.train_hints)
        return info
