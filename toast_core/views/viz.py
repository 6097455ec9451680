"""Rendering of attention views: overlays on the original image, plotly figures, PNG and CSV export.

Maps live on the patch grid; overlays upsample them to the ORIGINAL image size (the model input is
a plain resize of the whole image, so the grid spans the original image exactly). Maps that are
compared share one normalisation (global min/max over the set) unless per-map scaling is asked for.
PNG export composes with Pillow (no kaleido); plotly figures are for the app.
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image, ImageDraw, ImageFont
from plotly.subplots import make_subplots

from toast_core.views import AttentionView

COLORMAPS: dict[str, int] = {
    "jet": cv2.COLORMAP_JET,
    "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "magma": cv2.COLORMAP_MAGMA,
    "turbo": cv2.COLORMAP_TURBO,
    "hot": cv2.COLORMAP_HOT,
}
TOAST_THRESHOLD = 0.3  # the official TOAST figures zero values below 0.3 after min-max


def _as_map(m: AttentionView | np.ndarray | torch.Tensor, index: int = 0) -> np.ndarray:
    """A single (gh, gw) float map from a view (image `index`), an array or a tensor."""
    if isinstance(m, AttentionView):
        m = m.map[index]
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    m = np.asarray(m, dtype=np.float64)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"Expected one (gh, gw) map, got shape {m.shape}.")
    return m


def as_rgb(image: np.ndarray | torch.Tensor | Image.Image) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from a PIL image, an HWC/CHW uint8 array or tensor."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def normalise_maps(
    maps: Sequence[AttentionView | np.ndarray | torch.Tensor],
    per_map: bool = False,
    threshold: float | None = None,
    index: int = 0,
) -> list[np.ndarray]:
    """Scale maps to [0, 1]: one global min/max over the whole set (default, so maps compare), or
    min-max per map. `threshold` then zeroes values below it (TOAST figure style: 0.3)."""
    arrays = [_as_map(m, index) for m in maps]
    if not arrays:
        return []
    if per_map:
        bounds = [(float(a.min()), float(a.max())) for a in arrays]
    else:
        lo = min(float(a.min()) for a in arrays)
        hi = max(float(a.max()) for a in arrays)
        bounds = [(lo, hi)] * len(arrays)
    out = []
    for a, (lo, hi) in zip(arrays, bounds):
        n = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        if threshold is not None:
            n = np.where(n < threshold, 0.0, n)
        out.append(n.astype(np.float32))
    return out


def upsample(map01: np.ndarray, size: tuple[int, int], smooth: bool = True) -> np.ndarray:
    """Patch-grid map -> (H, W) at the original image size; patch (i, j) covers rows
    [i·H/gh, (i+1)·H/gh) and columns [j·W/gw, (j+1)·W/gw). Bilinear (pixel-centre aligned) or blocky."""
    h, w = size
    interp = cv2.INTER_LINEAR if smooth else cv2.INTER_NEAREST
    return cv2.resize(np.asarray(map01, dtype=np.float32), (int(w), int(h)), interpolation=interp)


def colorize(map01: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """[0, 1] map -> RGB uint8 with an OpenCV colour map."""
    if cmap not in COLORMAPS:
        raise ValueError(f"Unknown colour map {cmap!r}; choose from {', '.join(COLORMAPS)}.")
    u8 = np.clip(np.asarray(map01) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, COLORMAPS[cmap]), cv2.COLOR_BGR2RGB)


def heatmap_image(
    map01: np.ndarray, size: tuple[int, int], cmap: str = "jet", smooth: bool = True
) -> np.ndarray:
    """A normalised patch map rendered as an RGB heat map of `size` (H, W)."""
    return colorize(upsample(map01, size, smooth), cmap)


def overlay(
    image: np.ndarray | torch.Tensor | Image.Image,
    map01: np.ndarray,
    alpha: float = 0.5,
    cmap: str = "jet",
    smooth: bool = True,
    show_zero: bool = True,
) -> np.ndarray:
    """Blend a normalised [0, 1] patch map onto the ORIGINAL image: (1-α)·image + α·heat.

    With `show_zero=False`, pixels where the (thresholded) map is 0 show the plain image.
    """
    rgb = as_rgb(image)
    size = rgb.shape[:2]
    up = upsample(map01, size, smooth)
    heat = colorize(up, cmap).astype(np.float32)
    a = np.full(size, float(alpha), dtype=np.float32)
    if not show_zero:
        a = np.where(up > 0, a, 0.0)
    blended = (1.0 - a[..., None]) * rgb.astype(np.float32) + a[..., None] * heat
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def overlays(
    image: np.ndarray | torch.Tensor | Image.Image,
    maps: Sequence[AttentionView | np.ndarray | torch.Tensor],
    per_map: bool = False,
    threshold: float | None = None,
    index: int = 0,
    **kwargs: float | str | bool,
) -> list[np.ndarray]:
    """Overlays of several maps of the same image with one shared normalisation (or per map)."""
    return [overlay(image, m, **kwargs) for m in normalise_maps(maps, per_map, threshold, index)]  # type: ignore[arg-type]


def draw_outline(
    tile: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """A copy of `tile` with the border of `mask` (a pixel mask of the tile's size) drawn on; the
    line thickens with the tile so it stays visible on large images."""
    if mask is None or not np.any(mask):
        return tile
    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.ascontiguousarray(tile.copy())
    cv2.drawContours(out, contours, -1, colour, max(1, round(min(out.shape[:2]) / 120)))
    return out


# --- plotly figures -----------------------------------------------------------------------------


def _bounds(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    return min(float(np.min(a)) for a in arrays), max(float(np.max(a)) for a in arrays)


def _heatmap(z: np.ndarray, name: str, coloraxis: str = "coloraxis") -> go.Heatmap:
    rows, cols = z.shape
    return go.Heatmap(
        z=z,
        x=list(range(cols)),
        y=list(range(rows)),
        coloraxis=coloraxis,
        name=name,
        hovertemplate=f"{name}<br>row %{{y}}, col %{{x}}<br>value %{{z:.4f}}<extra></extra>",
    )


def _square_axes(fig: go.Figure, n: int) -> None:
    for i in range(1, n + 1):
        suffix = "" if i == 1 else str(i)
        fig.layout[f"yaxis{suffix}"].update(
            autorange="reversed", scaleanchor=f"x{suffix}", showticklabels=False
        )
        fig.layout[f"xaxis{suffix}"].update(showticklabels=False)


def layer_head_figure(
    maps: np.ndarray,
    layers: Sequence[int],
    title: str = "",
    include_mean: bool = True,
    colorscale: str = "Viridis",
) -> go.Figure:
    """A layer × head grid of CLS maps (L, H, gh, gw) for one image, plus a head-mean column, on one
    shared colour scale (zmin/zmax over the whole grid), with hover values."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 4:
        raise ValueError(f"Expected (L, H, gh, gw) maps, got shape {maps.shape}.")
    n_layers, n_heads = maps.shape[:2]
    cols = n_heads + int(include_mean)
    grid = [
        [maps[i, j] for j in range(n_heads)] + ([maps[i].mean(axis=0)] if include_mean else [])
        for i in range(n_layers)
    ]
    zmin, zmax = _bounds([z for row in grid for z in row])
    labels = [f"head {j}" for j in range(n_heads)] + (["mean"] if include_mean else [])
    fig = make_subplots(
        rows=n_layers,
        cols=cols,
        column_titles=labels,
        row_titles=[f"layer {l}" for l in layers],
        horizontal_spacing=0.01,
        vertical_spacing=0.01,
    )
    for i, row in enumerate(grid):
        for j, z in enumerate(row):
            fig.add_trace(_heatmap(z, f"layer {layers[i]}, {labels[j]}"), row=i + 1, col=j + 1)
    fig.update_layout(title=title, coloraxis=dict(colorscale=colorscale, cmin=zmin, cmax=zmax))
    _square_axes(fig, n_layers * cols)
    return fig


def comparison_figure(
    views: Sequence[AttentionView],
    index: int = 0,
    class_names: Sequence[str] | None = None,
    colorscale: str = "Viridis",
) -> go.Figure:
    """Side-by-side maps of several modules on one image, one shared colour scale, titled
    "method — pred (conf)"."""
    if not views:
        raise ValueError("comparison_figure needs at least one view.")
    zs = [np.asarray(v.map[index], dtype=np.float64) for v in views]
    zmin, zmax = _bounds(zs)
    titles = [v.title(index, class_names) for v in views]
    fig = make_subplots(rows=1, cols=len(views), subplot_titles=titles, horizontal_spacing=0.02)
    for j, (v, z) in enumerate(zip(views, zs)):
        fig.add_trace(_heatmap(z, v.method), row=1, col=j + 1)
    fig.update_layout(
        title=f"{views[0].name}" + (f" (layer {views[0].layer})" if views[0].layer is not None else ""),
        coloraxis=dict(colorscale=colorscale, cmin=zmin, cmax=zmax),
    )
    _square_axes(fig, len(views))
    return fig


def difference_figure(
    diff: AttentionView | np.ndarray, index: int = 0, title: str | None = None
) -> go.Figure:
    """A difference map on a diverging scale centred at 0 (symmetric limits)."""
    z = _as_map(diff, index)
    lim = float(np.abs(z).max()) or 1.0
    name = diff.method if isinstance(diff, AttentionView) else "difference"
    fig = go.Figure(_heatmap(z, name))
    fig.update_layout(
        title=title if title is not None else name,
        coloraxis=dict(colorscale="RdBu_r", cmin=-lim, cmax=lim, cmid=0.0),
    )
    _square_axes(fig, 1)
    return fig


def box_picker_figure(
    rgb: np.ndarray, box: tuple[int, int, int, int] | None = None, display_side: int = 320
) -> go.Figure:
    """The image on axes in ORIGINAL pixel-edge coordinates, ready for a drag-to-select box.

    Plotly only offers box selection over selectable points, so an invisible grid of markers covers
    the image; the selection's own x/y range is what `box_from_selection` reads, not the points.
    The image travels as a downscaled PNG (a 4000-px upload would otherwise be a JSON array)."""
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    scale = min(1.0, display_side / max(h, w))
    shown = rgb if scale == 1.0 else cv2.resize(
        rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    buf = io.BytesIO()
    Image.fromarray(shown).save(buf, format="PNG")
    dx, dy = w / shown.shape[1], h / shown.shape[0]
    fig = go.Figure(
        go.Image(
            source="data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
            x0=dx / 2, y0=dy / 2, dx=dx, dy=dy, hoverinfo="skip",
        )
    )
    n = 24  # selectable anchors per side: enough that any drawn box holds some
    xs, ys = np.meshgrid((np.arange(n) + 0.5) * w / n, (np.arange(n) + 0.5) * h / n)
    fig.add_trace(
        go.Scatter(
            x=xs.ravel(), y=ys.ravel(), mode="markers", marker=dict(size=4, opacity=0),
            hoverinfo="skip", showlegend=False,
        )
    )
    if box is not None:
        x0, y0, x1, y1 = box
        fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, line=dict(color="#ff2b2b", width=2))
    fig.update_layout(
        dragmode="select", margin=dict(l=0, r=0, t=0, b=0), height=display_side,
        xaxis=dict(range=[0, w], visible=False),
        yaxis=dict(range=[h, 0], scaleanchor="x", visible=False),
    )
    return fig


def box_from_selection(
    selection: Mapping[str, Any] | None, image_size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """The first drawn box of a plotly selection state, as whole image pixels (x0, y0, x1, y1)
    clipped to the image; None when nothing was drawn or the box covers no pixel."""
    boxes = selection.get("box") if selection else None
    if not boxes:
        return None
    h, w = image_size
    try:
        xs, ys = [float(v) for v in boxes[0]["x"]], [float(v) for v in boxes[0]["y"]]
    except (KeyError, TypeError, ValueError):
        return None
    if len(xs) != 2 or len(ys) != 2:
        return None
    x0, x1 = (int(np.clip(round(v), 0, w)) for v in sorted(xs))
    y0, y1 = (int(np.clip(round(v), 0, h)) for v in sorted(ys))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


# --- PNG and CSV export -------------------------------------------------------------------------


def compose_grid(
    images: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    ncols: int | None = None,
    pad: int = 6,
    label_height: int = 18,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile RGB images (all the same size) into one labelled grid with Pillow."""
    if not images:
        raise ValueError("compose_grid needs at least one image.")
    tiles = [as_rgb(im) for im in images]
    h, w = tiles[0].shape[:2]
    if any(t.shape[:2] != (h, w) for t in tiles):
        tiles = [cv2.resize(t, (w, h), interpolation=cv2.INTER_AREA) for t in tiles]
    ncols = ncols or len(tiles)
    nrows = -(-len(tiles) // ncols)
    lh = label_height if labels else 0
    canvas = Image.new("RGB", (pad + ncols * (w + pad), pad + nrows * (h + lh + pad)), background)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, tile in enumerate(tiles):
        r, c = divmod(k, ncols)
        x, y = pad + c * (w + pad), pad + r * (h + lh + pad)
        if labels:
            draw.text((x, y + 2), str(labels[k]), fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(tile), (x, y + lh))
    return canvas


def comparison_png(
    image: np.ndarray | torch.Tensor | Image.Image,
    views: Sequence[AttentionView],
    path: str | Path,
    index: int = 0,
    class_names: Sequence[str] | None = None,
    per_map: bool = False,
    threshold: float | None = None,
    include_image: bool = True,
    **kwargs: float | str | bool,
) -> Path:
    """Write a labelled PNG: the image, then each view's overlay (shared normalisation by default)."""
    rgb = as_rgb(image)
    tiles = overlays(rgb, views, per_map=per_map, threshold=threshold, index=index, **kwargs)
    labels = [v.title(index, class_names) for v in views]
    if include_image:
        tiles, labels = [rgb, *tiles], ["image", *labels]
    out = Path(path)
    compose_grid(tiles, labels).save(out, format="PNG")
    return out


CSV_FIELDS = ("view", "method", "layer", "head", "image", "row", "col", "value")


def view_to_csv(view: AttentionView, path: str | Path) -> Path:
    """One line per image × patch: view, method, layer, head, image, row, col, value."""
    out = Path(path)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        b, gh, gw = view.map.shape
        for i in range(b):
            for r in range(gh):
                for c in range(gw):
                    writer.writerow(
                        [
                            view.name,
                            view.method,
                            "" if view.layer is None else view.layer,
                            "" if view.head is None else view.head,
                            i,
                            r,
                            c,
                            repr(float(view.map[i, r, c])),
                        ]
                    )
    return out


def read_csv_map(path: str | Path) -> np.ndarray:
    """The (B, gh, gw) map back from `view_to_csv` output."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path} holds no map values.")
    b = 1 + max(int(r["image"]) for r in rows)
    gh = 1 + max(int(r["row"]) for r in rows)
    gw = 1 + max(int(r["col"]) for r in rows)
    out = np.full((b, gh, gw), np.nan, dtype=np.float32)
    for r in rows:
        out[int(r["image"]), int(r["row"]), int(r["col"])] = float(r["value"])
    return out


#: line style of each deletion order (views.faithfulness.ORDERS)
ORDER_DASH = {"morf": "solid", "lerf": "dash", "random": "dot"}
ORDER_NAMES = {"morf": "MoRF", "lerf": "LeRF", "random": "random"}


def deletion_figure(curves: Sequence[Any], labels: Sequence[str] | None = None, title: str = "") -> go.Figure:
    """Deletion curves (`views.DeletionCurves`, batch mean) of several modules on one figure: one
    colour per module, one line style per order (MoRF solid, LeRF dashed, random dotted)."""
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
    fig = go.Figure()
    for i, c in enumerate(curves):
        label = labels[i] if labels is not None else c.method
        colour = palette[i % len(palette)]
        for order, probs in c.probs.items():
            fig.add_trace(go.Scatter(
                x=c.fractions, y=probs.mean(axis=0), mode="lines", legendgroup=label,
                name=f"{label} · {ORDER_NAMES.get(order, order)}",
                line=dict(color=colour, dash=ORDER_DASH.get(order, "solid"), width=2),
            ))  # fmt: skip
    fig.update_layout(
        title=title or None, xaxis_title="share of patches deleted", yaxis_title="probability of the predicted class",
        yaxis=dict(range=[0, 1.02]), xaxis=dict(range=[0, 1]), legend=dict(font=dict(size=11)),
        margin=dict(l=10, r=10, t=40 if title else 10, b=10), height=380,
    )  # fmt: skip
    return fig
