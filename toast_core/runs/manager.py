"""The run manager: a FIFO queue, worker threads per device, cancel, resume, delete.

It holds a `Registry` (the on-disk record) and an `Executor` (one run segment from data to module);
what it does itself is decide which worker runs what, and when.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from toast_core.core.backbone import Backbone
from toast_core.storage.checkpoints import load_module
from toast_core.methods.base import SteeringMethod
from toast_core.runs.config import RunConfig, parse_task
from toast_core.runs.devices import BackboneCopies, _cpu_cores, target_device, worker_devices
from toast_core.runs.execute import Executor
from toast_core.runs.record import (
    ACTIVE_STATES,
    MODULE_STEM,
    RESUMABLE_STATES,
    RunError,
    RunStatus,
    _now,
    _Record,
)
from toast_core.runs.registry import Registry


class RunManager:
    """Queue, workers and registry of tuning runs under `root` (one manager per root at a time).

    Workers: `cpu_workers` CPU threads (each run gets max(1, cores // cpu_workers) torch threads, so
    parallel runs do not oversubscribe the CPU; `cpu_threads` overrides that, e.g. 1 on a machine
    shared with other jobs) and `gpu_workers_per_device` threads per visible CUDA device (default 1:
    one GPU run at a time per device). A run goes to the first free worker of its device, in
    submission order. The backbone is shared read-only; a run asking for another device than the
    backbone's gets a frozen copy of it on that device (made once, then reused). Several managers
    (or processes, e.g. the CLI beside the app) may share a root: a run is written only by the
    manager running it; the others follow it from disk (`rescan`, which `list` does at most once a
    second) and never mark it interrupted while its owner is alive.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = "runs",
        backbone: Backbone | None = None,
        *,
        cpu_workers: int = 1,
        gpu_workers_per_device: int = 1,
        cpu_threads: int | None = None,
        status_interval_s: float = 0.5,
    ):
        if cpu_workers < 0 or gpu_workers_per_device < 0:
            raise ValueError("cpu_workers and gpu_workers_per_device must be >= 0.")
        self.registry = Registry(root, status_interval_s=status_interval_s)
        self.registry.cancel_hook = self.cancel
        self.backbone = backbone
        self.cpu_workers = cpu_workers
        self.gpu_workers_per_device = gpu_workers_per_device
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError("cpu_threads must be >= 1 (or None for cores // cpu_workers).")
        self.cpu_threads = cpu_threads or max(1, _cpu_cores() // max(1, cpu_workers))
        self._lock, self._cond = self.registry.lock, self.registry.cond  # one lock for records and queue
        self._queue: deque[str] = deque()
        self._closing = False
        self._backbones = BackboneCopies()
        self.executor = Executor(self)
        self.registry.open()
        self.worker_devices = worker_devices(cpu_workers, gpu_workers_per_device)
        self._threads = [
            threading.Thread(target=self._worker, args=(dev,), name=f"toast-run-{dev}-{n}", daemon=True)
            for n, dev in enumerate(self.worker_devices)
        ]
        for t in self._threads:
            t.start()

    def __enter__(self) -> RunManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- public API ---------------------------------------------------------------------------
    def submit(self, config: RunConfig | dict[str, Any]) -> str:
        """Queue a run and return its id; the config is checked here, the data in the worker."""
        if isinstance(config, dict):
            config = RunConfig.from_dict(config)
        backbone = self._require_backbone()
        target = self._target_device(config.device)
        ref = parse_task(config.task)
        if ref.path and not Path(ref.path).is_dir():
            raise ValueError(f"Task folder '{ref.path}' does not exist (task '{config.task}').")
        rec = self.registry.create(config, backbone, target)
        run_id = rec.status.run_id
        with self._cond:
            if self._closing:
                shutil.rmtree(self.run_dir(run_id), ignore_errors=True)
                raise RunError("This RunManager has been shut down; start a new one to submit runs.")
            self.registry.records[run_id] = rec
            self._queue.append(run_id)
        self.registry.persist(rec, force=True)
        with self._cond:
            self._cond.notify_all()
        return run_id

    def status(self, run_id: str, *, history: bool = True) -> RunStatus:
        """A deep copy of the run's record right now (cheap: readers never wait on a training step)."""
        with self._lock:
            external = self.registry.record(run_id).external
        if external:
            self.registry.maybe_rescan()
        with self._lock:
            return self.registry.record(run_id).snapshot(with_history=history)

    def list(self, *, history: bool = True) -> list[RunStatus]:
        """Every run in this registry, oldest first (new folders on disk are picked up, see `rescan`)."""
        self.registry.maybe_rescan()
        with self._lock:
            records = sorted(
                self.registry.records.values(), key=lambda r: (r.status.created, r.status.run_id)
            )
            return [r.snapshot(with_history=history) for r in records]

    def cancel(self, run_id: str) -> bool:
        """Stop a queued run now, or a running one before its next step; False if already finished."""
        with self._cond:
            rec = self.registry.record(run_id)
            external, owner = rec.external, dict(rec.status.owner)
        if external:  # another manager runs it: ask it, if it lives in this process
            other = self.registry.peer(owner)
            if other is None:
                raise RunError(
                    f"Run '{run_id}' is run by another process (pid {owner.get('pid')} on {owner.get('host')}); "
                    "cancel it there."
                )
            return other.cancel_hook(run_id)
        with self._cond:
            rec = self.registry.record(run_id)
            state = rec.status.state
            was_queued = state == "queued"
            if was_queued:
                self._queue.remove(run_id)
                rec.status.state, rec.status.ended = "cancelled", _now()
                rec.status.cancel_requested_step = rec.status.step
                rec.status.eta_s = None
                self._cond.notify_all()
            elif state == "running":
                if rec.status.cancel_requested_step is None:
                    rec.status.cancel_requested_step = rec.status.step
                rec.cancel_event.set()
            else:
                return False
        self.registry.persist(rec, force=True)
        if was_queued:  # a running run is settled by its worker, after its last write
            rec.settled.set()
        return True

    def wait(self, run_id: str, timeout: float | None = None) -> RunStatus:
        """Block until the run has finished and its record is on disk; TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                rec = self.registry.record(run_id)
                settled, external = rec.settled, rec.external
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = min(0.5, left if left is not None else 0.5) if external else left
            if settled.wait(step):
                return self.status(run_id)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Run '{run_id}' is still {self.status(run_id, history=False).state} after {timeout} s."
                )
            if external:
                self.rescan()

    def resume(self, run_id: str) -> str:
        """Re-queue an interrupted (or cancelled / failed) run, from `checkpoint_last` when there is one."""
        backbone = self._require_backbone()
        self.rescan()  # another manager may have resumed or deleted it meanwhile
        with self._cond:
            rec = self.registry.record(run_id)
            if rec.status.state not in RESUMABLE_STATES:
                raise RunError(
                    f"Run '{run_id}' is {rec.status.state}; only {', '.join(sorted(RESUMABLE_STATES))} runs can be resumed."
                )
            if rec.config is None:
                raise RunError(
                    f"Run '{run_id}' has a config this library cannot read ({rec.status.note}); it cannot be resumed."
                )
            saved_hash = rec.status.backbone.get("weights_hash")
            if saved_hash and saved_hash != backbone.weights_hash:
                raise RunError(
                    f"Run '{run_id}' was trained on backbone '{rec.status.backbone.get('name')}' (hash {saved_hash}); "
                    f"the manager's backbone is '{backbone.name}' (hash {backbone.weights_hash})."
                )
        offset, path, note = self.registry.resume_point(run_id)
        target = self._target_device(rec.config.device)
        with self._cond:
            if self._closing:
                raise RunError("This RunManager has been shut down; start a new one to resume runs.")
            if rec.status.state not in RESUMABLE_STATES or self.registry.records.get(run_id) is not rec:
                raise RunError(f"Run '{run_id}' changed meanwhile (now {rec.status.state}); not resumed.")
            rec.requeue(offset, path, note, dict(self.owner), target)
            self._queue.append(run_id)
            self._cond.notify_all()
        self.registry.persist(rec, force=True)
        return run_id

    def load_run_module(self, run_id: str) -> SteeringMethod:
        """The trained steering module of a done run, on the manager's backbone (eval mode)."""
        backbone = self._require_backbone()
        with self._lock:
            rec = self.registry.record(run_id)
            if rec.status.state != "done" or not rec.status.checkpoint:
                raise RunError(f"Run '{run_id}' is {rec.status.state}; only done runs have a final module.")
        return load_module(self.run_dir(run_id) / MODULE_STEM, backbone)

    def delete(self, run_id: str) -> None:
        """Remove a finished (or still queued) run and its files; a running run must be cancelled first."""
        with self._cond:
            rec = self.registry.record(run_id)
            if rec.external:
                raise RunError(f"Run '{run_id}' is being run by another manager; it cannot be deleted now.")
            if rec.status.state == "running":
                raise RunError(
                    f"Run '{run_id}' is running; cancel it and wait for it to stop before deleting."
                )
            if rec.status.state == "queued":
                self._queue.remove(run_id)
            del self.registry.records[run_id]
            self._cond.notify_all()
        rec.settled.set()
        with rec.io_lock:
            path = self.run_dir(run_id)
            if path.resolve().parent == self.root.resolve():
                shutil.rmtree(path, ignore_errors=True)

    def shutdown(self, *, cancel: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the workers. `cancel`: cancel queued and running runs (else the queue drains first)."""
        self.registry.close()
        with self._cond:
            self._closing = True
            active = (
                [r for r, rec in self.registry.records.items() if rec.status.state in ACTIVE_STATES]
                if cancel
                else []
            )
            self._cond.notify_all()
        for run_id in active:  # outside the lock: cancel() writes the record (io lock before state lock)
            self.cancel(run_id)
        if wait:
            for t in self._threads:
                t.join(timeout)

    def run_dir(self, run_id: str) -> Path:
        return self.registry.run_dir(run_id)

    def rescan(self) -> list[str]:
        """Pick up what other managers or processes changed on disk (see `Registry.rescan`)."""
        return self.registry.rescan()

    @property
    def root(self) -> Path:
        return self.registry.root

    @property
    def owner(self) -> dict[str, Any]:
        return self.registry.owner

    @property
    def unreadable(self) -> dict[str, str]:
        return self.registry.unreadable

    def get_config(self, run_id: str) -> RunConfig:
        with self._lock:
            rec = self.registry.record(run_id)
            if rec.config is None:
                raise RunError(f"Run '{run_id}' has an unreadable config ({rec.status.note}).")
            return RunConfig.from_dict(rec.config.to_dict())

    # --- lookups ------------------------------------------------------------------------------
    def _require_backbone(self) -> Backbone:
        if self.backbone is None:
            raise RunError(
                "This RunManager was opened without a backbone; it can list runs but not train or load them."
            )
        return self.backbone

    def _target_device(self, device: str) -> str:
        return target_device(device, self.cpu_workers, self.gpu_workers_per_device)

    def backbone_for(self, device: str) -> Backbone:
        """The shared backbone on `device` (a frozen copy made once where it lives elsewhere)."""
        return self._backbones.on(self._require_backbone(), device)

    # --- the worker ---------------------------------------------------------------------------
    def _take(self, device: str) -> _Record | None:
        """The oldest queued run this worker may take (called under the lock)."""
        for run_id in self._queue:
            target = self.registry.records[run_id].target
            if target == device or (target == "cuda" and device.startswith("cuda")):
                self._queue.remove(run_id)
                return self.registry.records[run_id]
        return None

    def _worker(self, device: str) -> None:
        while True:
            with self._cond:
                rec = self._take(device)
                while rec is None:
                    if self._closing:
                        return
                    self._cond.wait()
                    rec = self._take(device)
                s = rec.status
                s.state, s.device = "running", device
                s.started = s.started or _now()
                s.segments += 1
                s.updated = _now()
                if device == "cpu":
                    s.threads = self.cpu_threads
                self._cond.notify_all()
            self.registry.persist(rec, force=True)
            self.executor.execute(rec, device)
