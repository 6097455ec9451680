"""FORT (Wang et al., NeurIPS 2023): position prompts that make few-shot fine-tuning look at the key object.

Per episode, before tuning, each support image gets a *position prompt*: the top-P patches of its
gradient-rollout importance (methods.md §6; `toast_core.views.gradient_rollout` computes it, with
G from the gradient of the true-class logit of a head fitted on the support features). Tuning then
adds α·R to the task loss, where R is the cross-entropy between the image's prompt (a distribution
over patch keys) and the softmax over patch keys of the LAST block's head-averaged attention logits
/ τ, for every query token, averaged over queries and images (the CLS key, any register/distillation
key and any prompt-token key are excluded by index: keys are the tokens from `out.patch_start`).

Composition: FORT is a mixin (`FortMixin`) put in front of a base method class, so a FORT method *is*
its base method (same parameters, same init under the same seed, same forward, same checkpoint keys)
plus the prompt loss: `FortFullFineTune(FortMixin, FullFineTune)` = "fort_full", "fort_lora",
"fort_bitfit". Any other `SteeringMethod` composes the same way.

Which support image is a batch row? The shared training loop passes images and labels only, so the
prompts are stored with the prepared support inputs, and each row is matched to its support image by
content (nearest stored input, which must be identical within 1e-4). That keeps `train()` unchanged:
call `prepare_prompts(support)` (or `set_prompts`), then `train(method, support, ...)`.

Official-code vs paper choices (all configurable, defaults = the released code):
- head aggregation `head_agg`: "min" (code) or "mean" (paper);
- prompt weights `prompt_weights`: "importance" (code: importance of the kept patches rescaled) or
  "uniform" (paper: many-hot);
- target mass `target_mass`: "P" (code: the target sums to P, so R is P × the unit-mass
  cross-entropy and the published α values apply) or "unit" (paper: R is the mean log-probability
  over the prompt patches; its α is P times larger for the same strength).
- importance head `importance_head`: "ridge" (default: closed-form ridge regression on the support
  features, R2D2-style, no bias, λ = `ridge_lam` — cheap and deterministic) or "own" (the method's
  current head, as the code does without `--reset_head`).
Gradients are per image (the code backprops the batch mean, which scales G by 1/B), and G's sign is
fixed to agree with the attention-only importance (the code leaves it arbitrary); see
`toast_core.views.gradient_rollout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from toast_core.core.forward import NOTHING, Capture, resolve_layers
from toast_core.data.base import LabeledImages
from toast_core.methods.base import MethodConfig, MethodOutput, SteeringMethod
from toast_core.methods.bitfit import BitFit, BitFitConfig
from toast_core.methods.full import FullConfig, FullFineTune
from toast_core.methods.lora import LoRA, LoRAConfig

PROMPT_WEIGHTS = ("importance", "uniform")
TARGET_MASS = ("P", "unit")
IMPORTANCE_HEADS = ("ridge", "own")
HEAD_AGGS = ("min", "mean")
#: P as a share of the patches (official: 14 of 196 on ViT-B/16 at 224 px, ~7%)
PROMPT_SHARE = 0.07
#: a batch row counts as a support image when it matches a stored input this closely (max |Δ|)
MATCH_TOL = 1e-4


@dataclass
class FortSettings(MethodConfig):
    """FORT's settings (mixed into the base method's config).

    fort_alpha: weight α of R (0 = exactly the base method); tau: temperature of the attention
    logits; prompt_patches: P, the patches per prompt (None = round(0.07 · patches), at least 1);
    lam: λ, weight of the gradient term in the rollout; head_agg: "min" (code) / "mean" (paper);
    keep_top: share of each rollout row kept; prompt_weights: "importance" (code) / "uniform"
    (paper); target_mass: "P" (code) / "unit" (paper); importance_head: "ridge" / "own";
    ridge_lam: ridge regulariser of the importance head.
    """

    fort_alpha: float = 0.03
    tau: float = 1.0
    prompt_patches: int | None = None
    lam: float = 1.0
    #: "mean" (paper) by default: with the 3-head embedded backbone the code's "min" puts the prompts
    #: off the object on single-object scenes (share 0.0 vs 0.44 with "mean"; tests/test_fort.py)
    head_agg: str = "mean"
    keep_top: float = 0.1
    prompt_weights: str = "importance"
    target_mass: str = "P"
    importance_head: str = "ridge"
    ridge_lam: float = 50.0

    def __post_init__(self) -> None:
        if self.fort_alpha < 0 or self.tau <= 0:
            raise ValueError(f"FORT needs fort_alpha >= 0 and tau > 0 (got {self.fort_alpha}, {self.tau}).")
        if self.prompt_patches is not None and self.prompt_patches < 1:
            raise ValueError(f"prompt_patches must be >= 1 or None, got {self.prompt_patches}.")
        if not 0.0 < self.keep_top <= 1.0:
            raise ValueError(f"keep_top is a share in (0, 1], got {self.keep_top}.")
        for name, allowed in (
            ("head_agg", HEAD_AGGS),
            ("prompt_weights", PROMPT_WEIGHTS),
            ("target_mass", TARGET_MASS),
            ("importance_head", IMPORTANCE_HEADS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")
        if self.ridge_lam <= 0:
            raise ValueError(f"ridge_lam must be > 0, got {self.ridge_lam}.")
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


# --- pure pieces ------------------------------------------------------------------------------------
def default_prompt_patches(num_patches: int) -> int:
    """P = round(0.07 · patches) (14 of 196 in the paper), at least 1."""
    return max(1, round(PROMPT_SHARE * num_patches))


def ridge_head(features: Tensor, labels: Tensor, num_classes: int, lam: float = 50.0) -> tuple[Tensor, Tensor]:
    """Closed-form ridge regression onto one-hot labels (R2D2 / FORT's `reset_r2d2_head`):
    W = Yᵀ (X Xᵀ + λI)⁻¹ X, bias 0. Returns (weight (C, d), bias (C,)) in the features' dtype."""
    x = features.detach().double()
    y = F.one_hot(labels.long().to(x.device), num_classes).double()
    gram = x @ x.T + lam * torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    weight = y.T @ torch.linalg.solve(gram, x)
    return weight.to(features.dtype), torch.zeros(num_classes, dtype=features.dtype, device=features.device)


def prompt_targets(importance: Tensor, count: int, weights: str = "importance") -> Tensor:
    """Position prompts as distributions over patches (S, P_total) from importance (S, ...).

    Keeps the `count` most important patches per image. "importance": their importance, rescaled
    (the code's `imp_to_focus`; negative importance is clipped to 0, and an image whose kept
    importance sums to 0 falls back to uniform); "uniform": the many-hot of the paper. Each row sums
    to 1 (the loss applies the mass P when `target_mass="P"`).
    """
    if weights not in PROMPT_WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(PROMPT_WEIGHTS)}; got {weights!r}.")
    imp = importance.detach().flatten(1).double()
    count = int(min(max(1, count), imp.shape[1]))
    idx = imp.topk(count, dim=1).indices
    hot = torch.zeros_like(imp).scatter_(1, idx, 1.0)
    if weights == "uniform":
        t = hot
    else:
        t = imp.clamp_min(0.0) * hot
        empty = t.sum(dim=1, keepdim=True) <= 0
        t = torch.where(empty, hot, t)
    return (t / t.sum(dim=1, keepdim=True)).float()


