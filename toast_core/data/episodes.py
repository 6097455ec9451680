"""N-way K-shot episodes over any LabeledImages, for few-shot evaluation of steering methods.

An episode picks `n_way` classes, then `k_shot` support and `n_query` query images per class with
no image in both. Labels are renumbered 0..n_way-1 in the order the classes were drawn, and the
original class indices are kept in `Episode.classes`. Everything is a pure function of the seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from toast_core.data.base import LabeledImages


@dataclass
class Episode:
    """Support and query sets with labels 0..n_way-1; `classes[j]` is the source class of label j."""

    support: LabeledImages
    query: LabeledImages
    classes: list[int]


def _check_args(data: LabeledImages, n_way: int, k_shot: int, n_query: int) -> list[int]:
    """The classes that can fill an episode; raises with the reason when there are too few."""
    if n_way < 1 or k_shot < 1 or n_query < 1:
        raise ValueError(f"n_way, k_shot and n_query must be at least 1 (got {n_way}, {k_shot}, {n_query}).")
    counts = torch.bincount(data.labels, minlength=data.num_classes).tolist()
    if n_way > data.num_classes:
        raise ValueError(f"{n_way}-way episodes need {n_way} classes; the data has {data.num_classes}.")
    need = k_shot + n_query
    eligible = [c for c, n in enumerate(counts) if n >= need]
    if len(eligible) < n_way:
        short = ", ".join(f"'{data.class_names[c]}' ({counts[c]})" for c, n in enumerate(counts) if n < need)
        raise ValueError(
            f"{n_way}-way {k_shot}-shot episodes with {n_query} queries need {need} images in each of "
            f"{n_way} classes; only {len(eligible)} classes have that many. Too few images: {short}."
        )
    return eligible


def _relabel(
    data: LabeledImages, index: list[int], labels: list[int], classes: list[int], role: str
) -> LabeledImages:
    part = data.subset(index)
    part.labels = torch.tensor(labels, dtype=torch.long)
    part.class_names = [data.class_names[c] for c in classes]
    part.meta = {**data.meta, "episode_role": role, "source_classes": list(classes)}
    return part


def sample_episode(
    data: LabeledImages, n_way: int, k_shot: int, n_query: int, rng_seed: int | Sequence[int]
) -> Episode:
    """Draw one episode; classes with fewer than k_shot + n_query images are never drawn."""
    eligible = _check_args(data, n_way, k_shot, n_query)
    rng = np.random.default_rng(rng_seed)
    classes = [int(c) for c in rng.choice(eligible, size=n_way, replace=False)]
    labels_np = data.labels.cpu().numpy()
    support_idx, support_lab, query_idx, query_lab = [], [], [], []
    for new_label, c in enumerate(classes):
        pool = rng.permutation(np.flatnonzero(labels_np == c))
        support_idx += pool[:k_shot].tolist()
        query_idx += pool[k_shot : k_shot + n_query].tolist()
        support_lab += [new_label] * k_shot
        query_lab += [new_label] * n_query
    return Episode(
        support=_relabel(data, support_idx, support_lab, classes, "support"),
        query=_relabel(data, query_idx, query_lab, classes, "query"),
        classes=classes,
    )


def episodes(
    data: LabeledImages, n_way: int, k_shot: int, n_query: int, count: int, seed: int
) -> Iterator[Episode]:
    """`count` episodes; episode i uses seed (seed, i), so any one can be re-drawn on its own."""
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}.")
    _check_args(data, n_way, k_shot, n_query)  # fail here, not on the first next()

    def gen() -> Iterator[Episode]:
        for i in range(count):
            yield sample_episode(data, n_way, k_shot, n_query, (seed, i))

    return gen()
