"""VPT (Jia et al. 2022): p learnable prompt tokens inserted after the prefix tokens, no position embedding.

Shallow: one set inserted before block 0 and carried through. Deep: a fresh set per block; before
block l the steered forward overwrites the prompt slots with block l's own set (never accumulates).
Init and dropout follow the official KMnP/vpt code: uniform in ±sqrt(6 / (3·P·P + d)) with P the
patch size; dropout 0.1 for deep, 0 for shallow unless set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from toast_core.methods.base import MethodConfig, SteeringMethod

PROMPT_CHOICES = (1, 5, 10, 50, 100)


@dataclass
class VPTConfig(MethodConfig):
    """num_tokens: p (offered: 1, 5, 10, 50, 100; any p >= 1 works); deep: per-block prompts;
    dropout: None = the official default (0.1 deep, 0.0 shallow)."""

    num_tokens: int = 10
    deep: bool = False
    dropout: float | None = None

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"VPT needs at least one prompt token, got {self.num_tokens}.")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VPT dropout must be in [0, 1), got {self.dropout}.")

    @property
    def effective_dropout(self) -> float:
        if self.dropout is not None:
            return float(self.dropout)
        return 0.1 if self.deep else 0.0


def prompt_init_bound(patch_size: tuple[int, int], embed_dim: int) -> float:
    """sqrt(6 / (3·P·P + d)): Xavier-uniform over the patch-embedding fan (ViT-B/16: 0.0625)."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + embed_dim))


class VPT(SteeringMethod):
    """Prompts `self.prompt`: (1, p, d) shallow or (L, p, d) deep."""

    name = "vpt"
    config_cls = VPTConfig

    def build(self) -> None:
        layout = self.layout
        sets = layout.depth if self.config.deep else 1
        bound = prompt_init_bound(layout.patch_size, layout.embed_dim)
        self.prompt = nn.Parameter(torch.empty(sets, self.config.num_tokens, layout.embed_dim))
        nn.init.uniform_(self.prompt, -bound, bound)

    def prompts(self, layer: int, batch: int) -> Tensor | None:
        if self.config.deep:
            p = self.prompt[layer]
        elif layer == 0:
            p = self.prompt[0]
        else:
            return None
        # expand before dropout so each image gets its own dropout mask (as the official code does)
        return self._dropout(p.unsqueeze(0).expand(batch, -1, -1))

    def _dropout(self, prompts: Tensor) -> Tensor:
        """Inverted dropout as nn.Dropout computes it, drawn from the run's own stream."""
        rate = self.config.effective_dropout
        if not self.training or rate == 0.0:
            return prompts
        noise = torch.rand(prompts.shape, device=prompts.device, generator=self.stream(prompts.device))
        return prompts * (noise >= rate).to(prompts.dtype) / (1.0 - rate)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["vpt_form"] = "deep (per-block prompts, overwritten)" if self.config.deep else "shallow"
        info["prompt_dropout"] = self.config.effective_dropout
        info["prompt_init_bound"] = prompt_init_bound(self.layout.patch_size, self.layout.embed_dim)
        return info
