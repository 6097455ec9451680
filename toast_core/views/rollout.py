"""Attention rollout (Abnar & Zuidema) over the full token set, and its patch readout."""

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
    _meta,
    _num_patches,
    _prediction,
    _run,
    _to_grid,
    method_label,
)
from toast_core.views.cls import ClsMaps, _cls_maps_from, _cls_rows

if TYPE_CHECKING:  # importing the method package here would make methods (FORT) unable to import us
    from toast_core.methods.base import MethodOutput, SteeringMethod


def _embed_tokens(a: Tensor, n_total: int, num_prefix: int) -> Tensor:
    """Place a (B, n, n) map of a layer that ran before `n_total - n` prompt tokens existed into the
    final token space; the absent prompt tokens get identity rows (their history starts later)."""
    n = a.shape[-1]
    if n == n_total:
        return a
    index = torch.cat([torch.arange(num_prefix), torch.arange(num_prefix, n) + (n_total - n)]).to(a.device)
    full = torch.eye(n_total, dtype=a.dtype, device=a.device).expand(a.shape[0], -1, -1).clone()
    full[:, index.unsqueeze(1), index.unsqueeze(0)] = a
    return full


def attention_rollout(
    maps: Sequence[Tensor], num_prefix: int = 1, head_agg: str = "mean", residual: float = 0.5
) -> Tensor:
    """Abnar & Zuidema rollout over the FULL token set: Π_l norm(residual·I + (1-residual)·A_l).

    `maps` are the post-softmax maps (B, H, N_l, N_l) of consecutive layers in forward order; a
    layer with fewer tokens (prompts inserted later) is embedded into the final token space.
    Returns (B, N, N): row i = how much output token i draws from each input token.
    """
    if not maps:
        raise ValueError("attention_rollout needs at least one layer's attention map.")
    n_total = maps[-1].shape[-1]
    batch = maps[-1].shape[0]
    result = torch.eye(n_total, dtype=torch.float64, device=maps[-1].device).expand(batch, -1, -1)
    for weights in maps:
        a = _aggregate_heads(weights.detach().double(), head_agg)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = residual * eye + (1.0 - residual) * a
        a = a / a.sum(dim=-1, keepdim=True)
        result = _embed_tokens(a, n_total, num_prefix) @ result
    return result.float()


def rollout_readout(rollout: Tensor, num_patches: int, has_cls: bool) -> Tensor:
    """Patch importance (B, P): the CLS row (or the mean over patch rows without CLS), patch columns."""
    cols = rollout[..., -num_patches:]
    if has_cls:
        return cols[:, 0]
    return cols[:, -num_patches:].mean(dim=1)


def _rollout_view_from(
    mo: MethodOutput, method: SteeringMethod, head_agg: str, residual: float
) -> AttentionView:
    out = mo.out
    depth = _depth(method)
    missing = [l for l in range(depth) if l not in out.attn]
    if missing:
        raise ViewUnavailable(f"{method_label(method)} returned no attention maps for layers {missing}.")
    r = attention_rollout(
        [out.attn[l] for l in range(depth)], int(method.vit.num_prefix_tokens), head_agg, residual
    )
    has_cls = method.vit.cls_token is not None
    imp = rollout_readout(r, _num_patches(out.grid), has_cls)
    pred, conf = _prediction(mo.logits)
    meta = _meta(out, method, head_agg=head_agg, residual=residual)
    return AttentionView(
        "rollout", _to_grid(imp, out.grid), None, head_agg, method_label(method), pred, conf, meta
    )


def rollout_view(
    method: SteeringMethod, x: Tensor, head_agg: str = "mean", residual: float = 0.5
) -> AttentionView:
    """Attention rollout over all layers, read at the CLS row and sliced to patch columns."""
    mo = _run(method, x, Capture(attn=True))
    return _rollout_view_from(mo, method, head_agg, residual)


def cls_and_rollout(
    method: SteeringMethod, x: Tensor, head_agg: str = "mean"
) -> tuple[ClsMaps, AttentionView]:
    """One forward capturing every full map gives both the per-layer × head CLS maps and the rollout."""
    mo = _run(method, x, Capture(attn=True))
    depth = _depth(method)
    has_cls = method.vit.cls_token is not None
    rows = {l: _cls_rows(mo.out.attn[l], has_cls) for l in range(depth)}
    return _cls_maps_from(rows, list(range(depth)), mo, method), _rollout_view_from(mo, method, head_agg, 0.5)
