"""Attention transfer (Li et al. 2024, arXiv 2411.09702): how much of transfer is the attention pattern?

A randomly initialised student ViT of exactly the backbone's shape learns a task, guided only by the
frozen pretrained teacher's attention maps (the shared backbone is the teacher; the student is this
module's own, trainable `vit`):
- `attn_copy`: every transferred block of the student uses the teacher's post-softmax map (head for
  head) instead of its own; the teacher runs (no grad) in every forward, inference included.
  Captures of those blocks report the map actually used (the teacher's), so every view shows it.
- `attn_distill`: the student computes its own attention; training adds
  β · Σ_l mean_{image, head, query} KL(teacher ‖ student) over the first L−3 blocks (as released;
  at least 1 block for depth ≤ 3). KL is CE(teacher, student) minus the teacher's entropy, so it has
  the released CE's gradient and is exactly 0 when the student's maps equal the teacher's. The
  student alone runs at inference.
- `scratch`: the same student with no transfer, the control.
`layers` sets how many leading blocks are transferred (None: copy → all blocks, as the paper
describes; note the released copy code also stops at L−3; distill → L−3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from toast_core.core.forward import (
    NOTHING,
    Capture,
    UnsupportedBackbone,
    check_supported,
    pool,
    resolve_layers,
    steered_forward,
)
from toast_core.methods.base import MethodConfig, MethodOutput, SteeringMethod

#: LayerScale init for students of LayerScale backbones (timm's usual value; the teacher's gammas are
#: learnt weights and are not copied)
STUDENT_INIT_VALUES = 1e-5


# --- the student --------------------------------------------------------------------------------------
def student_config(model: VisionTransformer) -> dict[str, Any]:
    """The timm VisionTransformer kwargs that rebuild `model`'s architecture (no weights, no head)."""
    check_supported(model)
    blk = model.blocks[0]
    pe = model.patch_embed
    attn, mlp = blk.attn, blk.mlp
    norm_eps = getattr(blk.norm1, "eps", 1e-6)
    return dict(
        img_size=tuple(pe.img_size),
        patch_size=tuple(pe.patch_size),
        in_chans=int(pe.proj.in_channels),
        num_classes=0,
        global_pool=model.global_pool,
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(attn.num_heads),
        mlp_ratio=mlp.fc1.out_features / model.embed_dim,
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        scale_attn_norm=not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity),
        scale_mlp_norm=not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity),
        proj_bias=attn.proj.bias is not None,
        init_values=STUDENT_INIT_VALUES if isinstance(blk.ls1, LayerScale) else None,
        class_token=model.cls_token is not None,
        pos_embed="learn" if model.pos_embed is not None else "none",
        no_embed_class=bool(model.no_embed_class),
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
        norm_layer=partial(nn.LayerNorm, eps=norm_eps),
        act_layer=type(mlp.act),
    )


def _structure(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer names and shapes, without any classifier head."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("head.")}


def build_student(teacher: VisionTransformer) -> VisionTransformer:
    """A freshly initialised timm VisionTransformer with the teacher's config; refuses any mismatch."""
    if type(teacher) is not VisionTransformer:
        raise UnsupportedBackbone(
            f"Attention transfer rebuilds a plain timm VisionTransformer; got {type(teacher).__name__}."
        )
    student = VisionTransformer(**student_config(teacher))
    want, got = _structure(teacher), _structure(student)
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:6]
        raise UnsupportedBackbone(f"Could not rebuild the backbone's architecture for a student; differs at {diff}.")
    student.to(next(teacher.parameters()).device)
    return student


def attention_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """mean over (image, head, query) of KL(softmax(teacher) ‖ softmax(student)) over keys."""
    log_t = teacher_logits.float().log_softmax(dim=-1)
    log_s = student_logits.float().log_softmax(dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=-1).mean()


def readout_rows(weights: Tensor, has_cls: bool) -> Tensor:
    """The readout query's row of a full map, as the steered forward's `cls_attn` capture defines it."""
    return weights[:, :, 0] if has_cls else weights.mean(dim=2)


# --- the methods --------------------------------------------------------------------------------------
@dataclass
class StudentConfig(MethodConfig):
    """The student is initialised under `seed`, so two runs with one seed start identically."""


@dataclass
class CopyConfig(StudentConfig):
    """layers: leading blocks whose attention is the teacher's (None = every block)."""

    layers: int | None = None

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers must be >= 1 or None, got {self.layers}.")


@dataclass
class DistillConfig(StudentConfig):
    """beta: weight β of the attention loss; layers: leading blocks distilled (None = max(1, L−3))."""

    beta: float = 3.0
    layers: int | None = None

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers must be >= 1 or None, got {self.layers}.")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}.")


