"""The zoo's table: one row per shipped module with its card's numbers and 95% intervals, for the
Benchmark page, the CLI, the Gradio demo, README and RESULTS.md (one table, one source: the cards)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from toast_core.core.backbone import Backbone
from toast_core.training.zoo.build import ZOO_DIR
from toast_core.training.zoo.catalog import ZooEntry, zoo_entries


def _get(d: dict[str, Any], key: str) -> float:
    v = d.get(key)
    return float(v) if isinstance(v, int | float) else math.nan


def entry_row(e: ZooEntry) -> dict[str, Any]:
    t, zoo = e.test, e.zoo
    faith = zoo.get("faithfulness") or {}
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
        "faith gap": _get(faith, "gap"),
        "gap lo": _get(faith, "gap_lo"),
        "gap hi": _get(faith, "gap_hi"),
        "MoRF AUC": _get(faith, "morf_auc"),
        "LeRF AUC": _get(faith, "lerf_auc"),
        "n faith": faith.get("n"),
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
            "| object share [95% CI] (chance) | LeRF − MoRF [95% CI] (n) | trainable % | steps x batch, lr | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['entry']} | {r['method']} | {_ci(r['test acc'], r['acc lo'], r['acc hi'], '.3f')} "
            f"| {r['n test']} | {r['val acc']:.3f} | {_ci(r['focus ratio'], r['focus lo'], r['focus hi'], '.2f')} "
            f"| {_ci(r['object share'], r['object lo'], r['object hi'], '.3f')} ({r['object chance']:.3f}) "
            f"| {_ci(r['faith gap'], r['gap lo'], r['gap hi'], '.3f')} ({r['n faith']}) "
            f"| {r['trainable %']:.3f} | {r['steps x batch']}, {r['lr']:g} | {r['train s']:.0f} |"
        )
    return "\n".join(lines)


RESULTS_HEADING = "## zoo: the lecture zoo (every method from its recipe, both tasks)"


def write_results_section(rows: list[dict[str, Any]], verify_line: str, path: Path | None = None) -> Path:
    """Replace (or add) the zoo's section of benchmarks/RESULTS.md: its table per task and the line
    `zoo verify` printed, with the commands that produced them."""
    import time

    from toast_core.core.backbone import CHECKPOINT_DIR
    from toast_core.storage.results_file import write_section

    path = path or CHECKPOINT_DIR.parent / "benchmarks" / "RESULTS.md"
    parts = [RESULTS_HEADING, ""]
    for task in sorted({r["task"] for r in rows}):
        parts += [f"### {task}", "", markdown_table([r for r in rows if r["task"] == task]), ""]
    parts += [
        "- test acc: top-1 on the task's test split (n images; 95% Wilson interval); episode entries are scored on "
        "every test image of their episode's classes; focus ratio: last-layer CLS attention (head mean) on the deciding "
        "object over its area share; object share: the deciding object's share of the attention on objects, chance = its "
        "share of the objects' area (both ratios of means over images, 95% bootstrap intervals over images); "
        "LeRF − MoRF: area between the predicted class's probability curves as the same map's least / most attended "
        "patch tokens are dropped (10 steps; the first 8 test images per class, n; > 0 = the prediction depends on "
        "where the map points; bootstrap 95% interval over images).",
        "- train s: wall-clock of training on the build machine (2 cores shared with other work: see each card's "
        "`idle_s_estimate`, CPU seconds over threads, for an idle machine); one torch thread per build process.",
        f"- `{verify_line}`",
        "- commands: `python -m toast_core zoo build` (trains what is missing or stale), "
        f"`python -m toast_core zoo verify --append-results` ({time.strftime('%Y-%m-%d')})",
    ]
    write_section(path, "zoo", "\n".join(parts))
    return path
