"""A per-run cache of what the frozen backbone gives each training image, so it is computed once.

Why: within a run the backbone never changes and an in-memory training set holds fixed images, yet
every step of a head-only method (linear probe) ran the whole backbone again, and every TOAST step
ran its whole pass 1 again, on images seen in earlier epochs. A method declares its *frozen stage*
(`SteeringMethod.frozen_stage_kind`: "features" = everything up to the pooled feature, "pass1" =
TOAST's first pass and the stream pass 2 resumes from), computes it (`frozen_stage`) and trains from
it (`forward_frozen`); `train()` decides here whether a run may use it (`plan_cache`) and then reads
every batch through a `FrozenCache`, which computes the rows it lacks (the first epoch) and stores
them, keyed by image index under the backbone's weights hash and the stage's signature.

Exactness: rows are kept in the dtype the stage produced them in (fp32 on CPU; under CUDA autocast,
what autocast produced), never rounded to fp16 to save memory: on the test fixture, fp16 rows moved
a 60-step run's final module by 5e-5 (linear probe) and 6e-4 (TOAST, late feedback alike), far
beyond the 1e-5 a cached run must match the uncached one by (fp32 rows: 0.0).
Memory: at most `TrainConfig.cache_mb`; rows that do not fit are recomputed every time they are
drawn (one warning per run says so), so a too-small bound costs speed, never correctness.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

#: the frozen stages a method can declare (None: nothing of its training forward is frozen)
STAGE_KINDS = ("features", "pass1")

#: (index of the missing rows in the batch) -> {name: rows (k, ...)}; computes the frozen stage
StageFn = Callable[[Tensor], dict[str, Tensor]]


@dataclass
class CacheStats:
    """What a run's cache did: `used` False with `reason` when the run computed everything itself."""

    used: bool
    reason: str
    kind: str | None = None
    entries: int = 0
    capacity: int = 0
    peak_mb: float = 0.0
    hits: int = 0
    computed: int = 0
    recomputed_over_bound: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FrozenCache:
    """Rows of a frozen stage by image index (0 … n-1), within `max_bytes`.

    Storage is one preallocated tensor per named output (capacity rows, allocated when the first
    rows arrive, so its shape and dtype are the stage's own); `slot[i]` says where image i lives.
    """

    def __init__(self, n: int, key: str, kind: str, max_bytes: int) -> None:
        if kind not in STAGE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(STAGE_KINDS)}; got {kind!r}.")
        self.n, self.key, self.kind, self.max_bytes = int(n), key, kind, int(max_bytes)
        self.slot = torch.full((self.n,), -1, dtype=torch.long)
        self.store: dict[str, Tensor] = {}
        self.filled = 0
        self.stats = CacheStats(used=True, reason="frozen stage cached", kind=kind)
        self._warned = False

    @property
    def capacity(self) -> int:
        return self.stats.capacity

    def nbytes(self) -> int:
        """Bytes held by the rows stored so far (the preallocated rest is untouched memory)."""
        if not self.store:
            return 0
        return sum(t[0].numel() * t.element_size() for t in self.store.values()) * self.filled

    def _allocate(self, rows: dict[str, Tensor]) -> None:
        row_bytes = sum(t[0].numel() * t.element_size() for t in rows.values())
        cap = min(self.n, self.max_bytes // max(row_bytes, 1))
        self.stats.capacity = int(cap)
        self.store = {k: v.new_empty((cap, *v.shape[1:])) for k, v in rows.items()}

    def put(self, index: Tensor, rows: dict[str, Tensor]) -> int:
        """Store rows for image indices `index` (those not stored yet, each once) while the bound
        allows; returns how many were stored."""
        index = index.cpu()
        if not self.store:
            self._allocate(rows)
        first = torch.zeros(len(index), dtype=torch.bool)
        seen: set[int] = set()
        for pos, i in enumerate(index.tolist()):  # a batch across an epoch's end may repeat an image
            if i not in seen and int(self.slot[i]) < 0:
                first[pos] = True
            seen.add(i)
        wanted = first.nonzero().flatten()
        pos = wanted[: max(0, self.capacity - self.filled)]
        if len(pos) > 0:
            slots = torch.arange(self.filled, self.filled + len(pos))
            for name, value in rows.items():
                self.store[name][slots.to(value.device)] = value[pos.to(value.device)].detach()
            self.slot[index[pos]] = slots
            self.filled += len(pos)
            self.stats.entries = self.filled
            self.stats.peak_mb = self.nbytes() / 2**20
        if len(pos) < len(wanted) and not self._warned:
            self._warned = True
            logger.warning(
                "Frozen-stage cache full (%d of %d images within %.0f MB): the rest are recomputed "
                "every time they are drawn.",
                self.capacity,
                self.n,
                self.max_bytes / 2**20,
            )
        return len(pos)

    def get(self, index: Tensor, compute: StageFn) -> dict[str, Tensor]:
        """The stage's rows for image indices `index` (B,), in that order: stored rows are read, the
        others computed in one call (`compute(positions in the batch)`) and stored if they fit."""
        index = index.cpu()
        slots = self.slot[index]
        missing = (slots < 0).nonzero().flatten()
        if len(missing) == 0:
            self.stats.hits += len(index)
            return {k: v[slots.to(v.device)] for k, v in self.store.items()}
        fresh = compute(missing)
        self.stats.computed += self.put(index[missing], fresh)
        self.stats.recomputed_over_bound += int((self.slot[index[missing]] < 0).sum())
        self.stats.hits += len(index) - len(missing)
        if len(missing) == len(index):
            return fresh
        out: dict[str, Tensor] = {}
        hit = slots >= 0
        for name, value in fresh.items():
            rows = value.new_empty((len(index), *value.shape[1:]))
            rows[missing.to(value.device)] = value
            if bool(hit.any()):
                rows[hit.nonzero().flatten().to(value.device)] = self.store[name][slots[hit].to(value.device)]
            out[name] = rows
        return out


def cache_key(method: Any) -> str:
    """Backbone weights hash + the stage's signature: rows of one key are interchangeable."""
    return f"{method.backbone.weights_hash}:{method.frozen_stage_signature()}"


def plan_cache(
    method: Any,
    train_data: Any,
    cache_mb: float,
    *,
    augmented: bool = False,
    features: Tensor | None = None,
) -> tuple[FrozenCache | None, CacheStats]:
    """Whether this run may read its frozen stage from a cache, and the cache if so.

    Refused (the run computes every step itself) for streamed batches (a batch source may hand out
    different images for one index), augmentation (the images change every epoch), a method with no
    frozen stage or with something trainable or stochastic below it (`method.cache_refusal()`), or
    `cache_mb = 0`. `features`: a caller's precomputed pooled features of every training image (the
    few-shot episode's), which fill a "features" cache at once instead of during the first epoch.
    """
    from toast_core.data.base import LabeledImages  # data imports nothing of ours, but keep this light

    refusal = None
    if not isinstance(train_data, LabeledImages):
        refusal = "streamed batches: a batch source may give other images for the same step"
    elif augmented:
        refusal = "augmentation changes the images every epoch"
    else:
        refusal = method.cache_refusal()
    if features is not None:
        if refusal is not None or method.frozen_stage_kind != "features":
            raise ValueError(
                f"features= needs a head-only method on fixed images; here: {refusal or 'not head-only'}."
            )
        if len(features) != len(train_data):
            raise ValueError("features must hold one row per image of an in-memory training set.")
    elif refusal is None and cache_mb <= 0:
        refusal = "off (cache_mb = 0)"
    if refusal is not None:
        return None, CacheStats(used=False, reason=refusal)
    n = len(train_data)
    max_bytes = int(cache_mb * 2**20)
    if features is not None:
        feats = features.detach().to(method.head.weight.device)
        max_bytes = max(max_bytes, feats.numel() * feats.element_size())  # already in memory anyway
    cache = FrozenCache(n, cache_key(method), method.frozen_stage_kind, max_bytes)
    if features is not None:
        cache.put(torch.arange(n), {"features": feats})
        cache.stats.reason = "frozen features given by the caller"
    return cache, cache.stats


__all__ = ["STAGE_KINDS", "CacheStats", "FrozenCache", "cache_key", "plan_cache"]
