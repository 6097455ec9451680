"""Real-size datasets as lists of files: decoded and resized in DataLoader workers, not held in memory.

The built-in tasks and uploaded folders are small, so they live in memory (`LabeledImages`). A
benchmark split (CUB's 5,994 training images, VTAB's test sets of up to 20,000) is a `FileSet`:
paths + labels + class names, read on demand. Every image goes through the project's safe
decoder (`images.load_image`: size and pixel limits, EXIF orientation, any colour mode) and
`resize_for_model`, inside DataLoader worker processes, so decoding runs beside the training step.

- `FileSet.load()` -> `LabeledImages` (a small split, e.g. VTAB's 200 validation images);
- `FileSet.batches()` -> `FileBatches`, a batch source for `train.train` that draws the exact
  order the in-memory loop would (the loop's own seeded epoch sampler), and under torchrun loads
  only this rank's slice of each global batch (`rank_aware`);
- `FileSet.chunks()` -> `LabeledImages` chunks in order, for streaming evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from toast_core.data.base import LabeledImages
from toast_core.data.images import ImageInputError, load_image, resize_for_model

Fit = Literal["stretch", "center_crop"]


class DatasetLayoutError(ValueError):
    """A benchmark folder that does not have the expected layout; the message names what is missing."""


class _Decode(Dataset):
    """Index -> (uint8 (3, size, size), label); runs in a DataLoader worker."""

    def __init__(self, paths: Sequence[Path], labels: Tensor, size: int, fit: Fit):
        self.paths, self.labels, self.size, self.fit = list(paths), labels, size, fit

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path = self.paths[i]
        try:
            rgb = load_image(path)
        except ImageInputError as exc:  # the worker's error reaches the training loop with the path
            raise ImageInputError(f"{path}: {exc}") from None
        return resize_for_model(rgb, self.size, fit=self.fit), self.labels[i]


def _collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


@dataclass
class FileSet:
    """Image files with labels (indices into `class_names`), read on demand at `size` px."""

    paths: list[Path]
    labels: Tensor
    class_names: list[str]
    size: int = 224
    fit: Fit = "stretch"
    num_workers: int | None = None  # None: min(4, cores - 1)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_workers is None:  # decode beside the step, without outnumbering the cores
            self.num_workers = min(4, max(0, (os.cpu_count() or 1) - 1))
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length.")
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: Sequence[int] | Tensor) -> FileSet:
        idx = torch.as_tensor(index, dtype=torch.long).tolist()
        return FileSet([self.paths[i] for i in idx], self.labels[idx], list(self.class_names), self.size,
                       self.fit, self.num_workers, dict(self.meta))

    def _loader(self, batch_sampler: Any) -> DataLoader:
        workers = int(self.num_workers or 0)
        return DataLoader(
            _Decode(self.paths, self.labels, self.size, self.fit),
            batch_sampler=batch_sampler,
            num_workers=workers,
            collate_fn=_collate,
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )

    def chunks(self, batch_size: int = 64) -> Iterator[LabeledImages]:
        """The whole set in order, `batch_size` images at a time, decoded by the workers."""
        order = [list(range(i, min(i + batch_size, len(self)))) for i in range(0, len(self), batch_size)]
        for images, labels in self._loader(order):
            yield LabeledImages(images=images, labels=labels, class_names=list(self.class_names),
                                meta={"source": "files"})

    def load(self, batch_size: int = 64) -> LabeledImages:
        """Everything in memory (for small splits); the embedded path's shape."""
        parts = list(self.chunks(batch_size))
        if not parts:
            raise DatasetLayoutError("The split is empty.")
        return LabeledImages(
            images=torch.cat([p.images for p in parts]),
            labels=torch.cat([p.labels for p in parts]),
            class_names=list(self.class_names),
            meta={**self.meta, "source": "files", "size": self.size},
        )

    def batches(self) -> FileBatches:
        """A streaming batch source for `train.train` over this set."""
        return FileBatches(self)


class FileBatches:
    """`train.train`'s batch source over a FileSet: the in-memory loop's order, decoded ahead.

    On its first call it starts the loop's own epoch sampler on the loop's generator (so the order
    is the one `train(method, fileset.load(), ...)` would draw) and a DataLoader whose batch sampler
    yields, step after step, this rank's slice of each global batch; the workers decode up to
    4 batches per worker ahead of the step.
    """

    rank_aware = True  # toast_core.training.distributed passes its batches through unsliced

    def __init__(self, files: FileSet):
        self.files = files
        self._it: Iterator[tuple[Tensor, Tensor]] | None = None
        self._generator: torch.Generator | None = None
        self._batch_size = 0

    def _indices(self, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
        from toast_core.training import distributed
        from toast_core.training.train import _EpochSampler  # the loop's sampler: the same order as in memory

        sampler = _EpochSampler(len(self.files), generator)
        world = distributed.current()
        while True:
            idx = sampler.next(batch_size)
            if world is not None:
                idx = idx[distributed.rank_slice(len(idx), world)]
            yield idx.tolist()

    def close(self) -> None:
        """Stop the decode workers (before the next loader forks: a stale iterator must not be inherited)."""
        self._it = None

    def __call__(self, step: int, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self._it is None:
            self._generator, self._batch_size = generator, batch_size
            self._it = iter(self.files._loader(self._indices(batch_size, generator)))
        elif generator is not self._generator or batch_size != self._batch_size:
            raise ValueError("A FileBatches source serves one training run; make a new one per run.")
        return next(self._it)
