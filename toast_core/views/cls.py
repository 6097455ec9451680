"""CLS-row attention maps: per layer × head (`ClsMaps`) and one layer's view (`cls_view`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from toast_core.core.forward import Capture, resolve_layers
from toast_core.views.base import (
    AttentionView,
    HeadSpec,
    ViewUnavailable,
    _depth,
    _meta,
    _prediction,
    _run,
    method_label,
    patch_start,
)

if TYPE_CHECKING:  # importing the method package here would make methods (FORT) unable to import us
    from toast_core.methods.base import MethodOutput, SteeringMethod


@dataclass
class ClsMaps:
    """CLS-row attention of several layers × all heads: maps (B, L, H, gh, gw)."""

    maps: np.ndarray
    layers: tuple[int, ...]
    method: str
    pred: np.ndarray
    conf: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def view(self, layer: int = -1, head: HeadSpec = "mean") -> AttentionView:
        """The map of one captured layer (negative = from the backbone's end) and one head or the mean."""
        depth = int(self.meta.get("depth", max(self.layers) + 1))
        idx = layer + depth if layer < 0 else layer
        if idx not in self.layers:
            raise ViewUnavailable(f"Layer {layer} was not captured (captured: {list(self.layers)}).")
        per_layer = self.maps[:, self.layers.index(idx)]
        m = per_layer.mean(axis=1) if head == "mean" else per_layer[:, int(head)]
        return AttentionView(
            "cls", m.astype(np.float32), idx, head, self.method, self.pred, self.conf, dict(self.meta)
        )


def _cls_rows(weights: Tensor, has_cls: bool) -> Tensor:
    """Readout row of a full map (B, H, N, N), defined exactly as the forward's `cls_attn` capture."""
    return weights[:, :, 0] if has_cls else weights.mean(dim=2)


def _cls_maps_from(
    rows: dict[int, Tensor], layers: Sequence[int], mo: MethodOutput, method: SteeringMethod
) -> ClsMaps:
    out = mo.out
    per_layer = []
    for layer in layers:
        r = rows[layer]  # (B, H, N_l)
        per_layer.append(r[..., patch_start(r.shape[-1], out) :].reshape(*r.shape[:2], *out.grid))
    maps = torch.stack(per_layer, dim=1).detach().float().cpu().numpy()
    pred, conf = _prediction(mo.logits)
    return ClsMaps(maps, tuple(layers), method_label(method), pred, conf, _meta(out, method))


def cls_maps(method: SteeringMethod, x: Tensor, layers: Sequence[int] | None = None) -> ClsMaps:
    """CLS attention (mean over queries for no-CLS models) per layer × head: `.maps` (B, L, H, gh, gw)."""
    depth = _depth(method)
    idx = sorted(resolve_layers(True if layers is None else layers, depth))
    mo = _run(method, x, Capture(cls_attn=idx))
    return _cls_maps_from(mo.out.cls_attn, idx, mo, method)


def cls_view(method: SteeringMethod, x: Tensor, layer: int = -1, head: HeadSpec = "mean") -> AttentionView:
    """CLS attention of one layer, one head or the head mean."""
    return cls_maps(method, x, [layer]).view(layer, head)
