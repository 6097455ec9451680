"""Views: where a steering module makes the frozen ViT look, and how well that falls on a region.

One job per module, read in this order:
- `base`: the `AttentionView` result, `ViewUnavailable`, the forward plumbing every view shares;
- `cls`: CLS-row attention per layer × head; `rollout`: attention rollout;
- `gradients`: FORT's gradient rollout; `gradcam`: Grad-CAM (captum or autograd);
- `toast_views`: TOAST's selection mask and pass-1 / pass-2 maps;
- `relevance`: class-specific relevance (Chefer et al. 2021's gradient-weighted rule);
- `faithfulness`: MoRF / LeRF deletion curves of any map, their areas, a data-set summary;
- `registry`: views by name (`compute_view`) and differences between two modules;
- `focus`: focus metrics against a mask or box (`focus_summary` is what every table reports).
Import from `toast_core.views`; the submodules are where to read (and where a new view goes).
Over the views, imported as submodules (not re-exported here): `viz` renders them (overlays, figures,
CSV) and `compare` is the page-facing comparison API (every chosen module's view of one image).
"""

from toast_core.views.base import AttentionView, HeadSpec, ViewUnavailable, method_label, patch_start
from toast_core.views.cls import ClsMaps, cls_maps, cls_view
from toast_core.views.faithfulness import (
    DeletionCurves,
    deletion_curves,
    faithfulness_curves,
    faithfulness_summary,
    rank_patches,
)
from toast_core.views.focus import (
    Region,
    area_share,
    entropy,
    focus_metrics,
    focus_ratio,
    focus_share,
    focus_summary,
    pointing_game,
    region_to_grid,
)
from toast_core.views.gradcam import gradcam, is_single_pass
from toast_core.views.gradients import (
    fort_gradient_direction,
    gradient_rollout,
    gradient_rollout_from,
    gradient_rollout_view,
)
from toast_core.views.registry import VIEWS, compute_view, difference, difference_view
from toast_core.views.relevance import relevance, relevance_from, relevance_view
from toast_core.views.rollout import attention_rollout, cls_and_rollout, rollout_readout, rollout_view
from toast_core.views.toast_views import selection_view, toast_pass_views

__all__ = [
    "VIEWS",
    "AttentionView",
    "ClsMaps",
    "DeletionCurves",
    "HeadSpec",
    "Region",
    "ViewUnavailable",
    "area_share",
    "attention_rollout",
    "cls_and_rollout",
    "cls_maps",
    "cls_view",
    "compute_view",
    "deletion_curves",
    "difference",
    "difference_view",
    "entropy",
    "faithfulness_curves",
    "faithfulness_summary",
    "focus_metrics",
    "focus_ratio",
    "focus_share",
    "focus_summary",
    "fort_gradient_direction",
    "gradcam",
    "gradient_rollout",
    "gradient_rollout_from",
    "gradient_rollout_view",
    "is_single_pass",
    "method_label",
    "patch_start",
    "pointing_game",
    "rank_patches",
    "region_to_grid",
    "relevance",
    "relevance_from",
    "relevance_view",
    "rollout_readout",
    "rollout_view",
    "selection_view",
    "toast_pass_views",
]
