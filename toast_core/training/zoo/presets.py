"""Lecture presets picked from the test split by measured criteria, not by hand.

For each task, the zoo's task modules see the first `CANDIDATES` test scenes once (batched CLS
views); each criterion below is a rule over those numbers that names one scene and says in one
sentence what to look at. `zoo build` writes the result to checkpoints/zoo/presets.json, the app
reads it, and `recompute == stored` is a test.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toast_core.core.backbone import Backbone
from toast_core.training.zoo.build import ZOO_DIR
from toast_core.training.zoo.catalog import load_entry, zoo_entries

CANDIDATES = 64
PRESETS_FILE = "presets.json"


@dataclass(frozen=True)
class LecturePreset:
    """A scene of a task's test split, the view that makes its point, and that point in a sentence."""

    key: str
    title: str
    task: str
    split: str
    index: int
    view: str
    note: str
    criterion: str


def _scores(backbone: Backbone, task: str, root: Path) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    from toast_core.data.scenes import TASKS, make_task_split
    from toast_core.training.train import view_over
    from toast_core.views.objects import object_masses

    per_class = -(-CANDIDATES // len(TASKS[task].classes))
    # scene i of this split is scene i of compare.scene_image (label = i mod classes, data seed 0)
    data = make_task_split(task, "test", per_class=per_class, seed=0).subset(list(range(CANDIDATES)))
    out: dict[str, dict[str, np.ndarray]] = {}
    for e in zoo_entries(backbone, root, task):
        if (e.zoo.get("recipe") or {}).get("kind") != "task":
            continue
        method = load_entry(e, backbone)
        view = view_over(method, data.images, "cls", 64, layer=-1, head="mean")
        mass = object_masses(view.map, data.masks, data.objects)
        out[e.entry] = {
            "right": np.asarray(view.pred) == data.labels.numpy(),
            "focus": mass["on_target"],
            "object_share": mass["on_target"] / np.maximum(mass["on_objects"], 1e-12),
            # the card's accuracy on the whole test split: "most accurate" means what the zoo table says
            "test_acc": np.asarray(float(e.test.get("acc", np.nan))),
        }
    return out, data.labels.numpy()


def pick_presets(backbone: Backbone, task: str, root: Path = ZOO_DIR) -> list[LecturePreset]:
    """The task's presets by rule (an empty list where the zoo has too few modules for the task)."""
    scores, _ = _scores(backbone, task, root)
    if "linear" not in scores or len(scores) < 3:
        return []
    steering = {k: v for k, v in scores.items() if k != "linear"}
    accs = {k: float(v["test_acc"]) if np.isfinite(v["test_acc"]) else float(np.mean(v["right"])) for k, v in steering.items()}
    best = max(accs, key=accs.get)
    lin, top = scores["linear"], scores[best]
    presets: list[LecturePreset] = []
    # 1. linear wrong, the best steering module right: where its attention moved most onto the object
    gain = np.where(~lin["right"] & top["right"], top["focus"] - lin["focus"], -np.inf)
    if np.isfinite(gain).any():
        i = int(np.argmax(gain))
        presets.append(LecturePreset(
            f"{task}-steered", f"{task}: the linear probe misreads, {best} does not", task, "test", i, "cls",
            f"The linear probe keeps the backbone's attention and gets this scene wrong; {best} (the most "
            f"accurate steering module here) reads it right with {gain[i]:+.0%} more attention on the deciding object.",
            f"argmax over scenes where linear is wrong and {best} right of (focus_{best} - focus_linear) "
            f"({best}: the steering module with the highest test accuracy on its card)",
        ))
    # 2. the scene where the modules' attention on the deciding object differs most
    stack = np.stack([v["focus"] for v in scores.values()])
    spread = stack.max(axis=0) - stack.min(axis=0)
    i = int(np.argmax(spread))
    names = list(scores)
    hi, lo = names[int(stack[:, i].argmax())], names[int(stack[:, i].argmin())]
    presets.append(LecturePreset(
        f"{task}-spread", f"{task}: where the methods look most differently", task, "test", i, "cls",
        f"On this scene {hi} puts {stack[:, i].max():.0%} of its last-layer CLS attention on the deciding object "
        f"and {lo} only {stack[:, i].min():.0%}: compare where each one looks instead.",
        "argmax over scenes of (max - min over modules of focus share)",
    ))
    # 3. every module right, yet the linear probe looks mostly at other objects
    all_right = np.all(np.stack([v["right"] for v in scores.values()]), axis=0)
    wandering = np.where(all_right, -lin["object_share"], -np.inf)
    if np.isfinite(wandering).any():
        i = int(np.argmax(wandering))
        presets.append(LecturePreset(
            f"{task}-prior", f"{task}: right answer, attention on distractors", task, "test", i, "rollout",
            f"Every module is right here, but only {lin['object_share'][i]:.0%} of the linear probe's attention on "
            "objects lands on the deciding one: the frozen backbone looks at objects, not at the one that decides.",
            "argmin over scenes every module gets right of the linear probe's object share",
        ))
    if "toast" in scores:
        gain = scores["toast"]["focus"] - lin["focus"]
        i = int(np.argmax(np.where(scores["toast"]["right"], gain, -np.inf)))
        presets.append(LecturePreset(
            f"{task}-toast", f"{task}: TOAST pass 1 vs pass 2", task, "test", i, "toast_passes",
            "Top-down steering changes only the values in pass 2: compare the unsteered pass 1 with pass 2 on the "
            f"scene where TOAST's attention on the deciding object gains most over the frozen backbone ({gain[i]:+.0%}).",
            "argmax over scenes TOAST gets right of (focus_toast - focus_linear)",
        ))
    return presets


def pick_switch_presets(backbone: Backbone, root: Path = ZOO_DIR) -> list[LecturePreset]:
    """One image, two tasks: the mixed scene (a star and a digit) where the method whose attention
    follows the task most on average (`task_switch`) moves it most between its two modules."""
    from toast_core.data.mixed import MIXED_TASK, make_mixed_split
    from toast_core.training.zoo.task_switch import switch_scores

    scores = switch_scores(backbone, make_mixed_split(CANDIDATES, 0), root)
    if len(scores) < 2:
        return []
    best = max(scores, key=lambda e: float(scores[e]["switch"].mean()))
    v = scores[best]
    i = int(np.argmax(v["switch"]))
    others = ", ".join(f"{e} {float(w['switch'][i]):+.2f}" for e, w in scores.items() if e != best)
    return [LecturePreset(
        f"{MIXED_TASK}-switch", "One image, two tasks: does attention follow the task?", MIXED_TASK, "test", i, "cls",
        f"{best}'s stars module puts {v['s_star'][i]:.0%} of its last-layer CLS attention on the star and its glyphs "
        f"module {v['g_digit'][i]:.0%} on the digit (switch {float(v['switch'][i]):+.2f}); on the same image: {others}.",
        f"argmax over the first {CANDIDATES} mixed scenes of {best}'s switch ({best}: the largest mean switch)",
    )]


def write_presets(backbone: Backbone, tasks: list[str], root: Path = ZOO_DIR) -> Path:
    """Recompute the presets of `tasks` (and of the mixed scenes), keeping other tasks' stored ones."""
    from toast_core.data.mixed import MIXED_TASK

    path = root / PRESETS_FILE
    try:
        stored = json.loads(path.read_text())
        data = stored["presets"] if stored.get("backbone") == backbone.weights_hash else {}
    except (OSError, ValueError, KeyError):
        data = {}
    data.update({task: [asdict(p) for p in pick_presets(backbone, task, root)] for task in tasks})
    data[MIXED_TASK] = [asdict(p) for p in pick_switch_presets(backbone, root)]
    path.write_text(json.dumps({"backbone": backbone.weights_hash, "candidates": CANDIDATES, "presets": data}, indent=1))
    return path


def read_presets(weights_hash: str, root: Path = ZOO_DIR) -> list[LecturePreset]:
    """The stored presets for the backbone with this weights hash ([] when there are none or they
    belong to another backbone)."""
    path = root / PRESETS_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if data.get("backbone") != weights_hash:
        return []
    return [LecturePreset(**p) for rows in (data.get("presets") or {}).values() for p in rows]
