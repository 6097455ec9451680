"""Full fine-tune: a per-run deep copy of the backbone's ViT, every weight trainable.

The copy is this module's own submodule, so it is saved in the checkpoint and moved with the
method, while the shared frozen backbone is never touched. In training mode the copy uses the
backbone's own dropout / drop-path settings (the frozen backbone always runs in eval mode).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from timm.models.vision_transformer import VisionTransformer

from toast_core.methods.base import MethodConfig, SteeringMethod


@dataclass
class FullConfig(MethodConfig):
    """No settings beyond the seed."""


class FullFineTune(SteeringMethod):
    """Every backbone weight trainable, on a private copy (`self.model`)."""

    name = "full"
    config_cls = FullConfig

    def build(self) -> None:
        model = copy.deepcopy(self.backbone.model)
        # The copy's own classifier is never used (the method's head reads the pooled feature),
        # so drop it to keep the trainable set exactly "backbone + head".
        model.reset_classifier(0)
        for p in model.parameters():
            p.requires_grad_(True)
        self.model = model

    @property
    def vit(self) -> VisionTransformer:
        return self.model
