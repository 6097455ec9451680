"""Faithfulness: does the module use what its map points at? Deletion curves and their areas.

Patches are ranked by a map and deleted most-relevant-first (MoRF) and least-relevant-first (LeRF)
in steps; the curve is the probability of the class predicted on the full image. A faithful map
makes MoRF fall fast (small area) and LeRF stay high (large area); a random ranking is the
baseline between them. Deletion is native to a ViT: the patch tokens leave the sequence in the
steered forward (`forward.keep_patches`), so there is no fill value the model never saw in training;
pixel mean-fill is offered for comparison. Every step runs all orders of all images as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from toast_core.core.forward import keep_patches
from toast_core.core.stats import bootstrap_interval
from toast_core.data.base import LabeledImages, to_model_input
from toast_core.views.base import _device, _eval_mode, method_label
from toast_core.views.registry import compute_view

if TYPE_CHECKING:  # importing the method package here would make methods (FORT) unable to import us
    from toast_core.methods.base import SteeringMethod

ORDERS = ("morf", "lerf", "random")
MODES = ("tokens", "mean_fill")


@dataclass
class DeletionCurves:
    """Probability of the target class after deleting a share of patches, per order and image."""

    method: str
    view: str
    mode: str
    fractions: np.ndarray  # (S + 1,) share of patches deleted at each step (0 first)
    probs: dict[str, np.ndarray]  # order -> (B, S + 1)
    target: np.ndarray  # (B,) the class followed (the full image's prediction unless given)
    meta: dict[str, Any] = field(default_factory=dict)

    def aucs(self) -> dict[str, np.ndarray]:
        """Area under each order's curve over the deleted share (trapezoid), per image (B,)."""
        return {o: np.trapezoid(p, self.fractions, axis=1) for o, p in self.probs.items()}

    def summary(self) -> dict[str, float]:
        """Mean AUC per order over the batch, and the gap LeRF − MoRF (larger = more faithful)."""
        aucs = {o: float(v.mean()) for o, v in self.aucs().items()}
        out = {f"{o}_auc": v for o, v in aucs.items()}
        if "morf" in aucs and "lerf" in aucs:
            out["gap"] = aucs["lerf"] - aucs["morf"]
        return out


def deletion_counts(num_patches: int, steps: int) -> np.ndarray:
    """Patches deleted at each of steps + 1 points (0 … all but one: a ViT needs one patch to pool)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    counts = np.rint(np.linspace(0.0, 1.0, steps + 1) * num_patches).astype(np.int64)
    return np.minimum(counts, num_patches - 1)


def rank_patches(maps: np.ndarray, order: str, seed: int = 0) -> np.ndarray:
    """Deletion order (B, P) of patch indices: MoRF = largest value first, LeRF = smallest first,
    random = a seeded permutation. Ties are broken by the same seeded random key, not by position."""
    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    key = np.random.default_rng(seed).random(flat.shape)
    if order == "random":
        return np.argsort(key, axis=1, kind="stable")
    if order == "morf":
        return np.lexsort((key, -flat), axis=1)
    if order == "lerf":
        return np.lexsort((key, flat), axis=1)
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")


def _probs(method: SteeringMethod, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
    """(probability of target per image, target) from one forward in eval mode, no graph."""
    logits = method(x).logits.float()
    if target is None:
        target = logits.argmax(dim=-1)
    return logits.softmax(dim=-1).gather(1, target[:, None]).squeeze(1), target


def _mean_fill(x: Tensor, deleted: Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> Tensor:
    """Images with the deleted patches (B, P bool) set to each image's per-channel mean."""
    gh, gw = grid
    ph, pw = patch
    mask = deleted.reshape(-1, 1, gh, gw).repeat_interleave(ph, 2).repeat_interleave(pw, 3)
    full = torch.zeros(x.shape[0], 1, *x.shape[-2:], dtype=torch.bool, device=x.device)
    full[..., : gh * ph, : gw * pw] = mask
    return torch.where(full, x.mean(dim=(2, 3), keepdim=True), x)


