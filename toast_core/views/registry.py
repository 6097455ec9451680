"""Views by name (`VIEWS`, `compute_view`: the names `SteeringMethod.views()` lists) and the
difference of one view between two modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from toast_core.views.base import AttentionView
from toast_core.views.cls import cls_view
from toast_core.views.gradcam import gradcam
from toast_core.views.gradients import gradient_rollout_view
from toast_core.views.relevance import relevance_view
from toast_core.views.rollout import rollout_view
from toast_core.views.toast_views import _pass1, _pass2, selection_view

if TYPE_CHECKING:  # importing the method package here would make methods (FORT) unable to import us
    from toast_core.methods.base import SteeringMethod


VIEWS: dict[str, Callable[..., AttentionView]] = {
    "cls": cls_view,
    "rollout": rollout_view,
    "grad_rollout": gradient_rollout_view,
    "gradcam": gradcam,
    "relevance": relevance_view,
    "selection": selection_view,
    "toast_pass1": _pass1,
    "toast_pass2": _pass2,
}


def compute_view(name: str, method: SteeringMethod, x: Tensor, **kwargs: Any) -> AttentionView:
    """Any view by the names `SteeringMethod.views()` lists; keyword options go to the view."""
    if name not in VIEWS:
        raise ValueError(f"Unknown view {name!r}; known views: {', '.join(VIEWS)}.")
    return VIEWS[name](method, x, **kwargs)


def difference_view(a: AttentionView, b: AttentionView, normalise: bool = True) -> AttentionView:
    """a − b for the same view, layer and head on the same images. With `normalise`, each map is
    first scaled to unit mass per image so the difference compares where, not how much."""
    if (a.name, a.layer, a.head, a.map.shape) != (b.name, b.layer, b.head, b.map.shape):
        raise ValueError(
            f"Cannot subtract {b.name}/L{b.layer}/{b.head} {b.map.shape} from "
            f"{a.name}/L{a.layer}/{a.head} {a.map.shape}: compare the same view, layer and head."
        )

    def unit(m: np.ndarray) -> np.ndarray:
        if not normalise:
            return m
        mass = np.clip(m, 0, None).sum(axis=(1, 2), keepdims=True)
        return m / np.where(mass > 0, mass, 1.0)

    meta = {"a": a.method, "b": b.method, "normalised": normalise, "grid": a.grid}
    return AttentionView(
        f"{a.name}_diff",
        (unit(a.map) - unit(b.map)).astype(np.float32),
        a.layer,
        a.head,
        f"{a.method} − {b.method}",
        a.pred,
        a.conf,
        meta,
    )


def difference(
    method_a: SteeringMethod,
    method_b: SteeringMethod,
    x: Tensor,
    view: str = "cls",
    normalise: bool = True,
    **kwargs: Any,
) -> AttentionView:
    """The same view of two modules on the same images, subtracted (a − b)."""
    return difference_view(
        compute_view(view, method_a, x, **kwargs), compute_view(view, method_b, x, **kwargs), normalise
    )
