"""TOAST's own views: the token selection mask and the pass-1 / pass-2 CLS maps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from toast_core.core.forward import Capture, SteeredOutput, steered_forward
from toast_core.views.base import (
    AttentionView,
    HeadSpec,
    ViewUnavailable,
    _depth,
    _device,
    _meta,
    _prediction,
    _run,
    _to_grid,
    method_label,
    patch_start,
)
from toast_core.views.cls import _cls_maps_from

if TYPE_CHECKING:  # importing the method package here would make methods (FORT) unable to import us
    from toast_core.methods.base import MethodOutput, SteeringMethod


def _extra(mo: MethodOutput, key: str, method: SteeringMethod) -> Any:
    if key not in mo.extras:
        raise ViewUnavailable(
            f"{method_label(method)} does not provide extras['{key}']: this view exists only for "
            "TOAST-style methods (pass-1 output in extras['pass1'], selection mask in extras['selection'])."
        )
    return mo.extras[key]


def selection_view(method: SteeringMethod, x: Tensor) -> AttentionView:
    """TOAST's token-wise selection mask m = clamp(cos(z_i, ξ), 0, 1) over the patch tokens."""
    mo = _run(method, x, Capture())
    m = _extra(mo, "selection", method).detach()
    first = mo.extras.get("pass1")
    ref = first if isinstance(first, SteeredOutput) else mo.out
    start = patch_start(m.shape[-1], ref)
    pred, conf = _prediction(mo.logits)
    return AttentionView(
        "selection",
        _to_grid(m[:, start:], ref.grid),
        None,
        None,
        method_label(method),
        pred,
        conf,
        _meta(ref, method),
    )


def toast_pass_views(
    method: SteeringMethod, x: Tensor, layer: int = -1, head: HeadSpec = "mean"
) -> tuple[AttentionView, AttentionView]:
    """Pass-1 and pass-2 CLS maps of one layer. Pass 1 is the unsteered frozen backbone; if the
    method's pass 1 stopped early (TOAST early feedback), that layer is recomputed unsteered."""
    depth = _depth(method)
    idx = layer + depth if layer < 0 else layer
    mo = _run(method, x, Capture(cls_attn=[idx]))
    first = _extra(mo, "pass1", method)
    pred, conf = _prediction(mo.logits)
    second = _cls_maps_from(mo.out.cls_attn, [idx], mo, method).view(idx, head)
    recomputed = idx not in first.cls_attn
    if recomputed:
        with torch.no_grad():
            first = steered_forward(method.vit, x.to(_device(method)), capture=Capture(cls_attn=[idx]))
    p1 = _cls_maps_from(first.cls_attn, [idx], mo, method).view(idx, head)
    p1 = AttentionView(
        "toast_pass1",
        p1.map,
        idx,
        head,
        p1.method,
        pred,
        conf,
        {**p1.meta, "recomputed_unsteered": recomputed},
    )
    p2 = AttentionView("toast_pass2", second.map, idx, head, second.method, pred, conf, second.meta)
    return p1, p2


# --- the two passes as registry entries (compute_view's "toast_pass1" / "toast_pass2") ----------


def _pass1(method: SteeringMethod, x: Tensor, layer: int = -1, head: HeadSpec = "mean") -> AttentionView:
    return toast_pass_views(method, x, layer, head)[0]


def _pass2(method: SteeringMethod, x: Tensor, layer: int = -1, head: HeadSpec = "mean") -> AttentionView:
    return toast_pass_views(method, x, layer, head)[1]
