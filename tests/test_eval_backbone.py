"""The backbone quality figure and focus statistics on a tiny random backbone."""

from __future__ import annotations

import torch
from PIL import Image

from toast_core.backbone import tiny_fixture_backbone
from toast_core.eval_backbone import focus_stats, quality_figure


def test_focus_stats_ratio_is_share_over_area() -> None:
    maps = torch.zeros(1, 2, 2)
    maps[0, 0, 0] = 1.0  # all attention on the top-left patch
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # the object is that patch: a quarter of the image
    stats = focus_stats(maps, masks)
    assert stats["focus_share"] == 1.0 and stats["area_share"] == 0.25 and stats["focus_ratio"] == 4.0


def test_quality_figure_draws_every_scene_with_mask_and_attention(tmp_path) -> None:
    backbone = tiny_fixture_backbone(img_size=32, patch_size=8)
    path = quality_figure(backbone, tmp_path / "fig.png", per_row=2, tile=40)
    with Image.open(path) as fig:
        width, height = fig.size
    pad, label = 6, 18
    assert width == pad + 6 * (40 + pad)  # 2 scenes per row, 3 tiles each
    assert height == pad + 4 * (40 + label + pad)  # 4 source + 2 x 2 task scenes = 8 scenes
