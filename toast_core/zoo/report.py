"""The zoo's table: one row per shipped module with its card's numbers and 95% intervals, for the
Benchmark page, the CLI, the Gradio demo, README and RESULTS.md (one table, one source: the cards)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from toast_core.backbone import Backbone
from toast_core.zoo.build import ZOO_DIR
from toast_core.zoo.catalog import ZooEntry, zoo_entries


def _get(d: dict[str, Any], key: str) -> float:
    v = d.get(key)
    return float(v) if isinstance(v, int | float) else math.nan


def entry_row(e: ZooEntry) -> dict[str, Any]:
    t, zoo = e.test, e.zoo
    recipe = zoo.get("recipe") or {}
    describe = e.card.get("describe") or {}
    return {
        "task": e.task,
        "entry": e.entry,
        "method": e.method,
        "kind": recipe.get("kind", "task"),
        "test acc": _get(t, "acc"),
        "acc lo": _get(t, "acc_lo"),
        "acc hi": _get(t, "acc_hi"),
        "n test": t.get("n"),
        "val acc": _get(zoo.get("val") or {}, "acc"),
        "focus ratio": _get(t, "focus_ratio"),
        "focus lo": _get(t, "focus_ratio_lo"),
        "focus hi": _get(t, "focus_ratio_hi"),
        "object share": _get(t, "object_share"),
        "object lo": _get(t, "object_share_lo"),
        "object hi": _get(t, "object_share_hi"),
        "object chance": _get(t, "object_chance"),
        "trainable %": 100.0 * _get(describe, "trainable_share"),
        "train s": _get(zoo, "train_s"),
        "steps x batch": f"{recipe.get('steps')} x {recipe.get('batch_size')}",
        "lr": recipe.get("lr"),
        "key": e.key,
        "prompt on object": _get(zoo, "prompt_on_object"),
        "episode classes": list((zoo.get("episode") or {}).get("class_names") or []),
        "episode class ids": list((zoo.get("episode") or {}).get("classes") or []),
    }


def zoo_rows(backbone: Backbone | None = None, root: Path = ZOO_DIR, task: str | None = None) -> list[dict[str, Any]]:
    return [entry_row(e) for e in zoo_entries(backbone, root, task)]


def _ci(v: float, lo: float, hi: float, spec: str) -> str:
    if math.isnan(v):
        return "n/a"
    return f"{v:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown: accuracy, focus ratio and object share, each with its 95% interval."""
    head = ("| task | entry | method | test acc [95% CI] | n | val acc | focus ratio [95% CI] "
            "| object share [95% CI] (chance) | trainable % | steps x batch, lr | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['entry']} | {r['method']} | {_ci(r['test acc'], r['acc lo'], r['acc hi'], '.3f')} "
            f"| {r['n test']} | {r['val acc']:.3f} | {_ci(r['focus ratio'], r['focus lo'], r['focus hi'], '.2f')} "
            f"| {_ci(r['object share'], r['object lo'], r['object hi'], '.3f')} ({r['object chance']:.3f}) "
            f"| {r['trainable %']:.3f} | {r['steps x batch']}, {r['lr']:g} | {r['train s']:.0f} |"
        )
    return "\n".join(lines)
