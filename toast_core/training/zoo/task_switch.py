"""Task-dependent attention (the TOAST papers' signature figure), measured on the zoo.

On scenes that hold one star and one digit (`data.mixed.make_mixed_split`), each method's stars
module and glyphs module look at the same images. Top-down steering should move attention with the
task: onto the star under the stars module, onto the digit under the glyphs module. A linear probe
cannot (both its modules share the frozen backbone's attention), so its switch is exactly 0.

switch = mean over images of (focus on the star under the stars module − under the glyphs module)
       + (focus on the digit under the glyphs module − under the stars module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toast_core.core.backbone import Backbone
from toast_core.training.zoo.build import ZOO_DIR
from toast_core.training.zoo.catalog import load_entry, zoo_entries

#: the zoo entries compared (each needs a stars and a glyphs module)
SWITCH_ENTRIES = ("toast", "toast_lite", "lora", "vpt_deep", "full", "bitfit", "linear")


def _focus(method: Any, images: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    from toast_core.training.train import view_over
    from toast_core.views import focus_share

    view = view_over(method, images, "cls", 64, layer=-1, head="mean")
    return np.asarray(focus_share(view.map, masks), dtype=np.float64), np.asarray(view.pred)


def switch_scores(backbone: Backbone, data: Any, root: Path = ZOO_DIR,
                  entries: tuple[str, ...] = SWITCH_ENTRIES) -> dict[str, dict[str, np.ndarray]]:
    """Per image, for each entry shipped for both tasks: focus on the star and on the digit under its
    stars module and its glyphs module, both modules' predictions, and the switch."""
    by_key = {(e.task, e.entry): e for e in zoo_entries(backbone, root)}
    out: dict[str, dict[str, np.ndarray]] = {}
    for entry in entries:
        if ("stars", entry) not in by_key or ("glyphs", entry) not in by_key:
            continue
        star_mod = load_entry(by_key[("stars", entry)], backbone)
        digit_mod = load_entry(by_key[("glyphs", entry)], backbone)
        s_star, s_pred = _focus(star_mod, data.images, data.star_masks)
        s_digit, _ = _focus(star_mod, data.images, data.digit_masks)
        g_star, g_pred = _focus(digit_mod, data.images, data.star_masks)
        g_digit, _ = _focus(digit_mod, data.images, data.digit_masks)
        out[entry] = {"s_star": s_star, "s_digit": s_digit, "g_star": g_star, "g_digit": g_digit,
                      "s_pred": s_pred, "g_pred": g_pred, "switch": (s_star - g_star) + (g_digit - s_digit)}
    return out


def task_switch(backbone: Backbone, n: int = 400, root: Path = ZOO_DIR, seed: int = 0) -> list[dict[str, Any]]:
    """One row per entry shipped for both tasks: switch (mean, 95% CI, n), focus on star and digit
    under each module, and each module's accuracy on its own object of the mixed scenes."""
    from toast_core.data.mixed import make_mixed_split
    from toast_core.training.fewshot import mean_ci95

    data = make_mixed_split(n, seed)
    rows = []
    for entry, v in switch_scores(backbone, data, root).items():
        mean, half = mean_ci95(v["switch"].tolist())
        rows.append({
            "entry": entry, "switch": mean, "switch_ci": half, "n": n,
            "star_focus_stars": float(v["s_star"].mean()), "star_focus_glyphs": float(v["g_star"].mean()),
            "digit_focus_glyphs": float(v["g_digit"].mean()), "digit_focus_stars": float(v["s_digit"].mean()),
            "stars_acc_on_star": float((v["s_pred"] == data.star_labels.numpy()).mean()),
            "glyphs_acc_on_digit": float((v["g_pred"] == data.digit_labels.numpy()).mean()),
        })
    return rows
