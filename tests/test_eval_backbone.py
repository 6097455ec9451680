"""The backbone quality figure and focus statistics on a tiny random backbone."""

from __future__ import annotations

import torch
from PIL import Image

from toast_core.core.backbone import tiny_fixture_backbone
from toast_core.training.eval_backbone import quality_figure
from toast_core.views import focus_summary


def test_focus_summary_ratio_is_of_the_means() -> None:
    maps = torch.zeros(2, 2, 2)
    maps[0, 0, 0] = 1.0  # image 0: all attention on the top-left patch
    maps[1] = 1.0  # image 1: uniform
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # a quarter of image 0: the attended patch
    masks[1, 0, 0] = True  # one pixel of image 1 (a quarter of one 2x2-pixel patch)
    stats = focus_summary(maps, masks)
    assert stats["focus_share"] == (1.0 + 1 / 16) / 2 and stats["area_share"] == (0.25 + 1 / 16) / 2
    # ratio of the means (3.4), not the mean of per-image ratios ((4 + 1) / 2 = 2.5)
    assert stats["focus_ratio"] == stats["focus_share"] / stats["area_share"] == 3.4
    assert stats["pointing_game"] == 0.5  # image 0's peak is on its object; image 1's is not


def test_quality_figure_draws_every_scene_with_mask_and_attention(tmp_path) -> None:
    backbone = tiny_fixture_backbone(img_size=32, patch_size=8)
    path = quality_figure(backbone, tmp_path / "fig.png", per_row=2, tile=40)
    with Image.open(path) as fig:
        width, height = fig.size
    pad, label = 6, 18
    assert width == pad + 6 * (40 + pad)  # 2 scenes per row, 3 tiles each
    assert height == pad + 4 * (40 + label + pad)  # 4 source + 2 x 2 task scenes = 8 scenes
