"""Class-specific relevance (Chefer, Gur, Wolf 2021, "Generic Attention-model Explainability"), the
gradient-weighted attention rule without LRP.

R starts as the identity over tokens; for each block in forward order Ā = E_h[(∂y_c/∂A ⊙ A)⁺] and
R ← R + Ā·R, i.e. R = Π_l (I + Ā_l): rollout's product with the maps weighted by how much the class
score depends on them. The map is the readout row (CLS, or the mean over patch rows without CLS)
over the patch columns. One forward and one backward per batch, through the method's own steered
forward, so prompts, distillation and register tokens sit where that forward put them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from toast_core.core.forward import Capture
from toast_core.views.base import (
    AttentionView,
    ViewUnavailable,
    _depth,
    _device,
    _eval_mode,
    _meta,
    _num_patches,
    _prediction,
    _target_meta,
    _targets,
    _to_grid,
    method_label,
)
from toast_core.views.rollout import _embed_tokens, rollout_readout

if TYPE_CHECKING:  # importing the method package here would make methods (FORT) unable to import us
    from toast_core.methods.base import MethodOutput, SteeringMethod


def relevance_from(maps: Sequence[Tensor], grads: Sequence[Tensor], num_prefix: int = 1) -> Tensor:
    """R (B, N, N) = Π_l (I + E_h[(∇A_l ⊙ A_l)⁺]) over post-softmax maps (B, H, N_l, N_l) and their
    gradients, forward order. A layer that ran before prompts were inserted (fewer tokens) is placed
    into the final token space with zero relevance for the absent tokens (identity in I + Ā)."""
    if not maps or len(maps) != len(grads):
        raise ValueError(f"relevance needs one gradient per map, got {len(maps)} maps, {len(grads)} grads.")
    n_total, batch = maps[-1].shape[-1], maps[-1].shape[0]
    result = torch.eye(n_total, dtype=torch.float64, device=maps[-1].device).expand(batch, -1, -1)
    for a, g in zip(maps, grads):
        cam = (g.detach().double() * a.detach().double()).clamp_min(0).mean(dim=1)
        step = cam + torch.eye(cam.shape[-1], dtype=cam.dtype, device=cam.device)
        result = _embed_tokens(step, n_total, num_prefix) @ result
    return result.float()


def _relevance(
    method: SteeringMethod, x: Tensor, target: int | Sequence[int] | Tensor | None
) -> tuple[Tensor, MethodOutput]:
    depth = _depth(method)
    with _eval_mode(method), torch.enable_grad():
        # the input carries the graph (the backbone is frozen); autograd only walks to the maps
        xg = x.detach().to(_device(method)).requires_grad_(True)
        mo = method(xg, capture=Capture(attn=True))
        maps = [mo.out.attn.get(layer) for layer in range(depth)]
        missing = [layer for layer, a in enumerate(maps) if a is None or not a.requires_grad]
        if missing:
            raise ViewUnavailable(
                f"{method_label(method)}'s forward gave no differentiable attention map for blocks {missing}."
            )
        t = _targets(target, mo.logits)
        grads = torch.autograd.grad(mo.logits.gather(1, t[:, None]).sum(), maps)
    r = relevance_from(maps, grads, int(method.vit.num_prefix_tokens))
    imp = rollout_readout(r, _num_patches(mo.out.grid), method.vit.cls_token is not None)
    return imp, mo


def relevance(
    method: SteeringMethod, x: Tensor, target: int | Sequence[int] | Tensor | None = None
) -> Tensor:
    """Patch relevance (B, gh, gw) for each image's `target` class (default: its prediction), detached."""
    imp, mo = _relevance(method, x, target)
    return imp.reshape(imp.shape[0], *mo.out.grid)


def relevance_view(
    method: SteeringMethod, x: Tensor, target: int | Sequence[int] | Tensor | None = None
) -> AttentionView:
    """`relevance` as a view (images are independent in eval mode, so a batch is one backward)."""
    imp, mo = _relevance(method, x, target)
    pred, conf = _prediction(mo.logits)
    meta = _meta(mo.out, method, target=_target_meta(target, pred), rule="chefer2021")
    return AttentionView(
        "relevance", _to_grid(imp, mo.out.grid), None, "mean", method_label(method), pred, conf, meta
    )
