"""The steering-method interface: a small nn.Module holding only what a method learns.

A method is a `Steer` (its touch points on the steered forward) plus a head. The shared frozen
backbone is referenced, never registered as a submodule, so `state_dict()`, `parameters()` and
`.to()` only ever see the method's own state.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from toast_core.core.backbone import Backbone, TokenLayout
from toast_core.core.forward import NOTHING, Capture, Steer, SteeredOutput, pool, steered_forward


@dataclass
class MethodConfig:
    """Settings common to every method; each method subclasses this with its own typed fields."""

    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MethodOutput:
    """Logits plus the pass that produced them (captures included), and method-specific extras."""

    logits: Tensor
    features: Tensor
    out: SteeredOutput | None  # None only from cached frozen features (`forward_frozen`, head only)
    extras: dict[str, Any] = field(default_factory=dict)


# Building seeds torch's global generator for the duration of `build()`; two runs building at once
# in different worker threads (a CPU and a GPU run) would otherwise draw from each other's seed.
# Every reseed of the global generator in toast_core takes this lock (see `seed_global`).
_GLOBAL_RNG_LOCK = threading.Lock()


def seed_global(seed: int) -> None:
    """torch.manual_seed, but never in the middle of another thread's method build."""
    with _GLOBAL_RNG_LOCK:
        torch.manual_seed(seed)


class SteeringMethod(nn.Module, Steer):
    """Base class: plain linear readout over the unmodified backbone (the linear probe's behaviour)."""

    name: ClassVar[str] = "base"
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: attention views this method can show beyond the common ones (e.g. "toast_pass1", "selection")
    extra_views: ClassVar[tuple[str, ...]] = ()
    #: the part of the training forward that reads only the frozen backbone, so a run may compute it
    #: once per image and cache it (toast_core.training.feature_cache): "features" = all of it up to the pooled
    #: feature (the head alone trains), "pass1" = a first pass (TOAST); None = nothing is frozen
    frozen_stage_kind: ClassVar[str | None] = None

    def __init__(self, backbone: Backbone, num_classes: int, config: MethodConfig | None = None):
        nn.Module.__init__(self)
        self.config = config if config is not None else self.config_cls()
        self._backbone_ref = (backbone,)  # a tuple keeps it out of the module tree
        self.num_classes = int(num_classes)
        self._streams: dict[str, torch.Generator] = {}
        self._stream_seed: int | None = None
        with _GLOBAL_RNG_LOCK:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(self.config.seed)
            try:
                self.head = nn.Linear(backbone.layout.embed_dim, self.num_classes)
                self.build()
            finally:
                torch.random.set_rng_state(generator_state)
        self.to(backbone.device)

    # --- randomness inside a training step -------------------------------------------------------
    def seed_streams(self, seed: int) -> None:
        """Give this method its own random streams for in-step randomness (prompt dropout, prompt
        placement), seeded per run. Torch's global generator is shared by every thread, so a run
        drawing from it would see another worker's draws and reseeds."""
        self._stream_seed, self._streams = int(seed), {}

    def stream(self, device: torch.device | str) -> torch.Generator | None:
        """The run's generator on `device` (created on first use), or None (torch's global one)
        when no run has seeded streams."""
        if self._stream_seed is None:
            return None
        device = torch.device(device)
        key = str(device)
        if key not in self._streams:
            self._streams[key] = torch.Generator(device=device).manual_seed(self._stream_seed)
        return self._streams[key]

    # --- what subclasses customise -------------------------------------------------------------
    def build(self) -> None:
        """Create the method's own parameters (called once, under the method's seed)."""

    def extra_losses(self, output: MethodOutput, labels: Tensor) -> dict[str, Tensor]:
        """Loss terms beyond the task cross-entropy, by name (already weighted)."""
        return {}

    def capture_for_loss(self) -> Capture:
        """What the training step must capture for `extra_losses`."""
        return NOTHING

    # --- the frozen stage (per-run cache; see toast_core.training.feature_cache) --------------
    def frozen_stage_signature(self) -> str:
        """What the frozen stage's rows depend on besides the backbone and the image."""
        return str(self.frozen_stage_kind)

    def cache_refusal(self) -> str | None:
        """Why this method's frozen stage may not be cached now (None: it may). Checked, not
        trusted: the declaration is void if anything below the cache point trains or is random."""
        if self.frozen_stage_kind is None:
            return f"{self.name} declares no frozen stage (something trainable runs from the input)"
        if any(p.requires_grad for p in self.vit.parameters()):
            return "the backbone below the cache point has trainable weights"
        if self.vit.training:
            return "the backbone is in train mode (dropout / drop-path differ every pass)"
        if self.frozen_stage_kind == "features":
            head = {id(p) for p in self.head.parameters()}
            if any(id(p) not in head for p in self.trainable_parameters()):
                return "trainable parameters below the pooled feature"
        return None

    def frozen_stage(self, images: Tensor) -> dict[str, Tensor]:
        """The frozen stage of prepared inputs, one row per image, no graph: here the pooled feature."""
        with torch.no_grad():
            return {"features": pool(self.vit, steered_forward(self.vit, images, steer=self))}

    def forward_frozen(self, stage: dict[str, Tensor], capture: Capture = NOTHING) -> MethodOutput:
        """The training forward from frozen-stage rows: the same values `forward` gives their images."""
        features = stage["features"]
        return MethodOutput(logits=self.head(features), features=features, out=None)

    # --- shared behaviour ----------------------------------------------------------------------
    @property
    def backbone(self) -> Backbone:
        return self._backbone_ref[0]

    @property
    def layout(self) -> TokenLayout:
        return self.backbone.layout

    @property
    def vit(self) -> VisionTransformer:
        """The weights this method runs on: the shared frozen backbone unless it owns a copy."""
        return self.backbone.model

    def forward(self, images: Tensor, capture: Capture = NOTHING) -> MethodOutput:
        out = steered_forward(self.vit, images, steer=self, capture=capture)
        features = pool(self.vit, out)
        return MethodOutput(logits=self.head(features), features=features, out=out)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def trainable_share(self) -> float:
        """Trainable parameters as a share of the frozen backbone's parameter count."""
        total = sum(p.numel() for p in self.backbone.model.parameters())
        return self.trainable_count() / max(total, 1)

    def views(self) -> tuple[str, ...]:
        return ("cls", "rollout", "grad_rollout", "gradcam", "relevance", *self.extra_views)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "config": self.config.to_dict(),
            "trainable_params": self.trainable_count(),
            "trainable_share": self.trainable_share(),
            "num_classes": self.num_classes,
            "views": list(self.views()),
        }