def prompt_loss(logits: Tensor, targets: Tensor, patch_start: int, tau: float = 1.0) -> Tensor:
    """R: cross-entropy between targets (B, P) and softmax over the patch keys of the head-averaged
    attention logits (B, H, N, N) / τ, for every query token, averaged over queries and images."""
    z = logits.float().mean(dim=1)[:, :, patch_start:] / tau  # (B, N, P)
    if z.shape[-1] != targets.shape[-1]:
        raise ValueError(f"{z.shape[-1]} patch keys but prompts over {targets.shape[-1]} patches.")
    logp = z.log_softmax(dim=-1)
    return -(targets.to(logp)[:, None, :] * logp).sum(dim=-1).mean()


def prompt_mass(logits: Tensor, targets: Tensor, patch_start: int, tau: float = 1.0) -> Tensor:
    """Share of patch-key attention (head-mean logits, softmax over patch keys) on the prompt patches
    (targets > 0), averaged over queries: (B,). How far R has pulled the attention to the prompts."""
    p = (logits.float().mean(dim=1)[:, :, patch_start:] / tau).softmax(dim=-1)
    return (p * (targets.to(p) > 0).to(p)[:, None, :]).sum(dim=-1).mean(dim=1)


@contextlib.contextmanager
def head_swapped(method: SteeringMethod, weight: Tensor, bias: Tensor) -> Iterator[None]:
    """Temporarily give `method.head` these weights (restored afterwards, even on error)."""
    head = method.head
    saved = (head.weight.detach().clone(), None if head.bias is None else head.bias.detach().clone())
    with torch.no_grad():
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.copy_(bias)
    try:
        yield
    finally:
        with torch.no_grad():
            head.weight.copy_(saved[0])
            if head.bias is not None and saved[1] is not None:
                head.bias.copy_(saved[1])


def support_features(method: SteeringMethod, x: Tensor, batch_size: int = 64) -> Tensor:
    """Pooled features of prepared inputs through the method's own forward (eval mode, no grad)."""
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            return torch.cat([method(x[i : i + batch_size]).features for i in range(0, len(x), batch_size)])
    finally:
        method.train(was_training)


