"""Focus metrics: how much of a map's mass falls on a region (mask or box), against chance.

`focus_summary` is the one statistic every table and card in the lab reports.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from toast_core.views.base import AttentionView

Region = Any  # a pixel mask (H, W) / (B, H, W) (numpy or torch), or a box (x0, y0, x1, y1)


def _overlap(n_cells: int, length: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(n_cells, len(lo)) overlap length of grid cell i (of `n_cells` over [0, length]) with [lo, hi]."""
    edges = np.arange(n_cells + 1, dtype=np.float64) * (length / n_cells)
    a = np.maximum(edges[:-1, None], lo[None, :])
    b = np.minimum(edges[1:, None], hi[None, :])
    return np.clip(b - a, 0.0, None)


def region_to_grid(
    region: Region, grid: tuple[int, int], image_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Area fraction of each patch covered by a region: (gh, gw) or (B, gh, gw) in [0, 1].

    A pixel mask (any resolution; it spans the whole image) is averaged exactly per patch; a box
    (x0, y0, x1, y1) in pixels of the ORIGINAL image (size `image_size` = (H, W)) likewise.
    """
    gh, gw = grid
    if isinstance(region, tuple | list) and len(region) == 4 and np.ndim(region[0]) == 0:
        if image_size is None:
            raise ValueError("A box needs image_size=(H, W) of the image it was drawn on.")
        h, w = image_size
        x0, y0, x1, y1 = (float(v) for v in region)
        x0, x1 = sorted((max(0.0, min(x0, w)), max(0.0, min(x1, w))))
        y0, y1 = sorted((max(0.0, min(y0, h)), max(0.0, min(y1, h))))
        oy = _overlap(gh, h, np.array([y0]), np.array([y1]))[:, 0]
        ox = _overlap(gw, w, np.array([x0]), np.array([x1]))[:, 0]
        return (np.outer(oy, ox) / ((h / gh) * (w / gw))).astype(np.float32)
    mask = region.detach().cpu().numpy() if isinstance(region, Tensor) else np.asarray(region)
    mask = mask.astype(np.float64)
    if mask.ndim not in (2, 3):
        raise ValueError(f"A mask must be (H, W) or (B, H, W), got shape {mask.shape}.")
    h, w = mask.shape[-2:]
    pix_y, pix_x = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    oy = _overlap(gh, h, pix_y, pix_y + 1)  # (gh, H)
    ox = _overlap(gw, w, pix_x, pix_x + 1)  # (gw, W)
    frac = oy @ mask @ ox.T / ((h / gh) * (w / gw))
    return np.clip(frac, 0.0, 1.0).astype(np.float32)


def _map_and_weights(
    attn: AttentionView | np.ndarray | Tensor, region: Region, image_size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray, bool]:
    m = attn.map if isinstance(attn, AttentionView) else attn
    m = m.detach().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m)
    single = m.ndim == 2
    m = np.clip(m.astype(np.float64), 0.0, None)  # mass = the positive part of the map
    if single:
        m = m[None]
    w = region_to_grid(region, (m.shape[-2], m.shape[-1]), image_size).astype(np.float64)
    return m, np.broadcast_to(w, m.shape), single


def _out(values: np.ndarray, single: bool) -> float | np.ndarray:
    return float(values[0]) if single else values


def focus_share(
    attn: AttentionView | np.ndarray | Tensor, region: Region, image_size: tuple[int, int] | None = None
) -> float | np.ndarray:
    """Share of the map's (positive) mass inside the region; a uniform map scores `area_share`."""
    m, w, single = _map_and_weights(attn, region, image_size)
    mass = m.sum(axis=(1, 2))
    inside = (m * w).sum(axis=(1, 2))
    return _out(np.where(mass > 0, inside / np.where(mass > 0, mass, 1.0), 0.0), single)


def area_share(
    region: Region, grid: tuple[int, int], image_size: tuple[int, int] | None = None
) -> float | np.ndarray:
    """Share of the image area the region covers (chance level of `focus_share`)."""
    w = region_to_grid(region, grid, image_size).astype(np.float64)
    return float(w.mean()) if w.ndim == 2 else w.mean(axis=(1, 2))


def focus_ratio(
    attn: AttentionView | np.ndarray | Tensor, region: Region, image_size: tuple[int, int] | None = None
) -> float | np.ndarray:
    """focus_share / area_share: 1 = no better than chance, >1 = attention concentrated on the region."""
    m, w, single = _map_and_weights(attn, region, image_size)
    share = np.asarray(focus_share(m, region, image_size), dtype=np.float64).reshape(-1)
    area = w.mean(axis=(1, 2))
    return _out(np.where(area > 0, share / np.where(area > 0, area, 1.0), np.nan), single)


def pointing_game(
    attn: AttentionView | np.ndarray | Tensor,
    region: Region,
    image_size: tuple[int, int] | None = None,
    min_cover: float = 0.5,
) -> bool | np.ndarray:
    """Does the map's maximum fall on a patch that the region covers by at least `min_cover`?"""
    m, w, single = _map_and_weights(attn, region, image_size)
    flat = m.reshape(m.shape[0], -1).argmax(axis=1)
    hits = w.reshape(w.shape[0], -1)[np.arange(m.shape[0]), flat] >= min_cover
    return bool(hits[0]) if single else hits


def entropy(attn: AttentionView | np.ndarray | Tensor) -> float | np.ndarray:
    """Shannon entropy of the map as a distribution over patches, normalised to [0, 1] (1 = uniform)."""
    m = attn.map if isinstance(attn, AttentionView) else attn
    m = m.detach().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m)
    single = m.ndim == 2
    m = np.clip(m.astype(np.float64), 0.0, None).reshape(1 if single else m.shape[0], -1)
    n = m.shape[1]
    mass = m.sum(axis=1, keepdims=True)
    p = m / np.where(mass > 0, mass, 1.0)
    h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    return _out(h / np.log(n) if n > 1 else np.zeros_like(h), single)


def focus_metrics(
    attn: AttentionView | np.ndarray | Tensor, region: Region, image_size: tuple[int, int] | None = None
) -> dict[str, float | np.ndarray]:
    """All focus scores of a map against one region, by name."""
    m = attn.map if isinstance(attn, AttentionView) else attn
    grid = (int(np.shape(m)[-2]), int(np.shape(m)[-1]))
    return {
        "focus_share": focus_share(attn, region, image_size),
        "area_share": area_share(region, grid, image_size),
        "focus_ratio": focus_ratio(attn, region, image_size),
        "pointing_game": pointing_game(attn, region, image_size),
        "entropy": entropy(attn),
    }


def focus_summary(
    attn: AttentionView | np.ndarray | Tensor, region: Region, image_size: tuple[int, int] | None = None
) -> dict[str, float]:
    """One number per score for a set of maps on their regions (B, gh, gw) vs (B, H, W): mean focus
    share, mean area share (chance), focus ratio and pointing-game rate. The ratio is of the means,
    not a mean of per-image ratios, so one image with a tiny mask cannot dominate the score; every
    table and card in the lab reports this same statistic."""
    scores = focus_metrics(attn, region, image_size)
    share = float(np.mean(scores["focus_share"]))
    area = float(np.mean(scores["area_share"]))
    return {
        "focus_share": share,
        "area_share": area,
        "focus_ratio": share / area if area > 0 else float("nan"),
        "pointing_game": float(np.mean(scores["pointing_game"])),
    }
