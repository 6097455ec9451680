"""The callbacks a worker hands to `train()`: each step, eval and snapshot lands in the live record."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

import numpy as np

from toast_core.methods.base import SteeringMethod
from toast_core.runs.record import _clean, _now, _Record

if TYPE_CHECKING:
    from toast_core.runs.manager import RunManager


class _Listener:
    """train() callbacks: update the live record under the lock, write it out (throttled), checkpoint."""

    def __init__(
        self, manager: RunManager, record: _Record, method: SteeringMethod, offset: int, n_train: int
    ):
        self.manager, self.record, self.method = manager, record, method
        self.registry = manager.registry
        self.offset, self.n_train = offset, max(1, n_train)

    def on_step(self, step: int, total: int, metrics: dict[str, float]) -> None:
        rec, now = self.record, time.perf_counter()
        abs_step = self.offset + step
        with self.registry.lock:
            s = rec.status
            rec.step_marks.append(now)
            entry = _clean(metrics)
            entry["step"] = abs_step
            s.history.append(entry)
            rec.history_rev += 1
            s.step = abs_step
            s.epoch = abs_step * rec.batch_size / self.n_train
            marks = list(rec.step_marks)
            if len(marks) >= 2:
                per_step = statistics.median(b - a for a, b in zip(marks, marks[1:]))
                s.eta_s = per_step * max(0, s.total - abs_step)
            s.updated = _now()
        every = rec.config.checkpoint_every if rec.config else 0
        if every and abs_step % every == 0 and abs_step < rec.status.total:
            self.registry.save_checkpoint_last(rec, self.method, abs_step)
        self.registry.persist(rec, force=False)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        abs_step = self.offset + step
        with self.registry.lock:
            for entry in reversed(self.record.status.history):
                if entry.get("step") == abs_step:
                    entry.update(_clean({k: v for k, v in metrics.items() if k != "step"}))
                    self.record.history_rev += 1
                    break

    def on_snapshot(self, step: int, attention: np.ndarray) -> None:
        grid = np.asarray(attention, dtype=np.float32).copy()
        with self.registry.lock:
            self.record.status.snapshot = grid
            self.record.status.snapshot_step = self.offset + step
            self.record.snapshot_rev += 1
        self.registry.persist(self.record, force=False)
