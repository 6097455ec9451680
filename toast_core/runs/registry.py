"""The run registry on disk: every write and every read of a run folder goes through here.

`Registry` is the record a `RunManager` holds: it writes a run's files (atomically, nothing
pickled), reads them back, rescans the folder for runs other processes added or changed, and
adopts runs across processes (a run whose owner died becomes `interrupted`; one whose owner lives
is followed from disk). `read_record` is the one reader of a run folder; `list_runs` / `read_run`
/ `find_run` / `iter_registries` are the read-only views over it for front ends that open no
manager (the CLI's `list`, bundles, the module picker): they report a dead owner's run as
interrupted, like the manager does, but never write (opening a manager would mark it on disk).
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toast_core.core.backbone import Backbone
from toast_core.storage.checkpoints import CheckpointError, _atomic_write, paths_for, read_card, save_module
from toast_core.methods.base import SteeringMethod
from toast_core.runs.config import RunConfig
from toast_core.runs.owners import _LIVE_REGISTRIES, live_registry, owner_stamp, running_elsewhere
from toast_core.runs.record import (
    _STATUS_FIELDS,
    ACTIVE_STATES,
    CHECKPOINT_STEM,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    HISTORY_FILE,
    SNAPSHOT_FILE,
    STATUS_FILE,
    RunError,
    RunStatus,
    _clean,
    _new_run_id,
    _now,
    _Record,
)

READ_ERRORS = (OSError, ValueError, KeyError, TypeError)


# --- disk -----------------------------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, allow_nan=False)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)

    _atomic_write(path, write)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _side_file(path: Path, default: Any, strict: bool) -> Any:
    try:
        return _read_json(path)
    except (OSError, ValueError):
        if strict:
            raise
        return default


def read_record(folder: Path, *, strict: bool = True) -> _Record:
    """A run folder as a record: status.json (checked), history, snapshot and config.

    Raises one of READ_ERRORS when the folder holds no readable run; a config this library cannot
    build (e.g. a method it does not know) leaves `config` None and says so in the note.
    Not `strict` (read-only listings), missing or damaged side files (history, config) are left
    at their defaults: the record itself was readable.
    """
    mtime = (folder / STATUS_FILE).stat().st_mtime_ns  # before reading: a later write is noticed
    raw = _read_json(folder / STATUS_FILE)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{STATUS_FILE} is not a run record (format '{FORMAT}').")
    if raw.get("run_id") != folder.name:
        raise ValueError(f"{STATUS_FILE} names run '{raw.get('run_id')}', not '{folder.name}'.")
    fields = {k: raw[k] for k in _STATUS_FIELDS if k in raw}
    status = RunStatus(**fields)
    history_path = folder / HISTORY_FILE
    status.history = _side_file(history_path, [], strict) if history_path.is_file() else []
    snap_path = folder / SNAPSHOT_FILE
    if snap_path.is_file():
        status.snapshot = np.load(snap_path, allow_pickle=False)
    config_raw = _side_file(folder / CONFIG_FILE, {}, strict)
    status.config = config_raw
    config: RunConfig | None = None
    try:
        config = RunConfig.from_dict(config_raw) if strict or config_raw else None
    except (ValueError, TypeError) as exc:
        status.note = f"config unreadable here: {exc}"
    rec = _Record(status=status, config=config, disk_mtime=mtime)
    if config is not None:
        rec.batch_size = config.train_config.batch_size
    return rec


def _mark_interrupted(status: RunStatus, note: str) -> None:
    status.state, status.eta_s, status.phase = "interrupted", None, None
    status.note = note


def run_folders(root: Path) -> list[Path]:
    """The candidate run folders of a registry (dot folders, e.g. import staging, are skipped)."""
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


# --- reading without a manager (front ends: the CLI's list, bundles, the module picker) -------------
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}$")


def read_run(run_dir: str | os.PathLike[str]) -> RunStatus:
    """One run folder's record as a manager would see it, without touching it: a queued / running run
    whose owner is gone reads as interrupted (a manager opening the folder would mark it so)."""
    folder = Path(run_dir)
    if not (folder / STATUS_FILE).is_file():
        raise RunError(f"'{folder}' is not a run folder (no {STATUS_FILE}).")
    try:
        status = read_record(folder, strict=False).status
    except READ_ERRORS as exc:
        raise RunError(f"The run record in '{folder}' cannot be read: {exc}") from exc
    if status.state in ACTIVE_STATES and not running_elsewhere(status.run_id, status.owner):
        _mark_interrupted(status, "interrupted: the process running it stopped")
    return status


def list_runs(root: str | os.PathLike[str]) -> list[RunStatus]:
    """Every readable run in a registry folder, oldest first (unreadable folders are skipped)."""
    runs = []
    for folder in run_folders(Path(root)):
        try:
            runs.append(read_run(folder))
        except RunError:
            continue
    return sorted(runs, key=lambda r: (r.created, r.run_id))


def find_run(ref: str | os.PathLike[str], roots: Sequence[str | os.PathLike[str]]) -> Path:
    """A run folder from a path to it or a run id in one of the registry `roots` (first match)."""
    path = Path(ref)
    if path.is_dir() and (path / STATUS_FILE).is_file():
        return path
    text = str(ref)
    if _RUN_ID.match(text):
        for root in roots:
            candidate = Path(root) / text
            if (candidate / STATUS_FILE).is_file():
                return candidate
    where = ", ".join(str(r) for r in roots) or "no registry"
    raise RunError(f"No run '{text}' (looked for a run folder and in {where}).")


def iter_registries(roots: Iterable[str | os.PathLike[str]]) -> list[tuple[Path, RunStatus]]:
    """(root, run) for every run in several registries, roots in order, runs oldest first."""
    out = []
    for root in roots:
        out += [(Path(root), r) for r in list_runs(root)]
    return out


# --- the record a manager holds ------------------------------------------------------------------
class Registry:
    """The runs under `root` as one manager sees them: live records in memory, files on disk.

    `lock` guards every record's state (the manager uses it for its queue too, so one lock orders
    everything); each record's `io_lock` orders its writes. A run is written only by the registry
    whose token is in its owner stamp; the others follow it from disk (`rescan`).
    """

    def __init__(self, root: str | Path, *, status_interval_s: float = 0.5) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.status_interval_s = status_interval_s
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.records: dict[str, _Record] = {}
        self.token = uuid.uuid4().hex
        self.owner = owner_stamp(self.token)
        #: folder name -> why it could not be read
        self.unreadable: dict[str, str] = {}
        #: the manager's `cancel`, so another manager in this process can ask it to stop a run
        self.cancel_hook: Any = None
        self._rescan_lock = threading.Lock()
        self._last_rescan = time.monotonic()

    def open(self) -> None:
        """Read every run folder (runs whose manager died become interrupted) and join the live set."""
        for folder in run_folders(self.root):
            try:
                rec = read_record(folder)
            except READ_ERRORS as exc:
                self.unreadable[folder.name] = f"{type(exc).__name__}: {exc}"
                continue
            self.adopt(rec)
        _LIVE_REGISTRIES.add(self)

    def close(self) -> None:
        _LIVE_REGISTRIES.discard(self)

    def run_dir(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise RunError(f"'{run_id}' is not a run id.")
        return self.root / run_id

    def record(self, run_id: str) -> _Record:
        rec = self.records.get(run_id)
        if rec is None:
            raise RunError(f"No run '{run_id}' in {self.root}.")
        return rec

    def peer(self, owner: dict[str, Any]) -> Registry | None:
        """Another open registry in this process with this owner token, if any."""
        return live_registry(owner, besides=self)

    # --- writing ------------------------------------------------------------------------------
    def create(self, config: RunConfig, backbone: Backbone, target: str) -> _Record:
        """A new queued run's record and folder (config.json written); the caller queues it."""
        run_id = _new_run_id(config.method)
        status = RunStatus(
            run_id=run_id,
            name=config.display_name,
            state="queued",
            method=config.method,
            task=config.task,
            total=config.train_config.steps,
            created=_now(),
            updated=_now(),
            backbone={"name": backbone.name, "weights_hash": backbone.weights_hash},
            config=_clean(config.to_dict()),
            owner=dict(self.owner),
        )
        rec = _Record(
            status=status,
            config=config,
            target=target,
            batch_size=config.train_config.batch_size,
            history_rev=1,
        )
        self.run_dir(run_id).mkdir(parents=True, exist_ok=False)
        _write_json(self.run_dir(run_id) / CONFIG_FILE, status.config)
        return rec

    def persist(self, rec: _Record, *, force: bool) -> None:
        """Write history.json, snapshot.npy (when changed) then status.json, each atomically.

        Unforced writes (progress) happen at most every `status_interval_s`; state changes force one.
        The io lock orders writes, the state lock is held only to copy, so readers never wait on disk.
        """
        now = time.monotonic()
        if not force and now - rec.last_write < self.status_interval_s:
            return
        with rec.io_lock:
            with self.lock:
                if rec.status.run_id not in self.records:
                    return  # deleted meanwhile
                rec.last_write = now
                s = rec.status
                revs = (rec.history_rev, rec.snapshot_rev)
                history = [dict(h) for h in s.history] if revs[0] != rec.written_revs[0] else None
                snapshot = s.snapshot if revs[1] != rec.written_revs[1] else None
                history_len = len(s.history)
                if s.device and s.device.startswith("cuda") and s.state == "running":
                    s.peak_mb = torch.cuda.max_memory_allocated(s.device) / 2**20
                status = {name: copy.deepcopy(getattr(s, name)) for name in _STATUS_FIELDS}
            status.update(format=FORMAT, format_version=FORMAT_VERSION, history_len=history_len)
            folder = self.run_dir(s.run_id)
            try:
                if history is not None:
                    _write_json(folder / HISTORY_FILE, history)
                if snapshot is not None:
                    _write_npy(folder / SNAPSHOT_FILE, snapshot)
                _write_json(folder / STATUS_FILE, _clean(status))
                rec.disk_mtime = (folder / STATUS_FILE).stat().st_mtime_ns
            except OSError as exc:
                # disk full, folder removed: the run goes on and its record in memory stays right
                with self.lock:
                    s.note = f"could not write the record to disk: {exc}"
                return
            rec.written_revs = revs

    def save_checkpoint_last(self, rec: _Record, method: SteeringMethod, steps_done: int) -> None:
        """The module so far, for `resume` (every `checkpoint_every` steps and at cancel)."""
        save_module(
            method,
            self.run_dir(rec.status.run_id) / CHECKPOINT_STEM,
            task=rec.status.task,
            extra={
                "class_names": rec.status.class_names,
                "run_id": rec.status.run_id,
                "steps_done": steps_done,
            },
        )
        with self.lock:
            rec.status.checkpoint_last_step = steps_done

    def resume_point(self, run_id: str) -> tuple[int, str | None, str | None]:
        """(steps already done, checkpoint stem or None, note) for resuming a run."""
        stem = self.run_dir(run_id) / CHECKPOINT_STEM
        if not all(p.is_file() for p in paths_for(stem)):
            return 0, None, "resumed from step 0 (no checkpoint_last was saved)"
        try:
            steps = int(read_card(stem).get("extra", {}).get("steps_done", 0))
        except (CheckpointError, ValueError, TypeError) as exc:
            return 0, None, f"resumed from step 0 (checkpoint_last unreadable: {exc})"
        return steps, str(stem), f"resumed from step {steps} (optimizer state restarted)"

    # --- reading and adopting -----------------------------------------------------------------
    def adopt(self, rec: _Record) -> bool:
        """Take in a record read from disk (without holding the lock); False if the id is known already.

        A queued / running run whose owner is gone becomes `interrupted`; one whose owner is alive is
        followed from disk (`external`) and left alone.
        """
        s = rec.status
        interrupted = False
        if s.state in ACTIVE_STATES:
            if running_elsewhere(s.run_id, s.owner, self.token):
                rec.external = True
            else:
                _mark_interrupted(s, "interrupted: the app stopped while this run was queued or running")
                interrupted = True
        with self.lock:
            if s.run_id in self.records:
                return False
            self.records[s.run_id] = rec
        if interrupted:
            self.persist(rec, force=True)
        if not rec.external:
            rec.settled.set()
        return True

    def maybe_rescan(self, every_s: float = 1.0) -> None:
        if time.monotonic() - self._last_rescan >= every_s:
            self.rescan()

    def rescan(self) -> list[str]:
        """Sync with the folder: pick up runs that other managers or processes added or changed (the
        CLI, an imported bundle, a resume elsewhere), follow the runs they are running, and drop
        finished runs whose folder was deleted. Returns the ids new here. Cheap: one stat per run,
        a read only where status.json changed; `list` calls it at most once a second."""
        if not self._rescan_lock.acquire(blocking=False):
            return []  # another thread is at it
        try:
            self._last_rescan = time.monotonic()
            with self.lock:
                known = {
                    r: (rec.external, not rec.settled.is_set(), rec.disk_mtime)
                    for r, rec in self.records.items()
                }
            folders = {p.name: p for p in run_folders(self.root)}
            added: list[str] = []
            for name in sorted(folders):
                info = known.get(name)
                if info is not None and not self._changed_on_disk(folders[name], *info):
                    continue
                try:
                    rec = read_record(folders[name])
                except READ_ERRORS as exc:
                    if info is None:
                        self.unreadable[name] = f"{type(exc).__name__}: {exc}"
                    continue
                self.unreadable.pop(name, None)
                if info is not None:
                    self._refresh(name, rec)
                elif self.adopt(rec):
                    added.append(name)
            with self.lock:
                gone = [
                    self.records.pop(r)
                    for r in sorted(set(known) - set(folders))
                    if r in self.records
                    and (self.records[r].external or self.records[r].status.state not in ACTIVE_STATES)
                ]
            for rec in gone:
                rec.settled.set()
            return added
        finally:
            self._rescan_lock.release()

    @staticmethod
    def _changed_on_disk(folder: Path, external: bool, busy: bool, mtime: int) -> bool:
        """Whether a known run needs re-reading: followed runs always, runs this manager is still
        writing (queued, running, or finishing: not yet settled) never, others when status.json changed."""
        if external:
            return True
        if busy:
            return False
        try:
            return (folder / STATUS_FILE).stat().st_mtime_ns != mtime
        except OSError:
            return False

    def _refresh(self, run_id: str, fresh: _Record) -> None:
        """Take what another manager wrote for a run this one is not running: follow it while its
        owner runs it, take it over as `interrupted` if the owner died mid-run."""
        active = fresh.status.state in ACTIVE_STATES
        alive = active and running_elsewhere(run_id, fresh.status.owner, self.token)
        with self.lock:
            rec = self.records.get(run_id)
            if rec is None or (not rec.external and not rec.settled.is_set()):
                return  # deleted, or this manager is writing it (started or resumed here meanwhile)
            rec.status, rec.config, rec.batch_size = fresh.status, fresh.config, fresh.batch_size
            rec.disk_mtime, rec.history_rev, rec.snapshot_rev, rec.written_revs = (
                fresh.disk_mtime,
                0,
                0,
                (0, 0),
            )
            if alive:
                if not rec.external:
                    rec.external, rec.settled = True, threading.Event()
                return
            rec.external = False
            if active:
                _mark_interrupted(rec.status, "interrupted: the process running it stopped")
        if active:
            self.persist(rec, force=True)
        rec.settled.set()