def position_importance(
    method: SteeringMethod,
    x: Tensor,
    labels: Tensor,
    *,
    lam: float = 1.0,
    head_agg: str = "min",
    keep_top: float = 0.1,
    importance_head: str = "ridge",
    ridge_lam: float = 50.0,
    batch_size: int = 32,
    ridge: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """FORT's patch importance (S, gh, gw) of prepared support inputs, for their true classes.

    With `importance_head="ridge"` the gradient comes from a ridge head fitted on the support
    features (the method's own head is restored afterwards); "own" uses the method's head as it is.
    `ridge`: that head when the caller already fitted it on these inputs' features with `ridge_lam`
    (a few-shot episode shares it with the classifier init), which saves one forward of the support.
    """
    from toast_core.views import gradient_rollout  # views import the method base late too; import late

    labels = labels.long().to(x.device)
    if importance_head not in IMPORTANCE_HEADS:
        raise ValueError(f"importance_head must be one of {', '.join(IMPORTANCE_HEADS)}; got {importance_head!r}.")
    if importance_head == "ridge":
        w, b = ridge if ridge is not None else ridge_head(support_features(method, x), labels, method.num_classes, ridge_lam)
        ctx: contextlib.AbstractContextManager[None] = head_swapped(method, w, b)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        parts = [
            gradient_rollout(method, x[i : i + batch_size], labels[i : i + batch_size], lam, head_agg, keep_top)
            for i in range(0, len(x), batch_size)
        ]
    return torch.cat(parts)


def _merge_layers(a: Any, b: Any, depth: int) -> Any:
    if a is True or b is True:
        return True
    merged = resolve_layers(a, depth) | resolve_layers(b, depth)
    return sorted(merged) if merged else False


# --- the mixin ----------------------------------------------------------------------------------------
class FortMixin:
    """FORT on top of a base method class: put it first, `class X(FortMixin, Base)`.

    Prompt state (`prompt_inputs`, `prompt_targets`, `prompt_importance`) is plain attributes, not
    buffers: it belongs to one episode, and the checkpoint stays exactly the base method's.
    """

    config: FortSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_inputs: Tensor | None = None
        self.prompt_targets: Tensor | None = None
        self.prompt_importance: Tensor | None = None

    @property
    def fort_active(self) -> bool:
        return self.config.fort_alpha > 0

    def prompt_count(self) -> int:
        """P for this backbone."""
        cfg = self.config
        n = self.layout.num_patches  # type: ignore[attr-defined]
        return min(n, cfg.prompt_patches) if cfg.prompt_patches is not None else default_prompt_patches(n)

    def set_prompts(self, inputs: Tensor, targets: Tensor, importance: Tensor | None = None) -> None:
        """Store prepared support inputs (S, 3, H, W) and their prompts (S, patches), rows summing to 1."""
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"{inputs.shape[0]} support inputs but {targets.shape[0]} prompts.")
        n = self.layout.num_patches  # type: ignore[attr-defined]
        if targets.flatten(1).shape[1] != n:
            raise ValueError(f"Prompts cover {targets.flatten(1).shape[1]} patches; the backbone has {n}.")
        dev = self.head.weight.device  # type: ignore[attr-defined]
        self.prompt_inputs = inputs.detach().float().to(dev)
        self.prompt_targets = targets.detach().flatten(1).float().to(dev)
        self.prompt_importance = None if importance is None else importance.detach().to(dev)

    def prepare_prompts(
        self, support: LabeledImages | Tensor, labels: Tensor | None = None, batch_size: int = 32
    ) -> Tensor:
        """Compute and store the position prompts of a support set (uint8 images, or a LabeledImages).

        Returns the prompts as a (S, gh, gw) grid. Call before `train(method, support, ...)`.
        """
        from toast_core.training.train import prepare_batch  # train imports the method base; import late

        if isinstance(support, LabeledImages):
            images, labels = support.images, support.labels
        else:
            images = support
            if labels is None:
                raise ValueError("prepare_prompts needs the labels of the support images.")
        cfg = self.config
        x = torch.cat([prepare_batch(self, images[i : i + 64]) for i in range(0, len(images), 64)])  # type: ignore[arg-type]
        imp = position_importance(
            self,  # type: ignore[arg-type]
            x,
            labels,  # type: ignore[arg-type]
            lam=cfg.lam,
            head_agg=cfg.head_agg,
            keep_top=cfg.keep_top,
            importance_head=cfg.importance_head,
            ridge_lam=cfg.ridge_lam,
            batch_size=batch_size,
        )
        targets = prompt_targets(imp, self.prompt_count(), cfg.prompt_weights)
        self.set_prompts(x, targets, imp)
        return targets.reshape(imp.shape)

    def clear_prompts(self) -> None:
        self.prompt_inputs = self.prompt_targets = self.prompt_importance = None

    def targets_for(self, x: Tensor) -> Tensor:
        """The stored prompt of each prepared input row, matched by content; refuses unknown rows."""
        if self.prompt_inputs is None or self.prompt_targets is None:
            raise RuntimeError(
                f"{self.name}: no position prompts yet — call prepare_prompts(support) before training "  # type: ignore[attr-defined]
                "(FORT's loss needs the prompt of every support image)."
            )
        rows = x.detach().float().flatten(1)
        store = self.prompt_inputs.flatten(1).to(rows.device)
        if rows.shape[1] != store.shape[1]:
            raise ValueError("Batch inputs and stored support inputs differ in size.")
        idx = torch.cdist(rows, store).argmin(dim=1)
        err = (rows - store[idx]).abs().amax(dim=1)
        bad = (err > MATCH_TOL).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"{self.name}: batch rows {bad} are not support images whose prompts were prepared "  # type: ignore[attr-defined]
                "(FORT trains on its support set only; prepare_prompts on the data you train on)."
            )
        return self.prompt_targets[idx.to(self.prompt_targets.device)]

    # --- touch points on the training step --------------------------------------------------------
    def capture_for_loss(self) -> Capture:
        base = super().capture_for_loss()  # type: ignore[misc]
        if not self.fort_active:
            return base
        depth = len(self.vit.blocks)  # type: ignore[attr-defined]
        return dataclasses.replace(base, attn_logits=_merge_layers(base.attn_logits, [depth - 1], depth))

    def forward(self, images: Tensor, capture: Capture = NOTHING) -> MethodOutput:
        out: MethodOutput = super().forward(images, capture)  # type: ignore[misc]
        out.extras["fort_input"] = images  # a reference: rows are matched to prompts only in the loss
        return out

    def extra_losses(self, output: MethodOutput, labels: Tensor) -> dict[str, Tensor]:
        losses = dict(super().extra_losses(output, labels))  # type: ignore[misc]
        if not self.fort_active:
            return losses
        last = len(self.vit.blocks) - 1  # type: ignore[attr-defined]
        if last not in output.out.attn_logits:
            raise RuntimeError("FORT's loss needs the last block's attention logits (capture_for_loss()).")
        targets = self.targets_for(output.extras["fort_input"])
        r = prompt_loss(output.out.attn_logits[last], targets, output.out.patch_start, self.config.tau)
        mass = float(self.prompt_count()) if self.config.target_mass == "P" else 1.0
        losses["fort_attention"] = self.config.fort_alpha * mass * r
        return losses

    def describe(self) -> dict[str, Any]:
        info = super().describe()  # type: ignore[misc]
        info["fort"] = {
            "prompt_patches": self.prompt_count(),
            "prompts_prepared": 0 if self.prompt_targets is None else int(self.prompt_targets.shape[0]),
            "form": "official code"
            if (self.config.head_agg, self.config.prompt_weights, self.config.target_mass) == ("min", "importance", "P")
            else f"head {self.config.head_agg}, {self.config.prompt_weights} prompts, target mass {self.config.target_mass}",
        }
        return info


