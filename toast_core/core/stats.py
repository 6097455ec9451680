"""Confidence intervals used by every card and table: Wilson for accuracies, bootstrap for ratios.

Accuracies are binomial counts, so their interval is Wilson's (it stays inside [0, 1] and is right
at small n); focus statistics are ratios of means over images, whose interval is a seeded
percentile bootstrap over images (the same seed gives the same interval).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion hits / n ((nan, nan) for n = 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    columns: tuple[np.ndarray, ...],
    statistic: Callable[..., float],
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """95% percentile interval of `statistic(*columns)` over images resampled with replacement."""
    n = len(columns[0])
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    values = np.array([statistic(*(c[i] for c in columns)) for i in idx], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def ratio_of_means(a: np.ndarray, b: np.ndarray) -> float:
    mb = float(np.mean(b))
    return float(np.mean(a)) / mb if mb > 0 else float("nan")
