"""Rendering: shared vs per-map normalisation, overlay alignment at the ORIGINAL resolution,
PNG / CSV export round trips, and plotly figures on one shared colour scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from toast_core.core.backbone import tiny_fixture_backbone
from toast_core.methods.base import SteeringMethod
from toast_core.views import AttentionView, cls_view, viz

H, W = 100, 150  # original image; the model sees 32 × 32 (4 × 4 patches of 8 px)
SQUARE = (slice(28, 47), slice(80, 108))  # inside patch (1, 2): rows 25..50, cols 75..112.5


def _view(maps: np.ndarray, method: str = "m", pred: int = 1, conf: float = 0.75) -> AttentionView:
    b = maps.shape[0]
    return AttentionView(
        "cls",
        maps.astype(np.float32),
        1,
        "mean",
        method,
        np.full(b, pred, dtype=np.int64),
        np.full(b, conf, dtype=np.float32),
    )


def _scene() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((H, W, 3), 40, dtype=np.uint8)
    image[SQUARE] = 250
    hot = np.zeros((4, 4), dtype=np.float32)
    hot[1, 2] = 1.0
    return image, hot


def test_shared_normalisation_uses_the_global_range_and_per_map_its_own() -> None:
    a = np.array([[0.0, 1.0], [0.5, 0.25]])
    b = 2.0 * a
    shared = viz.normalise_maps([a, b])
    assert shared[0].max() == pytest.approx(0.5) and shared[1].max() == pytest.approx(1.0)
    per_map = viz.normalise_maps([a, b], per_map=True)
    np.testing.assert_allclose(per_map[0], per_map[1])
    thresholded = viz.normalise_maps([a], per_map=True, threshold=viz.TOAST_THRESHOLD)[0]
    assert thresholded[1, 1] == 0.0 and thresholded[1, 0] == pytest.approx(0.5)
    flat = viz.normalise_maps([np.ones((2, 2))])[0]
    assert (flat == 0).all()  # a constant map has no range: rendered cold, not NaN


def test_overlay_hot_spot_lands_in_the_square_at_original_resolution() -> None:
    image, hot = _scene()
    # the map lives on the 4 × 4 grid of the 32 × 32 model input, which is the whole image resized
    out = viz.overlay(image, hot, alpha=0.6, cmap="inferno")
    assert out.shape == (H, W, 3)
    heat = viz.heatmap_image(hot, (H, W), cmap="inferno").astype(np.float64)
    expected = 0.4 * image.astype(np.float64) + 0.6 * heat
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0
    lum = heat.mean(axis=-1)
    ys, xs = np.nonzero(lum >= 0.95 * lum.max())
    cy, cx = ys.mean(), xs.mean()
    assert SQUARE[0].start <= cy < SQUARE[0].stop and SQUARE[1].start <= cx < SQUARE[1].stop
    # blocky rendering covers exactly the patch's cell of the original image
    block = viz.upsample(hot, (H, W), smooth=False)
    ys, xs = np.nonzero(block > 0.5)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (25, 49, 75, 112)


def test_overlay_accepts_chw_tensors_and_can_leave_zero_areas_plain() -> None:
    image, hot = _scene()
    chw = torch.from_numpy(image).permute(2, 0, 1)
    out = viz.overlay(chw, hot, alpha=0.5, smooth=False, show_zero=False)
    np.testing.assert_array_equal(out[0:25], image[0:25])  # map is 0 there: the plain image
    assert not np.array_equal(out[SQUARE], image[SQUARE])


def test_comparison_png_round_trip(tmp_path) -> None:
    image, hot = _scene()
    views = [_view(hot[None], "linear"), _view(0.5 * hot[None], "toast", pred=2, conf=0.5)]
    path = viz.comparison_png(image, views, tmp_path / "cmp.png")
    png = np.asarray(Image.open(path).convert("RGB"))
    pad, label = 6, 18
    assert png.shape == (pad + label + H + pad, pad + 3 * (W + pad), 3)
    np.testing.assert_array_equal(png[pad + label : pad + label + H, pad : pad + W], image)
    tiles = viz.overlays(image, views)  # shared scale: the second map renders at half strength
    np.testing.assert_array_equal(png[pad + label : pad + label + H, 2 * pad + W : 2 * pad + 2 * W], tiles[0])
    assert not np.array_equal(tiles[0], tiles[1])
    per_map = viz.overlays(image, views, per_map=True)
    np.testing.assert_array_equal(per_map[0], per_map[1])


def test_csv_round_trip_of_a_real_view(tmp_path) -> None:
    method = SteeringMethod(tiny_fixture_backbone(img_size=(32, 48)), 3)
    view = cls_view(method, torch.randn(2, 3, 32, 48))
    path = viz.view_to_csv(view, tmp_path / "view.csv")
    back = viz.read_csv_map(path)
    np.testing.assert_array_equal(back, view.map)
    header = path.read_text().splitlines()[0]
    assert header == ",".join(viz.CSV_FIELDS)
    assert len(path.read_text().splitlines()) == 1 + 2 * 4 * 6


def test_layer_head_figure_shares_one_colour_scale() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 2, 4, 6))
    maps[2, 1, 0, 0] = 5.0
    fig = viz.layer_head_figure(maps, layers=[0, 1, 2], title="cls")
    assert len(fig.data) == 3 * 3  # heads + mean column per layer
    assert {t.coloraxis for t in fig.data} == {"coloraxis"}
    assert fig.layout.coloraxis.cmin == pytest.approx(maps.min())
    assert fig.layout.coloraxis.cmax == pytest.approx(5.0)
    assert "value" in fig.data[0].hovertemplate
    np.testing.assert_allclose(np.asarray(fig.data[2].z), maps[0].mean(axis=0))


def test_comparison_and_difference_figures() -> None:
    a = np.zeros((1, 4, 4))
    a[0, 1, 2] = 1.0
    b = np.full((1, 4, 4), 0.2)
    views = [_view(a, "linear", pred=0, conf=0.9), _view(b, "toast", pred=1, conf=0.42)]
    fig = viz.comparison_figure(views, class_names=["star", "glyph"])
    titles = [ann.text for ann in fig.layout.annotations]
    assert titles == ["linear — star (0.90)", "toast — glyph (0.42)"]
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0.0, 1.0)
    assert {t.coloraxis for t in fig.data} == {"coloraxis"}
    diff = viz.difference_figure(a - b)
    assert diff.layout.coloraxis.cmid == 0.0
    assert diff.layout.coloraxis.cmin == -diff.layout.coloraxis.cmax == pytest.approx(-0.8)


def test_unknown_colour_map_is_refused() -> None:
    with pytest.raises(ValueError, match="colour map"):
        viz.colorize(np.zeros((2, 2)), cmap="nope")


# --- drawing a focus box -------------------------------------------------------------------------
def test_drawn_box_becomes_whole_clipped_pixels() -> None:
    def drawn(xs: list[float], ys: list[float]) -> dict:
        return {"points": [], "point_indices": [], "box": [{"xref": "x", "yref": "y", "x": xs, "y": ys}], "lasso": []}

    assert viz.box_from_selection(drawn([16.4, 79.6], [31.7, 96.2]), (160, 200)) == (16, 32, 80, 96)
    # dragged right to left, bottom to top, and past the image's edges
    assert viz.box_from_selection(drawn([250.0, 180.2], [-9.0, 10.0]), (160, 200)) == (180, 0, 200, 10)
    assert viz.box_from_selection(drawn([5.1, 5.3], [0.0, 9.0]), (160, 200)) is None  # no whole pixel
    assert viz.box_from_selection({"points": [], "box": [], "lasso": []}, (160, 200)) is None
    assert viz.box_from_selection(None, (160, 200)) is None
    assert viz.box_from_selection({"box": [{"x": ["a", 1], "y": [0, 1]}]}, (160, 200)) is None


def test_box_picker_maps_image_pixels_to_axis_units() -> None:
    rgb = np.zeros((900, 1200, 3), np.uint8)
    fig = viz.box_picker_figure(rgb, (10, 20, 300, 400), display_side=300)
    image, anchors = fig.data
    assert image.source.startswith("data:image/png;base64,")  # downscaled, not a 900×1200 JSON array
    # a 300 × 225 PNG whose pixels span 4 original pixels each: axis units are original pixel edges
    assert (image.dx, image.dy, image.x0, image.y0) == (4.0, 4.0, 2.0, 2.0)
    assert tuple(fig.layout.xaxis.range) == (0, 1200) and tuple(fig.layout.yaxis.range) == (900, 0)
    assert fig.layout.dragmode == "select" and len(anchors.x) == 24 * 24
    assert 0 < min(anchors.x) and max(anchors.x) < 1200 and 0 < min(anchors.y) and max(anchors.y) < 900
    (rect,) = fig.layout.shapes
    assert (rect.x0, rect.y0, rect.x1, rect.y1) == (10, 20, 300, 400)
    assert viz.box_picker_figure(rgb, None).layout.shapes == ()


def test_focus_region_is_drawn_on_every_overlay() -> None:
    from toast_core.views.compare import BOX_COLOUR, ModuleView, overlay_tiles

    rgb = np.zeros((64, 64, 3), np.uint8)
    view = AttentionView("cls", np.zeros((1, 4, 4), np.float32), None, "mean", "m", np.zeros(1, int), np.ones(1))
    views = [ModuleView("a", "A", view), ModuleView("b", "B", None, error="no map"), ModuleView("c", "C", view)]
    mask = np.zeros((64, 64), bool)
    mask[16:48, 20:40] = True
    outlined = overlay_tiles(rgb, views, alpha=0.0, outline=mask)
    boxed = overlay_tiles(rgb, views, alpha=0.0, box=(20, 16, 39, 47))
    assert len(outlined) == len(boxed) == 2  # one per module with a map
    white = np.all(outlined[0] == BOX_COLOUR, axis=-1)
    assert white[16, 30] and white[47, 30] and white[30, 20] and white[30, 39]  # the mask's border
    assert not white[30, 30] and not white[5, 5]  # not its inside, not elsewhere
    assert np.array_equal(white, np.all(boxed[1] == BOX_COLOUR, axis=-1))  # the same rectangle as a box
    plain = overlay_tiles(rgb, views, alpha=0.0)[0]
    assert np.array_equal(plain, overlay_tiles(rgb, views, alpha=0.0, outline=np.zeros_like(mask))[0])
