"""What a run record holds: its states, file names, the `RunStatus` readers get and the live `_Record`."""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from toast_core.runs.config import RunConfig

FORMAT = "toast-run"
FORMAT_VERSION = 1

STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
ACTIVE_STATES = frozenset({"queued", "running"})
FINISHED_STATES = frozenset({"done", "failed", "cancelled", "interrupted"})
RESUMABLE_STATES = frozenset({"interrupted", "cancelled", "failed"})

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
HISTORY_FILE = "history.json"
SNAPSHOT_FILE = "snapshot.npy"
MODULE_STEM = "module"
CHECKPOINT_STEM = "checkpoint_last"


class RunError(RuntimeError):
    """A run-manager request that cannot be done (unknown run, wrong state, no backbone)."""


# --- what readers see -----------------------------------------------------------------------------
@dataclass
class RunStatus:
    """A copy of one run's record at one moment; safe to keep, change or hand to a page."""

    run_id: str
    name: str
    state: str
    method: str
    task: str
    step: int = 0
    total: int = 0
    epoch: float = 0.0
    eta_s: float | None = None
    device: str | None = None
    amp: str | None = None
    threads: int | None = None
    peak_mb: float | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    updated: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    snapshot: np.ndarray | None = None
    snapshot_step: int | None = None
    error: str | None = None
    error_kind: str | None = None
    traceback: str | None = None
    checkpoint: str | None = None
    checkpoint_last_step: int | None = None
    resumed_from: int | None = None
    segments: int = 0
    cancel_requested_step: int | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    train_size: int | None = None
    val_size: int | None = None
    backbone: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    #: what a running run is doing besides its steps ("loading data", "preparing FORT position
    #: prompts on N training images"); None when it is just training or not running
    phase: str | None = None
    #: the process and manager that runs it (host, pid, process start, manager token)
    owner: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def progress(self) -> float:
        return self.step / self.total if self.total else 0.0


#: fields of RunStatus that live in their own files (history.json, snapshot.npy, config.json)
_SEPARATE_FIELDS = ("history", "snapshot", "config")
_STATUS_FIELDS = tuple(f.name for f in dataclasses.fields(RunStatus) if f.name not in _SEPARATE_FIELDS)


def _clean(value: Any) -> Any:
    """Plain JSON values (non-finite floats -> None), so memory and disk hold the same numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    return str(value)


@dataclass
class _Record:
    """The live record of one run (owned by the manager, guarded by its lock)."""

    status: RunStatus
    config: RunConfig | None
    target: str = "cpu"  # the device family / device this run is queued for
    cancel_event: threading.Event = field(default_factory=threading.Event)
    #: set once a finished state is on disk, so `wait` returns only when the files are final too
    settled: threading.Event = field(default_factory=threading.Event)
    io_lock: threading.Lock = field(default_factory=threading.Lock)
    step_marks: deque = field(default_factory=lambda: deque(maxlen=21))
    last_write: float = 0.0
    #: change counters, so a write skips history.json / snapshot.npy when they have not changed
    history_rev: int = 0
    snapshot_rev: int = 0
    written_revs: tuple[int, int] = (0, 0)
    resume_path: str | None = None
    batch_size: int = 0
    #: run by another live manager (another process, or another manager in this one): followed from disk
    external: bool = False
    #: mtime (ns) of status.json as last read or written here, to notice writes by others
    disk_mtime: int = 0

    def requeue(
        self, offset: int, path: str | None, note: str | None, owner: dict[str, Any], target: str
    ) -> None:
        """Reset for a resume from step `offset` (checkpoint stem `path`); the caller holds the lock."""
        s = self.status
        s.history = [h for h in s.history if h.get("step", 0) <= offset]
        self.history_rev += 1
        s.step, s.resumed_from, s.state = offset, offset, "queued"
        s.owner = owner
        s.error = s.error_kind = s.traceback = None
        s.cancel_requested_step, s.ended, s.eta_s, s.note = None, None, None, note
        s.epoch = offset * self.batch_size / max(1, s.train_size or 1)
        self.resume_path, self.target = path, target
        self.cancel_event, self.settled = threading.Event(), threading.Event()
        self.step_marks.clear()

    def snapshot(self, with_history: bool = True) -> RunStatus:
        s = self.status
        out = dataclasses.replace(s)
        out.history = [dict(h) for h in s.history] if with_history else []
        out.snapshot = None if s.snapshot is None else s.snapshot.copy()
        for name in ("memory", "final", "timings", "backbone", "config", "owner"):
            setattr(out, name, copy.deepcopy(getattr(s, name)))
        out.class_names = None if s.class_names is None else list(s.class_names)
        return out


def _now() -> float:
    return time.time()


def _new_run_id(method: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{method}-{uuid.uuid4().hex[:6]}"