def deletion_curves(
    method: SteeringMethod,
    x: Tensor,
    maps: np.ndarray,
    *,
    steps: int = 20,
    mode: str = "tokens",
    orders: Sequence[str] = ORDERS,
    target: int | Sequence[int] | Tensor | None = None,
    seed: int = 0,
    view: str = "",
) -> DeletionCurves:
    """MoRF / LeRF / random deletion curves of prepared images `x` (B, 3, H, W) ranked by `maps`
    (B, gh, gw). One forward per step for all orders and images; `mean_fill` sets the same patches'
    pixels to each image's channel mean instead of dropping their tokens."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    grid = tuple(int(g) for g in method.layout.grid)
    maps = np.asarray(maps)
    if maps.shape != (x.shape[0], *grid):
        raise ValueError(f"maps {maps.shape} do not match {x.shape[0]} images on a {grid} grid.")
    n_patch, batch, n_order = grid[0] * grid[1], x.shape[0], len(orders)
    counts = deletion_counts(n_patch, steps)
    device = _device(method)
    ranks = torch.from_numpy(np.concatenate([rank_patches(maps, o, seed) for o in orders])).to(device)
    x = x.to(device)
    if target is not None:
        target = torch.as_tensor(target, device=device, dtype=torch.long).reshape(-1).expand(batch)
    with _eval_mode(method), torch.no_grad():
        with keep_patches(torch.arange(n_patch, device=device)[None]):  # 0%: through the same path
            p0, target = _probs(method, x, target)
        tiled_x, tiled_t = x.repeat(n_order, 1, 1, 1), target.repeat(n_order)
        columns = [p0.repeat(n_order)]
        for c in np.unique(counts[1:]):  # a small grid repeats counts: one forward each
            if mode == "tokens":
                keep = ranks[:, int(c) :].sort(dim=1).values
                with keep_patches(keep):
                    columns.append(_probs(method, tiled_x, tiled_t)[0])
            else:
                deleted = torch.zeros(ranks.shape, dtype=torch.bool, device=device)
                deleted.scatter_(1, ranks[:, : int(c)], True)
                filled = _mean_fill(tiled_x, deleted, grid, tuple(method.layout.patch_size))
                columns.append(_probs(method, filled, tiled_t)[0])
    at = np.searchsorted(np.unique(counts[1:]), counts[1:]) + 1
    table = torch.stack(columns, dim=1)[:, [0, *at]].reshape(n_order, batch, len(counts)).cpu().numpy()
    return DeletionCurves(
        method_label(method), view, mode, counts / n_patch, {o: table[i] for i, o in enumerate(orders)},
        target.cpu().numpy(), {"steps": steps, "seed": seed, "num_patches": n_patch},
    )  # fmt: skip


def faithfulness_curves(
    method: SteeringMethod,
    x: Tensor,
    view: str = "relevance",
    *,
    steps: int = 20,
    mode: str = "tokens",
    orders: Sequence[str] = ORDERS,
    seed: int = 0,
    **view_options: Any,
) -> DeletionCurves:
    """A view of the module on prepared images, then its deletion curves (the map ranks the patches)."""
    maps = compute_view(view, method, x, **view_options).map
    return deletion_curves(method, x, maps, steps=steps, mode=mode, orders=orders, seed=seed, view=view)


def faithfulness_summary(
    method: SteeringMethod,
    data: LabeledImages,
    view: str = "cls",
    *,
    steps: int = 20,
    mode: str = "tokens",
    batch_size: int = 16,
    seed: int = 0,
    n_boot: int = 1000,
    **view_options: Any,
) -> dict[str, Any]:
    """Mean MoRF / LeRF / random AUC and the gap LeRF − MoRF over a data set, each with a 95%
    percentile-bootstrap interval over images (seeded). Keys: n, view, mode, steps, and for each of
    morf_auc, lerf_auc, random_auc, gap the mean plus `_lo` / `_hi`."""
    layout = method.layout
    aucs: dict[str, list[np.ndarray]] = {o: [] for o in ORDERS}
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(_device(method))
        x = to_model_input(images, layout.mean, layout.std, layout.img_size)
        curves = faithfulness_curves(
            method, x, view, steps=steps, mode=mode, seed=seed + start, **view_options
        )
        for o, v in curves.aucs().items():
            aucs[o].append(v)
    per_image = {o: np.concatenate(v) if v else np.zeros(0) for o, v in aucs.items()}
    per_image["gap"] = per_image["lerf"] - per_image["morf"]
    out: dict[str, Any] = {"n": len(data), "view": view, "mode": mode, "steps": steps}
    for name, values in per_image.items():
        key = name if name == "gap" else f"{name}_auc"
        lo, hi = bootstrap_interval((values,), np.mean, n_boot=n_boot, seed=seed)
        out.update(
            {key: float(values.mean()) if values.size else float("nan"), f"{key}_lo": lo, f"{key}_hi": hi}
        )
    return out
