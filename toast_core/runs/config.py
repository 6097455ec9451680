"""What a run is: its `RunConfig` (method, task, data sizes, training) and the task strings it reads."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from toast_core.methods import UnknownMethod, config_for, method_names
from toast_core.training.train import TrainConfig

FOLDER_PREFIX = "folder:"
EPISODE_PREFIX = "episode:"
RUN_DEVICES = ("auto", "cpu", "cuda")
#: TrainConfig fields a run sets from its own RunConfig fields (one place to set them)
RUN_OWNED_TRAIN_FIELDS = ("device", "seed", "snapshot_every", "num_threads")


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
