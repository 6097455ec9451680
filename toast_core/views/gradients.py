"""Gradient rollout (FORT's importance, methods.md §6 steps 1-3): the gradient direction G and the
λ-weighted rollout over patch→patch maps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from toast_core.core.forward import Capture
from toast_core.views.base import (
    AttentionView,
    ViewUnavailable,
    _aggregate_heads,
    _depth,
    _device,
    _eval_mode,
    _meta,
    _num_patches,
    _prediction,
    _target_meta,
    _targets,
    method_label,
)

if TYPE_CHECKING:  # importing the method package here would make methods (FORT) unable to import us
    from toast_core.methods.base import MethodOutput, SteeringMethod


def fort_gradient_direction(grad_patches: Tensor) -> Tensor:
    """G (B, P): per image, centre the patch-token gradients over tokens and project them onto their
    first right-singular vector (FORT's `get_first_comp`). The sign is arbitrary here."""
    g = torch.nan_to_num(grad_patches.detach().double())
    g = g - g.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(g, full_matrices=False)
    return (g @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)


def gradient_rollout_from(
    patch_maps: Sequence[Tensor],
    g: Tensor | None = None,
    lam: float = 1.0,
    head_agg: str = "mean",
    keep_top: float = 0.1,
) -> Tensor:
    """FORT step 3 on patch→patch maps (B, H, P, P), forward order: per layer aggregate heads, add
    λ·G to every row, keep the top `keep_top` share per row (official rounding: zero the
    int(P·(1-keep_top)) smallest), add identity, row-normalise; multiply the layers; importance =
    mean over rows of the product. Returns (B, P)."""
    if not patch_maps:
        raise ValueError("gradient_rollout_from needs at least one layer's attention map.")
    batch, _, p, _ = patch_maps[0].shape
    device = patch_maps[0].device
    n_zero = int(p * (1.0 - keep_top))
    keep = max(1, p - n_zero)
    eye = torch.eye(p, dtype=torch.float64, device=device)
    result = eye.expand(batch, -1, -1)
    for weights in patch_maps:
        a = _aggregate_heads(weights.detach().double(), head_agg)
        if g is not None and lam != 0:
            a = a + lam * g.to(a).unsqueeze(1)
        top_vals, top_idx = a.topk(keep, dim=-1)
        a = torch.zeros_like(a).scatter_(-1, top_idx, top_vals) + eye
        s = a.sum(dim=-1, keepdim=True)
        s = torch.where(s.abs() < 1e-12, torch.full_like(s, 1e-12), s)
        result = (a / s) @ result
    return result.mean(dim=1).float()


def _gradient_rollout(
    method: SteeringMethod,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None,
    lam: float,
    head_agg: str,
    keep_top: float,
) -> tuple[Tensor, MethodOutput]:
    depth = _depth(method)
    with _eval_mode(method), torch.enable_grad():
        xg = x.detach().to(_device(method)).requires_grad_(True)
        mo = method(xg, capture=Capture(attn=True, block_inputs=[depth - 1]))
        out = mo.out
        if depth - 1 not in out.block_inputs or len(out.attn) < depth:
            raise ViewUnavailable(f"{method_label(method)}'s forward did not honour the capture spec.")
        h = out.block_inputs[depth - 1]
        t = _targets(target, mo.logits)
        (grad,) = torch.autograd.grad(mo.logits.gather(1, t[:, None]).sum(), h)
    p = _num_patches(out.grid)
    maps = [out.attn[l].detach()[..., -p:, -p:] for l in range(depth)]
    g = fort_gradient_direction(grad[:, -p:])
    base = gradient_rollout_from(maps, None, 0.0, head_agg, keep_top).double()
    sign = torch.sign((g * (base - base.mean(dim=1, keepdim=True))).sum(dim=1, keepdim=True))
    g = g * torch.where(sign == 0, torch.ones_like(sign), sign)
    imp = gradient_rollout_from(maps, g, lam, head_agg, keep_top)
    return imp.reshape(imp.shape[0], *out.grid), mo


def gradient_rollout(
    method: SteeringMethod,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    lam: float = 1.0,
    head_agg: str = "mean",
    keep_top: float = 0.1,
) -> Tensor:
    """FORT's patch importance (B, gh, gw), on the method's device, detached.

    One forward captures every post-softmax map and the input of the last block; the gradient of
    each image's `target` logit (default: its prediction) w.r.t. that input gives G
    (`fort_gradient_direction`), signed so that Σ G·importance_λ=0 ≥ 0 (the official code leaves the
    sign arbitrary). Each image uses its own gradient (the official code backprops the batch mean,
    which scales G by 1/B). head_agg: "mean" (paper) or "min" (official code).
    """
    return _gradient_rollout(method, x, target, lam, head_agg, keep_top)[0]


def gradient_rollout_view(
    method: SteeringMethod,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    lam: float = 1.0,
    head_agg: str = "mean",
    keep_top: float = 0.1,
) -> AttentionView:
    """`gradient_rollout` as a view."""
    imp, mo = _gradient_rollout(method, x, target, lam, head_agg, keep_top)
    pred, conf = _prediction(mo.logits)
    meta = _meta(mo.out, method, lam=lam, keep_top=keep_top, target=_target_meta(target, pred))
    return AttentionView(
        "grad_rollout", imp.float().cpu().numpy(), None, head_agg, method_label(method), pred, conf, meta
    )
