"""Background tuning runs: a FIFO queue, worker threads, live progress, cancel, and a registry on disk.

The app submits a `RunConfig`; a worker thread builds the data, trains through `train.train` and
writes the run's record under `root/<run_id>/`, so a page only ever polls a cheap snapshot and a
restarted app finds every run again. Nothing here imports Streamlit.

Layout of one run on disk (every file written through a temp file + os.replace, nothing pickled):

    config.json         the RunConfig
    status.json         state, progress, final metrics, timings, memory, error + traceback
    history.json        one entry per optimisation step (loss, lr, train_acc, val_* at evals)
    snapshot.npy        latest CLS-attention grid of the fixed probe image (np.save, no pickle);
                        a finished run always ends with the one of its final module
    module.*            the final steering module (checkpoints.save_module) once the run is done
    checkpoint_last.*   the module every `checkpoint_every` steps and at cancel, for `resume`

FORT methods (`methods.fort.FortMixin`) get their position prompts from the run's training images in
the worker, before training (`phase` says so meanwhile), as the few-shot protocol does on a support set.

Resuming continues from `checkpoint_last` with the remaining steps. The optimiser state (AdamW
moments, SGD momentum) is not saved, so it restarts; the learning rate continues from where the
schedule was (warmup remainder, then a cosine from there down to the same final lr).

Each status.json names its owner (host, pid, process start time, manager token). Opening a
registry marks a queued / running run `interrupted` only when its owner is gone; a run that a live
manager (in this process or another, e.g. the CLI beside the app) is running is followed from disk.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import socket
import statistics
import threading
import time
import traceback
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toast_core.backbone import Backbone
from toast_core.checkpoints import (
    CheckpointError,
    _atomic_write,
    load_module,
    paths_for,
    read_card,
    save_module,
)
from toast_core.data.base import LabeledImages
from toast_core.methods import UnknownMethod, build_method, config_for, method_names
from toast_core.methods.base import SteeringMethod
from toast_core.methods.fort import FortMixin
from toast_core.train import TrainConfig, TrainResult, cls_attention_grid, lr_at, train

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

FOLDER_PREFIX = "folder:"
EPISODE_PREFIX = "episode:"
RUN_DEVICES = ("auto", "cpu", "cuda")
#: TrainConfig fields a run sets from its own RunConfig fields (one place to set them)
RUN_OWNED_TRAIN_FIELDS = ("device", "seed", "snapshot_every", "num_threads")


class RunError(RuntimeError):
    """A run-manager request that cannot be done (unknown run, wrong state, no backbone)."""


# --- the run's configuration ----------------------------------------------------------------------
@dataclass(frozen=True)
class TaskRef:
    """A parsed task string: a built-in scene task, an image folder, or an N-way K-shot episode of one."""

    kind: str  # "builtin" | "folder" | "episode"
    name: str = ""  # built-in task name (builtin, or the episode's base when built-in)
    path: str = ""  # folder path (folder, or the episode's base when a folder)
    n_way: int = 0
    k_shot: int = 0
    n_query: int = 0
    index: int = 0


def parse_task(task: str) -> TaskRef:
    """Read a task string; raises ValueError saying which forms are accepted.

    - `"stars"` / `"glyphs"`: a built-in scene task (`data.scenes.TASKS`);
    - `"folder:<path>"`: an image folder (one subfolder per class, or `train/` + `val/` splits),
      e.g. the folder an uploaded zip was imported into;
    - `"episode:<n_way>:<k_shot>:<n_query>[:<index>]:<base>"`: one few-shot episode drawn from a
      built-in task or a `folder:` base; support = training set, query = validation set.
    """
    if not isinstance(task, str) or not task.strip():
        raise ValueError(
            "task must be a non-empty string (a built-in task name, 'folder:<path>' or 'episode:...')."
        )
    task = task.strip()
    if task.startswith(FOLDER_PREFIX):
        path = task[len(FOLDER_PREFIX) :].strip()
        if not path:
            raise ValueError("A folder task needs a path: 'folder:<path to an image folder>'.")
        return TaskRef("folder", path=path)
    if task.startswith(EPISODE_PREFIX):
        return _parse_episode(task)
    from toast_core.data.scenes import TASKS

    if task not in TASKS:
        raise ValueError(
            f"Unknown task '{task}'. Built-in tasks: {', '.join(TASKS)}; or use 'folder:<path>' or "
            "'episode:<n_way>:<k_shot>:<n_query>[:<index>]:<base task>'."
        )
    return TaskRef("builtin", name=task)


def _parse_episode(task: str) -> TaskRef:
    parts = task[len(EPISODE_PREFIX) :].split(":")
    numbers: list[int] = []
    while parts and parts[0].strip().isdigit() and len(numbers) < 4:
        numbers.append(int(parts.pop(0)))
    base = ":".join(parts).strip()
    if len(numbers) not in (3, 4) or not base:
        raise ValueError(
            f"Episode task '{task}' should read 'episode:<n_way>:<k_shot>:<n_query>[:<index>]:<base task>', "
            "e.g. 'episode:5:5:10:stars' or 'episode:3:1:5:0:folder:/data/birds'."
        )
    n_way, k_shot, n_query = numbers[:3]
    if min(n_way, k_shot, n_query) < 1:
        raise ValueError(f"Episode task '{task}': n_way, k_shot and n_query must be at least 1.")
    inner = parse_task(base)
    if inner.kind == "episode":
        raise ValueError(
            f"Episode task '{task}': the base must be a built-in task or a folder, not an episode."
        )
    return TaskRef(
        "episode",
        name=inner.name,
        path=inner.path,
        n_way=n_way,
        k_shot=k_shot,
        n_query=n_query,
        index=numbers[3] if len(numbers) == 4 else 0,
    )


def _train_config(value: TrainConfig | dict[str, Any] | None) -> TrainConfig:
    """A TrainConfig whose run-owned fields (device, seed, snapshot_every, num_threads) are left at their defaults."""
    defaults = TrainConfig()
    if value is None:
        return defaults
    if isinstance(value, TrainConfig):
        for name in RUN_OWNED_TRAIN_FIELDS:
            if getattr(value, name) != getattr(defaults, name):
                raise ValueError(
                    f"Set '{name}' on the RunConfig, not in its TrainConfig: the run decides it "
                    f"(TrainConfig.{name}={getattr(value, name)!r})."
                )
        return dataclasses.replace(value)
    if not isinstance(value, dict):
        raise ValueError(f"train must be a TrainConfig or a dict of its fields, got {type(value).__name__}.")
    valid = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUN_OWNED_TRAIN_FIELDS]
    owned = sorted(k for k in value if k in RUN_OWNED_TRAIN_FIELDS)
    if owned:
        raise ValueError(
            f"Set {', '.join(repr(k) for k in owned)} on the RunConfig itself, not in 'train' "
            "(the run owns device, seed, snapshot_every and the thread count)."
        )
    unknown = sorted(k for k in value if k not in valid)
    if unknown:
        raise ValueError(
            f"Unknown training setting(s): {', '.join(unknown)}. Valid settings: {', '.join(valid)}."
        )
    return TrainConfig(**value)


@dataclass
class RunConfig:
    """Everything a run needs besides the shared backbone: method, task, data sizes and training.

    `seed` seeds the method's initialisation and the training loop; `data_seed` picks the images,
    so runs of different methods on one task see the same data. `probe_index` is the validation
    image (training image when there is no validation set) whose attention is snapshotted every
    `snapshot_every` steps (0 = only the final one) and always once more at the end of the run;
    `checkpoint_every` saves the module for `resume` (0 = never).
    For episode tasks the episode fixes the data sizes and `per_class` / `val_per_class` are unused.
    """

    method: str
    task: str
    method_config: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    per_class: int = 50
    val_per_class: int = 10
    train: TrainConfig | dict[str, Any] | None = None
    device: str = "auto"
    seed: int = 0
    data_seed: int = 0
    probe_index: int = 0
    snapshot_every: int = 10
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise ValueError(
                f"Unknown steering method '{self.method}'. Known methods: {', '.join(method_names())}."
            )
        if not isinstance(self.method_config, dict):
            raise ValueError(
                f"method_config must be a dict of the method's settings, got {type(self.method_config).__name__}."
            )
        try:
            config_for(self.method, **self.method_config)
        except UnknownMethod as exc:  # pragma: no cover - checked above
            raise ValueError(str(exc)) from None
        except TypeError as exc:
            raise ValueError(f"The settings for method '{self.method}' do not fit: {exc}") from exc
        parse_task(self.task)
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError("name must be a string or None.")
        for key, low in (
            ("per_class", 1),
            ("val_per_class", 0),
            ("probe_index", 0),
            ("snapshot_every", 0),
            ("checkpoint_every", 0),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}; got {value!r}.")
        for key in ("seed", "data_seed"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int):
                raise ValueError(f"{key} must be an integer; got {getattr(self, key)!r}.")
        device = str(self.device).lower()
        base = device.split(":", 1)[0]
        if base not in RUN_DEVICES or (
            ":" in device and (base != "cuda" or not device.split(":", 1)[1].isdigit())
        ):
            raise ValueError(f"device must be one of auto, cpu, cuda or cuda:<index>; got {self.device!r}.")
        self.device = device
        self.train = _train_config(self.train)

    @property
    def train_config(self) -> TrainConfig:
        assert isinstance(self.train, TrainConfig)
        return self.train

    @property
    def display_name(self) -> str:
        return self.name or f"{self.method} on {self.task}"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["method_config"] = copy.deepcopy(self.method_config)
        out["train"] = {
            k: v for k, v in self.train_config.to_dict().items() if k not in RUN_OWNED_TRAIN_FIELDS
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            raise ValueError(
                f"Unknown run setting(s): {', '.join(unknown)}. Valid settings: {', '.join(sorted(known))}."
            )
        return cls(**copy.deepcopy(data))


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

    def snapshot(self, with_history: bool = True) -> RunStatus:
        s = self.status
        out = dataclasses.replace(s)
        out.history = [dict(h) for h in s.history] if with_history else []
        out.snapshot = None if s.snapshot is None else s.snapshot.copy()
        for name in ("memory", "final", "timings", "backbone", "config", "owner"):
            setattr(out, name, copy.deepcopy(getattr(s, name)))
        out.class_names = None if s.class_names is None else list(s.class_names)
        return out


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


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _now() -> float:
    return time.time()


def _new_run_id(method: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{method}-{uuid.uuid4().hex[:6]}"


_HOST = socket.gethostname()
#: managers alive in this process, so a second manager on the same root leaves their runs alone
_LIVE_MANAGERS: weakref.WeakSet[RunManager] = weakref.WeakSet()


def _process_start(pid: int) -> str | None:
    """When a process started (Linux /proc, clock ticks since boot), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    except OSError:
        return False
    now = _process_start(pid)
    return not (start and now and now != start)


