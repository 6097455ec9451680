"""Generated data for tests, in one place: the coloured-squares task (`toast_core.data.squares`) in
the shapes the tests use, and a few-shot support set sized to a backbone. Import it as
`from data_factory import ...` (pytest puts tests/ on the path); keep data small — 32 px, a few
images per class — so the whole suite stays fast on two cores."""

from __future__ import annotations

from toast_core.core.backbone import Backbone
from toast_core.data.base import LabeledImages
from toast_core.data.squares import RGB_NAMES, coloured_squares


def rgb_squares(per_class: int = 8, size: int = 32, seed: int = 0, masks: bool = True) -> LabeledImages:
    """Red / green / blue squares on grey noise; the colour is the label, the square the mask."""
    return coloured_squares(3, per_class, size, seed, masks=masks, class_names=RGB_NAMES)


def squares(n_classes: int = 3, per_class: int = 4, size: int = 32, seed: int = 0) -> LabeledImages:
    """Up to five palette colours, classes named c0, c1, ...; masks = the square."""
    return coloured_squares(n_classes, per_class, size, seed)


def support_set(backbone: Backbone, n_classes: int = 3, per_class: int = 2) -> LabeledImages:
    """A small few-shot support set at the backbone's input size (what FORT prepares prompts on)."""
    return coloured_squares(n_classes, per_class, int(backbone.layout.img_size[0]))
