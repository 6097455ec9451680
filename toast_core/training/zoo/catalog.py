"""What the zoo ships, read from its cards: the one reader every front end lists zoo modules with.

The zoo is read-only: front ends load its modules (`load_entry`) but never write to checkpoints/zoo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toast_core.core.backbone import Backbone
from toast_core.methods.base import SteeringMethod
from toast_core.storage.checkpoints import CheckpointError, load_module, read_card
from toast_core.training.zoo.build import ZOO_DIR, ZOO_FORMAT

ZOO_PREFIX = "zoo:"
#: the entries a first view compares, in this order (the task recipes)
FIRST_VIEW = ("linear", "full", "lora", "vpt_deep", "toast", "toast_lite", "bitfit", "visual_prompt", "vpt_shallow")


@dataclass(frozen=True)
class ZooEntry:
    """One shipped module: where it is, what it is, and what its card measured."""

    task: str
    entry: str
    method: str
    card_path: Path
    card: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{ZOO_PREFIX}{self.task}/{self.entry}"

    @property
    def zoo(self) -> dict[str, Any]:
        return (self.card.get("extra") or {}).get("zoo") or {}

    @property
    def test(self) -> dict[str, Any]:
        return self.zoo.get("test") or {}

    @property
    def label(self) -> str:
        acc = self.test.get("acc")
        tail = f", test {acc:.1%}" if isinstance(acc, float) else ""  # 0.598 reads 59.8%, not 60%
        return f"{self.entry} ({self.task} zoo{tail})"


def zoo_entries(backbone: Backbone | None = None, root: Path = ZOO_DIR, task: str | None = None) -> list[ZooEntry]:
    """Every readable zoo card (for `backbone`'s weights when given), by task then recipe order."""
    out: list[ZooEntry] = []
    if not root.is_dir():
        return out
    for card_path in sorted(root.glob("*/*.json")):
        try:
            card = read_card(card_path)
        except CheckpointError:
            continue
        zoo = (card.get("extra") or {}).get("zoo") or {}
        if zoo.get("format") != ZOO_FORMAT:
            continue
        if backbone is not None and (card.get("backbone") or {}).get("weights_hash") != backbone.weights_hash:
            continue
        if task is not None and card.get("task") != task:
            continue
        out.append(ZooEntry(str(card.get("task")), str(zoo.get("entry")), str(card["method"]), card_path, card))
    order = {name: i for i, name in enumerate(_recipe_order())}
    out.sort(key=lambda e: (e.task, order.get(e.entry, len(order)), e.entry))
    return out


def _recipe_order() -> list[str]:
    from toast_core.training.recipes import RECIPES

    return list(next(iter(RECIPES.values())))


def find_entry(key: str, backbone: Backbone | None = None, root: Path = ZOO_DIR) -> ZooEntry:
    """The entry behind a `zoo:<task>/<entry>` key (or plain `<task>/<entry>`)."""
    name = key.removeprefix(ZOO_PREFIX)
    for e in zoo_entries(backbone, root):
        if f"{e.task}/{e.entry}" == name:
            return e
    raise KeyError(f"No zoo module '{name}' for this backbone. Shipped: "
                   f"{', '.join(f'{e.task}/{e.entry}' for e in zoo_entries(backbone, root)) or 'none'}.")


def load_entry(entry: ZooEntry, backbone: Backbone) -> SteeringMethod:
    method = load_module(entry.card_path, backbone)
    method.label = entry.label  # type: ignore[attr-defined]
    return method


#: on a mixed scene, each of these methods shows its stars module beside its glyphs module
SWITCH_VIEW = ("lora", "toast", "linear")


def first_view(backbone: Backbone, task: str, root: Path = ZOO_DIR) -> list[ZooEntry]:
    """The zoo modules a first view of `task` compares (task recipes, in FIRST_VIEW order); on a
    mixed scene, both tasks' modules of the SWITCH_VIEW methods, pair by pair."""
    from toast_core.data.mixed import MIXED_TASK

    if task == MIXED_TASK:
        by_key = {(e.task, e.entry): e for e in zoo_entries(backbone, root)}
        return [by_key[(t, n)] for n in SWITCH_VIEW for t in ("stars", "glyphs") if (t, n) in by_key]
    by_name = {e.entry: e for e in zoo_entries(backbone, root, task)}
    return [by_name[n] for n in FIRST_VIEW if n in by_name]


def expected_train_s(task: str, method: str, steps: int, batch_size: int, root: Path = ZOO_DIR) -> float | None:
    """Training time a run of `method` on built-in `task` takes on one idle CPU core: the zoo build's
    CPU time for that method's recipe over its threads (the zoo was built on one), scaled by images
    seen (steps x batch); None without a card."""
    from toast_core.training.recipes import default_for

    r = default_for(task, method)
    if r is None:
        return None
    for e in zoo_entries(None, root, task):
        measured = e.zoo.get("idle_s_estimate", e.zoo.get("train_s"))
        if e.entry == r.entry and isinstance(measured, int | float):
            return float(measured) * (steps * batch_size) / max(1, r.steps * r.batch_size)
    return None