def _resume_train_config(base: TrainConfig, offset: int) -> TrainConfig:
    """The remaining steps of `base` after `offset` done: lr continues from the schedule's value there."""
    remaining = max(0, base.steps - offset)
    if offset <= 0:
        return base
    lr_now = max(lr_at(offset, base), base.lr * 1e-6)  # TrainConfig needs lr > 0
    end_lr = base.min_lr * base.lr
    return dataclasses.replace(
        base,
        steps=remaining,
        lr=lr_now if base.warmup_steps <= offset else base.lr,
        warmup_steps=max(0, base.warmup_steps - offset),
        min_lr=min(1.0, end_lr / lr_now) if base.warmup_steps <= offset and lr_now > 0 else base.min_lr,
    )


# --- the callbacks a worker hands to train() ------------------------------------------------------
class _Listener:
    """train() callbacks: update the live record under the lock, write it out (throttled), checkpoint."""

    def __init__(
        self, manager: RunManager, record: _Record, method: SteeringMethod, offset: int, n_train: int
    ):
        self.manager, self.record, self.method = manager, record, method
        self.offset, self.n_train = offset, max(1, n_train)

    def on_step(self, step: int, total: int, metrics: dict[str, float]) -> None:
        rec, now = self.record, time.perf_counter()
        abs_step = self.offset + step
        with self.manager._lock:
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
            self.manager._save_checkpoint_last(rec, self.method, abs_step)
        self.manager._persist(rec, force=False)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        abs_step = self.offset + step
        with self.manager._lock:
            for entry in reversed(self.record.status.history):
                if entry.get("step") == abs_step:
                    entry.update(_clean({k: v for k, v in metrics.items() if k != "step"}))
                    self.record.history_rev += 1
                    break

    def on_snapshot(self, step: int, attention: np.ndarray) -> None:
        grid = np.asarray(attention, dtype=np.float32).copy()
        with self.manager._lock:
            self.record.status.snapshot = grid
            self.record.status.snapshot_step = self.offset + step
            self.record.snapshot_rev += 1
        self.manager._persist(self.record, force=False)


