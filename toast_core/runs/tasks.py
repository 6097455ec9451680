"""A run's data: the training and validation sets its task string names, rendered or loaded."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from toast_core.data.base import LabeledImages
from toast_core.runs.config import RunConfig, parse_task


# --- the run's data -------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _builtin_split(task: str, split: str, per_class: int, seed: int, size: int) -> LabeledImages:
    """Built-in splits are pure functions of their arguments; re-runs on the same task reuse them."""
    from toast_core.data.scenes import make_task_split

    return make_task_split(task, split, per_class=per_class, seed=seed, size=size)


def _load_folder(path: str, size: int, max_per_class: int | None = None) -> LabeledImages:
    from toast_core.data.folder import load_image_folder  # lazy: image decoding stack

    return load_image_folder(Path(path), size=size, max_images_per_class=max_per_class)


def _split_per_class(
    data: LabeledImages, val_per_class: int, seed: int
) -> tuple[LabeledImages, LabeledImages | None]:
    """Hold out up to `val_per_class` images of each class (always leaving one for training)."""
    if val_per_class <= 0:
        return data, None
    rng = np.random.default_rng(seed)
    labels = data.labels.cpu().numpy()
    train_idx: list[int] = []
    val_idx: list[int] = []
    for c in range(data.num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c)).tolist()
        take = min(val_per_class, max(0, len(idx) - 1))
        val_idx += idx[:take]
        train_idx += idx[take:]
    return data.subset(sorted(train_idx)), (data.subset(sorted(val_idx)) if val_idx else None)


def load_task_data(config: RunConfig, size: int) -> tuple[LabeledImages, LabeledImages | None]:
    """(training set, validation set or None) for a run, rendered / resized to `size` px."""
    ref = parse_task(config.task)
    if ref.kind == "builtin":
        train_set = _builtin_split(ref.name, "train", config.per_class, config.data_seed, size)
        val_set = (
            _builtin_split(ref.name, "val", config.val_per_class, config.data_seed, size)
            if config.val_per_class > 0
            else None
        )
        return train_set, val_set
    if ref.kind == "folder":
        root = Path(ref.path)
        if (root / "train").is_dir():
            train_set = _load_folder(str(root / "train"), size, config.per_class)
            val_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
            val_set = (
                _load_folder(str(val_dir), size, config.val_per_class)
                if val_dir is not None and config.val_per_class > 0
                else None
            )
            if val_set is not None and val_set.class_names != train_set.class_names:
                raise ValueError(
                    f"The class folders of '{val_dir}' ({', '.join(val_set.class_names)}) differ from those of "
                    f"'{root / 'train'}' ({', '.join(train_set.class_names)}); labels would not match."
                )
            return train_set, val_set
        everything = _load_folder(ref.path, size, config.per_class + config.val_per_class)
        return _split_per_class(everything, config.val_per_class, config.data_seed)
    from toast_core.data.episodes import sample_episode

    need = ref.k_shot + ref.n_query
    pool = (
        _builtin_split(ref.name, "train", need, config.data_seed, size)
        if ref.name
        else _load_folder(ref.path, size)
    )
    episode = sample_episode(pool, ref.n_way, ref.k_shot, ref.n_query, (config.data_seed, ref.index))
    return episode.support, episode.query