# --- the registered compositions ----------------------------------------------------------------------
@dataclass
class FortFullConfig(FortSettings, FullConfig):
    """Full fine-tune + FORT; official ViT setting τ=1, α=0.03."""

    fort_alpha: float = 0.03


@dataclass
class FortLoRAConfig(FortSettings, LoRAConfig):
    """LoRA + FORT; official setting τ=1, α=0.5, LoRA on the fused qkv and on proj."""

    fort_alpha: float = 0.5
    targets: tuple[str, ...] = ("qkv", "proj")


@dataclass
class FortBitFitConfig(FortSettings, BitFitConfig):
    """BitFit + FORT (the paper's SSF-style bias/affine tuning; official SSF setting α=0.1)."""

    fort_alpha: float = 0.1


class FortFullFineTune(FortMixin, FullFineTune):
    name = "fort_full"
    config_cls = FortFullConfig


class FortLoRA(FortMixin, LoRA):
    name = "fort_lora"
    config_cls = FortLoRAConfig


class FortBitFit(FortMixin, BitFit):
    name = "fort_bitfit"
    config_cls = FortBitFitConfig


__all__ = [
    "FortBitFit",
    "FortFullFineTune",
    "FortLoRA",
    "FortMixin",
    "FortSettings",
    "default_prompt_patches",
    "position_importance",
    "prompt_loss",
    "prompt_mass",
    "prompt_targets",
    "ridge_head",
    "support_features",
]