# --- the manager ----------------------------------------------------------------------------------
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
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.backbone = backbone
        self.cpu_workers = cpu_workers
        self.gpu_workers_per_device = gpu_workers_per_device
        self.status_interval_s = status_interval_s
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError("cpu_threads must be >= 1 (or None for cores // cpu_workers).")
        self.cpu_threads = cpu_threads or max(1, _cpu_cores() // max(1, cpu_workers))
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._records: dict[str, _Record] = {}
        self._queue: deque[str] = deque()
        self._closing = False
        self._backbones: dict[str, Backbone] = {}
        self._backbone_lock = threading.Lock()
        self._rescan_lock = threading.Lock()
        self._last_rescan = time.monotonic()
        self._token = uuid.uuid4().hex
        self.owner = {
            "host": _HOST,
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "manager": self._token,
        }
        self.unreadable: dict[str, str] = {}
        self._load_registry()
        _LIVE_MANAGERS.add(self)
        self.worker_devices = ["cpu"] * cpu_workers
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                self.worker_devices += [f"cuda:{i}"] * gpu_workers_per_device
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
        with self._cond:
            if self._closing:
                shutil.rmtree(self.run_dir(run_id), ignore_errors=True)
                raise RunError("This RunManager has been shut down; start a new one to submit runs.")
            self._records[run_id] = rec
            self._queue.append(run_id)
        self._persist(rec, force=True)
        with self._cond:
            self._cond.notify_all()
        return run_id

    def status(self, run_id: str, *, history: bool = True) -> RunStatus:
        """A deep copy of the run's record right now (cheap: readers never wait on a training step)."""
        with self._lock:
            external = self._record(run_id).external
        if external:
            self._maybe_rescan()
        with self._lock:
            return self._record(run_id).snapshot(with_history=history)

    def list(self, *, history: bool = True) -> list[RunStatus]:
        """Every run in this registry, oldest first (new folders on disk are picked up, see `rescan`)."""
        self._maybe_rescan()
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: (r.status.created, r.status.run_id))
            return [r.snapshot(with_history=history) for r in records]

    def cancel(self, run_id: str) -> bool:
        """Stop a queued run now, or a running one before its next step; False if already finished."""
        with self._cond:
            rec = self._record(run_id)
            external, owner = rec.external, dict(rec.status.owner)
        if external:  # another manager runs it: ask it, if it lives in this process
            other = self._live_manager(owner)
            if other is None:
                raise RunError(
                    f"Run '{run_id}' is run by another process (pid {owner.get('pid')} on {owner.get('host')}); "
                    "cancel it there."
                )
            return other.cancel(run_id)
        with self._cond:
            rec = self._record(run_id)
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
        self._persist(rec, force=True)
        if was_queued:  # a running run is settled by its worker, after its last write
            rec.settled.set()
        return True

    def wait(self, run_id: str, timeout: float | None = None) -> RunStatus:
        """Block until the run has finished and its record is on disk; TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                rec = self._record(run_id)
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
            rec = self._record(run_id)
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
        offset, path, note = self._resume_point(run_id)
        target = self._target_device(rec.config.device)
        with self._cond:
            if self._closing:
                raise RunError("This RunManager has been shut down; start a new one to resume runs.")
            if rec.status.state not in RESUMABLE_STATES or self._records.get(run_id) is not rec:
                raise RunError(f"Run '{run_id}' changed meanwhile (now {rec.status.state}); not resumed.")
            s = rec.status
            s.history = [h for h in s.history if h.get("step", 0) <= offset]
            rec.history_rev += 1
            s.step, s.resumed_from, s.state = offset, offset, "queued"
            s.owner = dict(self.owner)
            s.error = s.error_kind = s.traceback = None
            s.cancel_requested_step, s.ended, s.eta_s, s.note = None, None, None, note
            s.epoch = offset * rec.batch_size / max(1, s.train_size or 1)
            rec.resume_path, rec.target = path, target
            rec.cancel_event, rec.settled = threading.Event(), threading.Event()
            rec.step_marks.clear()
            self._queue.append(run_id)
            self._cond.notify_all()
        self._persist(rec, force=True)
        return run_id

    def load_run_module(self, run_id: str) -> SteeringMethod:
        """The trained steering module of a done run, on the manager's backbone (eval mode)."""
        backbone = self._require_backbone()
        with self._lock:
            rec = self._record(run_id)
            if rec.status.state != "done" or not rec.status.checkpoint:
                raise RunError(f"Run '{run_id}' is {rec.status.state}; only done runs have a final module.")
        return load_module(self.run_dir(run_id) / MODULE_STEM, backbone)

    def delete(self, run_id: str) -> None:
        """Remove a finished (or still queued) run and its files; a running run must be cancelled first."""
        with self._cond:
            rec = self._record(run_id)
            if rec.external:
                raise RunError(f"Run '{run_id}' is being run by another manager; it cannot be deleted now.")
            if rec.status.state == "running":
                raise RunError(
                    f"Run '{run_id}' is running; cancel it and wait for it to stop before deleting."
                )
            if rec.status.state == "queued":
                self._queue.remove(run_id)
            del self._records[run_id]
            self._cond.notify_all()
        rec.settled.set()
        with rec.io_lock:
            path = self.run_dir(run_id)
            if path.resolve().parent == self.root.resolve():
                shutil.rmtree(path, ignore_errors=True)

    def shutdown(self, *, cancel: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the workers. `cancel`: cancel queued and running runs (else the queue drains first)."""
        _LIVE_MANAGERS.discard(self)
        with self._cond:
            self._closing = True
            active = (
                [r for r, rec in self._records.items() if rec.status.state in ACTIVE_STATES] if cancel else []
            )
            self._cond.notify_all()
        for run_id in active:  # outside the lock: cancel() writes the record (io lock before state lock)
            self.cancel(run_id)
        if wait:
            for t in self._threads:
                t.join(timeout)

    def run_dir(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise RunError(f"'{run_id}' is not a run id.")
        return self.root / run_id

    def get_config(self, run_id: str) -> RunConfig:
        with self._lock:
            rec = self._record(run_id)
            if rec.config is None:
                raise RunError(f"Run '{run_id}' has an unreadable config ({rec.status.note}).")
            return RunConfig.from_dict(rec.config.to_dict())

    # --- lookups ------------------------------------------------------------------------------
    def _record(self, run_id: str) -> _Record:
        rec = self._records.get(run_id)
        if rec is None:
            raise RunError(f"No run '{run_id}' in {self.root}.")
        return rec

    def _require_backbone(self) -> Backbone:
        if self.backbone is None:
            raise RunError(
                "This RunManager was opened without a backbone; it can list runs but not train or load them."
            )
        return self.backbone

    def _target_device(self, device: str) -> str:
        """Where a run will be queued: 'cpu', 'cuda' (any GPU) or 'cuda:<i>'; refuses what is not here."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and self.gpu_workers_per_device > 0 else "cpu"
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"Device '{device}' was asked for but no CUDA GPU is visible to PyTorch.")
            if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
                raise ValueError(
                    f"Device '{device}' does not exist; {torch.cuda.device_count()} GPU(s) are visible."
                )
            if self.gpu_workers_per_device == 0:
                raise ValueError("This RunManager has no GPU workers (gpu_workers_per_device=0).")
        elif self.cpu_workers == 0:
            raise ValueError("This RunManager has no CPU workers (cpu_workers=0); choose device 'cuda'.")
        return device

    def _backbone_for(self, device: str) -> Backbone:
        """The shared backbone on `device`: the given one where it lives, else a frozen copy made once."""
        backbone = self._require_backbone()
        if str(backbone.device) == device:
            return backbone
        with self._backbone_lock:
            if device not in self._backbones:
                model = copy.deepcopy(backbone.model).to(device).eval().requires_grad_(False)
                self._backbones[device] = dataclasses.replace(backbone, model=model)
            return self._backbones[device]

    # --- the worker ---------------------------------------------------------------------------
    def _take(self, device: str) -> _Record | None:
        """The oldest queued run this worker may take (called under the lock)."""
        for run_id in self._queue:
            target = self._records[run_id].target
            if target == device or (target == "cuda" and device.startswith("cuda")):
                self._queue.remove(run_id)
                return self._records[run_id]
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
            self._persist(rec, force=True)
            self._execute(rec, device)

    def _execute(self, rec: _Record, device: str) -> None:
        """Run one segment; every failure ends in the record, never in the worker thread."""
        out_of_memory = False
        try:
            result, method, class_names = self._train(rec, device)
            self._finish(rec, result, method, class_names)
        except torch.cuda.OutOfMemoryError as exc:
            out_of_memory = True
            assert rec.config is not None
            first_line = (str(exc).splitlines() or ["OutOfMemoryError"])[0]
            self._fail(
                rec,
                f"CUDA out of memory on {device} at batch size {rec.batch_size} (evaluation batch size "
                f"{rec.config.train_config.eval_batch_size}): lower batch_size or use the CPU, and "
                f"resubmit. ({first_line})",
                "oom",
            )
        except Exception as exc:
            self._fail(rec, f"{type(exc).__name__}: {exc}", "exception")
        if out_of_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()  # after the except block: the traceback no longer holds the tensors

    def _train(self, rec: _Record, device: str) -> tuple[TrainResult, SteeringMethod, list[str]]:
        config = rec.config
        assert config is not None
        backbone = self._backbone_for(device)
        self._set_phase(rec, "loading data")
        train_set, val_set = load_task_data(config, int(backbone.layout.img_size[0]))
        probe_pool = val_set if val_set is not None and len(val_set) else train_set
        if config.probe_index >= len(probe_pool):
            which = "validation" if probe_pool is val_set else "training"
            raise ValueError(
                f"probe_index {config.probe_index} is out of range: the {which} set has {len(probe_pool)} images."
            )
        method, offset = self._starting_module(rec, backbone, train_set.num_classes)
        with self._lock:
            s = rec.status
            s.num_classes, s.class_names = train_set.num_classes, list(train_set.class_names)
            s.train_size, s.val_size = len(train_set), (len(val_set) if val_set is not None else 0)
        base = dataclasses.replace(
            config.train_config,
            device=device,
            seed=config.seed + offset,
            snapshot_every=config.snapshot_every,
            num_threads=self.cpu_threads if device == "cpu" else None,
        )
        prompts_s = self._prepare_fort(rec, method, backbone, train_set, offset, base.num_threads)
        train_config = _resume_train_config(base, offset)
        listener = _Listener(self, rec, method, offset, len(train_set))
        self._set_phase(rec, None)
        probe = probe_pool.images[config.probe_index]
        result = train(
            method,
            train_set,
            val_set,
            train_config,
            callbacks=listener,
            probe_image=probe,
            cancel=rec.cancel_event,
        )
        self._final_snapshot(rec, method, probe, result, listener)
        if prompts_s is not None:
            result.timings["fort_prompts_s"] = prompts_s
        result.history = [dict(_clean(h), step=offset + int(h["step"])) for h in result.history]
        return result, method, list(train_set.class_names)

    def _set_phase(self, rec: _Record, phase: str | None) -> None:
        with self._lock:
            changed = rec.status.phase != phase
            rec.status.phase, rec.status.updated = phase, _now()
        if changed:
            self._persist(rec, force=True)

    def _prepare_fort(
        self,
        rec: _Record,
        method: SteeringMethod,
        backbone: Backbone,
        train_set: LabeledImages,
        offset: int,
        threads: int | None,
    ) -> float | None:
        """FORT's position prompts from the run's training images (its support set), before training.

        Always computed on the run's starting module (a fresh build under the run's seed), so a
        resumed run trains with exactly the prompts it started with. Returns the seconds it took,
        or None for methods without prompts (and FORT with fort_alpha = 0, which is its base method).
        """
        if not isinstance(method, FortMixin) or not method.fort_active or rec.cancel_event.is_set():
            return None  # a run cancelled meanwhile trains no step, so it needs no prompts
        config = rec.config
        assert config is not None
        self._set_phase(rec, f"preparing FORT position prompts on {len(train_set)} training images")
        t0 = time.perf_counter()
        old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            if offset > 0:  # resumed: the checkpoint is not the starting module
                start = build_method(config.method, backbone, train_set.num_classes, config.method_config)
                assert isinstance(start, FortMixin)
                start.prepare_prompts(train_set)
                assert start.prompt_inputs is not None and start.prompt_targets is not None
                method.set_prompts(start.prompt_inputs, start.prompt_targets, start.prompt_importance)
            else:
                method.prepare_prompts(train_set)
        finally:
            if threads:
                torch.set_num_threads(old_threads)
        return time.perf_counter() - t0

    def _final_snapshot(
        self, rec: _Record, method: SteeringMethod, probe: torch.Tensor, result: TrainResult, listener: _Listener
    ) -> None:
        """The probe image's attention under the final module, unless the cadence already took it
        (steps not a multiple of snapshot_every, snapshot_every = 0): what a finished run shows."""
        if result.steps_done == 0 and rec.status.snapshot is not None:
            return  # nothing trained in this segment: the snapshot on record is still the module's
        with self._lock:
            last = rec.status.snapshot_step if rec.status.snapshot is not None else None
        if last == listener.offset + result.steps_done:
            return
        grid = cls_attention_grid(method, probe.unsqueeze(0))[0]
        listener.on_snapshot(result.steps_done, grid)

    def _starting_module(
        self, rec: _Record, backbone: Backbone, num_classes: int
    ) -> tuple[SteeringMethod, int]:
        """(module, steps already done): checkpoint_last when resuming from one, else a fresh module.

        A checkpoint that no longer loads (e.g. the process died between its two files) restarts the
        run from step 0, and the record's note says so.
        """
        config = rec.config
        assert config is not None
        if rec.resume_path:
            try:
                method = load_module(rec.resume_path, backbone)
            except CheckpointError as exc:
                with self._lock:
                    rec.status.history, rec.status.step, rec.status.resumed_from = [], 0, 0
                    rec.history_rev += 1
                    rec.status.note = f"resumed from step 0 (checkpoint_last did not load: {exc})"
                rec.resume_path = None
            else:
                if method.num_classes != num_classes:
                    raise ValueError(
                        f"The checkpoint has {method.num_classes} classes but the task now has {num_classes}."
                    )
                return method, rec.status.resumed_from or 0
        return build_method(config.method, backbone, num_classes, config.method_config), 0

    def _finish(
        self, rec: _Record, result: TrainResult, method: SteeringMethod, class_names: list[str]
    ) -> None:
        """Write the module (final, or checkpoint_last for a cancelled run) and the terminal record."""
        offset = rec.status.resumed_from or 0
        steps_done = offset + result.steps_done
        card = None
        if result.cancelled:
            if result.steps_done > 0:
                self._save_checkpoint_last(rec, method, steps_done)
        else:
            card = save_module(
                method,
                self.run_dir(rec.status.run_id) / MODULE_STEM,
                task=rec.status.task,
                metrics=_clean(result.final),
                timings=_clean(result.timings),
                extra={"class_names": class_names, "run_id": rec.status.run_id, "run_name": rec.status.name},
            )
            for path in paths_for(self.run_dir(rec.status.run_id) / CHECKPOINT_STEM):
                path.unlink(missing_ok=True)
        with self._cond:
            s = rec.status
            prior = [h for h in s.history if h.get("step", 0) <= offset]
            s.history = prior + result.history
            rec.history_rev += 1
            s.step = steps_done
            s.final, s.timings, s.memory = _clean(result.final), _clean(result.timings), _clean(result.memory)
            s.peak_mb, s.amp = s.memory.get("peak_mb"), result.amp
            s.state = "cancelled" if result.cancelled else "done"
            s.phase = None
            s.checkpoint = None if card is None else str(card.relative_to(self.root))
            if card is not None:
                s.checkpoint_last_step = None
            s.ended = s.updated = _now()
            s.eta_s = None
            rec.resume_path = None
            self._cond.notify_all()
        self._persist(rec, force=True)
        rec.settled.set()

    def _fail(self, rec: _Record, message: str, kind: str) -> None:
        with self._cond:
            s = rec.status
            s.state, s.error, s.error_kind = "failed", message, kind
            s.phase = None
            s.traceback = traceback.format_exc()
            s.ended = s.updated = _now()
            s.eta_s = None
            if kind == "oom":
                s.memory = {**s.memory, "oom_batch_size": rec.batch_size}
            self._cond.notify_all()
        self._persist(rec, force=True)
        rec.settled.set()

    # --- writing the record -------------------------------------------------------------------
    def _save_checkpoint_last(self, rec: _Record, method: SteeringMethod, steps_done: int) -> None:
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
        with self._lock:
            rec.status.checkpoint_last_step = steps_done

    def _resume_point(self, run_id: str) -> tuple[int, str | None, str | None]:
        """(steps already done, checkpoint stem or None, note) for resuming a run."""
        stem = self.run_dir(run_id) / CHECKPOINT_STEM
        if not all(p.is_file() for p in paths_for(stem)):
            return 0, None, "resumed from step 0 (no checkpoint_last was saved)"
        try:
            steps = int(read_card(stem).get("extra", {}).get("steps_done", 0))
        except (CheckpointError, ValueError, TypeError) as exc:
            return 0, None, f"resumed from step 0 (checkpoint_last unreadable: {exc})"
        return steps, str(stem), f"resumed from step {steps} (optimizer state restarted)"

    def _persist(self, rec: _Record, *, force: bool) -> None:
        """Write history.json, snapshot.npy (when changed) then status.json, each atomically.

        Unforced writes (progress) happen at most every `status_interval_s`; state changes force one.
        The io lock orders writes, the state lock is held only to copy, so readers never wait on disk.
        """
        now = time.monotonic()
        if not force and now - rec.last_write < self.status_interval_s:
            return
        with rec.io_lock:
            with self._lock:
                if rec.status.run_id not in self._records:
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
                with self._lock:
                    s.note = f"could not write the record to disk: {exc}"
                return
            rec.written_revs = revs

    # --- reading the registry -----------------------------------------------------------------
    def _load_registry(self) -> None:
        """Read every run folder; runs that were queued or running when their manager died become interrupted."""
        for folder in self._run_folders():
            try:
                rec = self._read_record(folder)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.unreadable[folder.name] = f"{type(exc).__name__}: {exc}"
                continue
            self._adopt(rec)

    def _run_folders(self) -> list[Path]:
        try:
            return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return []

    def _live_manager(self, owner: dict[str, Any]) -> RunManager | None:
        """The live manager in this process with this owner token, if any."""
        if owner.get("host") != _HOST or owner.get("pid") != os.getpid():
            return None
        for manager in list(_LIVE_MANAGERS):
            if manager is not self and manager._token == owner.get("manager"):
                return manager
        return None

    def _running_elsewhere(self, run_id: str, owner: dict[str, Any]) -> bool:
        """Whether the run's owner still runs it: a live manager here that has it active, or a live pid."""
        if not owner or owner.get("host") != _HOST or owner.get("manager") == self._token:
            return False
        if owner.get("pid") == os.getpid():
            other = self._live_manager(owner)
            if other is None:
                return False
            with other._lock:
                theirs = other._records.get(run_id)
                return theirs is not None and not theirs.external and theirs.status.state in ACTIVE_STATES
        try:
            return _pid_alive(int(owner["pid"]), owner.get("start"))
        except (KeyError, TypeError, ValueError):
            return False

    def _adopt(self, rec: _Record) -> bool:
        """Take in a record read from disk (without holding the lock); False if the id is known already.

        A queued / running run whose owner is gone becomes `interrupted`; one whose owner is alive is
        followed from disk (`external`) and left alone.
        """
        s = rec.status
        interrupted = False
        if s.state in ACTIVE_STATES:
            if self._running_elsewhere(s.run_id, s.owner):
                rec.external = True
            else:
                s.state, s.eta_s, s.phase, interrupted = "interrupted", None, None, True
                s.note = "interrupted: the app stopped while this run was queued or running"
        with self._lock:
            if s.run_id in self._records:
                return False
            self._records[s.run_id] = rec
        if interrupted:
            self._persist(rec, force=True)
        if not rec.external:
            rec.settled.set()
        return True

    def _maybe_rescan(self, every_s: float = 1.0) -> None:
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
            with self._lock:
                known = {
                    r: (rec.external, not rec.settled.is_set(), rec.disk_mtime)
                    for r, rec in self._records.items()
                }
            folders = {p.name: p for p in self._run_folders()}
            added: list[str] = []
            for name in sorted(folders):
                info = known.get(name)
                if info is not None and not self._changed_on_disk(folders[name], *info):
                    continue
                try:
                    rec = self._read_record(folders[name])
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    if info is None:
                        self.unreadable[name] = f"{type(exc).__name__}: {exc}"
                    continue
                self.unreadable.pop(name, None)
                if info is not None:
                    self._refresh(name, rec)
                elif self._adopt(rec):
                    added.append(name)
            with self._lock:
                gone = [
                    self._records.pop(r)
                    for r in sorted(set(known) - set(folders))
                    if r in self._records
                    and (self._records[r].external or self._records[r].status.state not in ACTIVE_STATES)
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
        alive = active and self._running_elsewhere(run_id, fresh.status.owner)
        with self._lock:
            rec = self._records.get(run_id)
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
                s = rec.status
                s.state, s.eta_s, s.phase = "interrupted", None, None
                s.note = "interrupted: the process running it stopped"
        if active:
            self._persist(rec, force=True)
        rec.settled.set()

    def _read_record(self, folder: Path) -> _Record:
        mtime = (folder / STATUS_FILE).stat().st_mtime_ns  # before reading: a later write is noticed
        raw = _read_json(folder / STATUS_FILE)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"{STATUS_FILE} is not a run record (format '{FORMAT}').")
        if raw.get("run_id") != folder.name:
            raise ValueError(f"{STATUS_FILE} names run '{raw.get('run_id')}', not '{folder.name}'.")
        fields = {k: raw[k] for k in _STATUS_FIELDS if k in raw}
        status = RunStatus(**fields)
        history_path = folder / HISTORY_FILE
        status.history = _read_json(history_path) if history_path.is_file() else []
        snap_path = folder / SNAPSHOT_FILE
        if snap_path.is_file():
            status.snapshot = np.load(snap_path, allow_pickle=False)
        config_raw = _read_json(folder / CONFIG_FILE)
        status.config = config_raw
        try:
            config: RunConfig | None = RunConfig.from_dict(config_raw)
        except (ValueError, TypeError) as exc:
            config, status.note = None, f"config unreadable here: {exc}"
        rec = _Record(status=status, config=config, disk_mtime=mtime)
        if config is not None:
            rec.batch_size = config.train_config.batch_size
        return rec


__all__ = [
    "ACTIVE_STATES",
    "FINISHED_STATES",
    "STATES",
    "RunConfig",
    "RunError",
    "RunManager",
    "RunStatus",
    "TaskRef",
    "load_task_data",
    "parse_task",
]