class StudentMethod(SteeringMethod):
    """A trainable random-init student (`self.student`, the method's `vit`); the shared frozen
    backbone is the teacher. Without transfer this is the `scratch` control."""

    name = "scratch"
    config_cls = StudentConfig

    def build(self) -> None:
        self.student = build_student(self.backbone.model)
        for p in self.student.parameters():
            p.requires_grad_(True)

    @property
    def vit(self) -> VisionTransformer:
        return self.student

    @property
    def teacher(self) -> VisionTransformer:
        return self.backbone.model

    @property
    def depth(self) -> int:
        return len(self.student.blocks)

    def transferred_layers(self) -> list[int]:
        """Blocks that receive the teacher's attention (none for the scratch control)."""
        return []

    def teacher_pass(self, images: Tensor, capture: Capture) -> dict[str, dict[int, Tensor]]:
        """One no-grad pass of the frozen teacher on the same inputs."""
        with torch.no_grad():
            out = steered_forward(self.teacher, images, capture=capture)
        return {"attn": out.attn, "attn_logits": out.attn_logits}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["transferred_layers"] = self.transferred_layers()
        info["teacher_at_inference"] = False
        return info


class AttentionCopy(StudentMethod):
    """The student runs on the teacher's attention maps in the transferred blocks."""

    name = "attn_copy"
    config_cls = CopyConfig

    def build(self) -> None:
        super().build()
        self._override: dict[int, Tensor] = {}

    def transferred_layers(self) -> list[int]:
        n = self.depth if self.config.layers is None else min(self.config.layers, self.depth)
        return list(range(n))

    def attention_override(self, layer: int) -> Tensor | None:
        return self._override.get(layer)

    def forward(self, images: Tensor, capture: Capture = NOTHING) -> MethodOutput:
        layers = self.transferred_layers()
        want_logits = sorted(resolve_layers(capture.attn_logits, self.depth) & set(layers))
        teacher = self.teacher_pass(images, Capture(attn=layers, attn_logits=want_logits or False))
        self._override = teacher["attn"]
        try:
            out = steered_forward(self.student, images, steer=self, capture=capture)
        finally:
            self._override = {}
        # report the attention the student actually used in the transferred blocks (the forward
        # already reports an override as the full map)
        has_cls = self.student.cls_token is not None
        for layer in layers:
            if layer in out.cls_attn:
                out.cls_attn[layer] = readout_rows(teacher["attn"][layer], has_cls)
            if layer in out.attn_logits:
                out.attn_logits[layer] = teacher["attn_logits"][layer]
        features = pool(self.student, out)
        return MethodOutput(
            logits=self.head(features), features=features, out=out, extras={"teacher_attn": teacher["attn"]}
        )

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["teacher_at_inference"] = True
        return info


class AttentionDistill(StudentMethod):
    """The student learns its own attention, pulled toward the teacher's by β·KL during training."""

    name = "attn_distill"
    config_cls = DistillConfig

    def transferred_layers(self) -> list[int]:
        n = max(1, self.depth - 3) if self.config.layers is None else self.config.layers
        return list(range(min(n, self.depth)))

    def capture_for_loss(self) -> Capture:
        return Capture(attn_logits=self.transferred_layers()) if self.config.beta > 0 else NOTHING

    def forward(self, images: Tensor, capture: Capture = NOTHING) -> MethodOutput:
        output = super().forward(images, capture)
        layers = self.transferred_layers()
        # the teacher runs only when the distillation loss can be computed (training captures)
        if self.training and self.config.beta > 0 and set(layers) <= set(output.out.attn_logits):
            output.extras["teacher_logits"] = self.teacher_pass(images, Capture(attn_logits=layers))["attn_logits"]
        return output

    def distill_loss(self, output: MethodOutput) -> Tensor:
        """Σ over transferred blocks of the mean KL(teacher ‖ student) (unweighted)."""
        teacher = output.extras.get("teacher_logits")
        if teacher is None:
            raise RuntimeError("attn_distill: the forward ran without the teacher (train mode and "
                               "capture_for_loss() are needed for the distillation loss).")
        return sum(
            (attention_kl(teacher[l], output.out.attn_logits[l]) for l in self.transferred_layers()),
            torch.zeros((), device=output.logits.device),
        )

    def extra_losses(self, output: MethodOutput, labels: Tensor) -> dict[str, Tensor]:
        if self.config.beta <= 0:
            return {}
        return {"attn_distill": self.config.beta * self.distill_loss(output)}


def copy_weights_from_teacher(method: StudentMethod) -> None:
    """Load the teacher's weights into the student (tests and the 'distill loss is 0' check)."""
    state = {k: v for k, v in method.teacher.state_dict().items() if not k.startswith("head.")}
    method.student.load_state_dict(state, strict=True)


__all__ = [
    "AttentionCopy",
    "AttentionDistill",
    "CopyConfig",
    "DistillConfig",
    "StudentConfig",
    "StudentMethod",
    "attention_kl",
    "build_student",
    "copy_weights_from_teacher",
    "student_config",
]
