"""`zoo verify`: reload every shipped module, re-score it on the test split, check it against its card."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from toast_core.core.backbone import Backbone
from toast_core.training.zoo.build import ZOO_DIR
from toast_core.training.zoo.catalog import load_entry, zoo_entries
from toast_core.training.zoo.evaluate import score_split
from toast_core.training.zoo.train_entry import episode_test, zoo_split


def verify(
    backbone: Backbone | None = None, root: Path = ZOO_DIR, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Re-measure every entry; returns the RESULT fields (modules, tasks, best/linear accuracies per
    task, max_card_drift = largest |measured - card| test accuracy) and the per-entry rows."""
    from toast_core.core.backbone import load_backbone

    backbone = backbone or load_backbone("embedded")
    entries = zoo_entries(backbone, root)
    tests: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for e in entries:
        smoke = bool(e.zoo.get("smoke"))
        if e.task not in tests:
            tests[e.task] = zoo_split(e.task, "test", smoke=smoke)
        test = tests[e.task]
        classes = (e.zoo.get("episode") or {}).get("classes")
        if classes:
            test = episode_test(test, list(classes))
        measured = score_split(load_entry(e, backbone), test)
        card_acc = float(e.test.get("acc", math.nan))
        drift = abs(measured["acc"] - card_acc)
        rows.append({"task": e.task, "entry": e.entry, "acc": measured["acc"], "card_acc": card_acc,
                     "drift": drift, "n": measured["n"], "kind": e.zoo.get("recipe", {}).get("kind")})
        log(f"[{e.task}] {e.entry}: test acc {measured['acc']:.3f} (card {card_acc:.3f}, drift {drift:.4f}, n={measured['n']})")
    out: dict[str, Any] = {"modules": len(rows), "tasks": len({r["task"] for r in rows})}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task and r["kind"] == "task"]
        out[f"best_acc_{task}"] = max((r["acc"] for r in mine), default=math.nan)
        out[f"linear_acc_{task}"] = next((r["acc"] for r in mine if r["entry"] == "linear"), math.nan)
    out["max_card_drift"] = max((r["drift"] for r in rows), default=math.nan)
    out["rows"] = rows
    return out


def format_result(summary: dict[str, Any], keys: Iterable[str]) -> str:
    """One `RESULT key=value ...` line (floats to 4 decimals), the zoo commands' last line."""
    return "RESULT " + " ".join(
        f"{k}={summary.get(k):.4f}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}" for k in keys
    )


def result_line(summary: dict[str, Any]) -> str:
    keys = ["modules", "tasks", *sorted(k for k in summary if k.startswith(("best_acc", "linear_acc"))), "max_card_drift"]
    return format_result(summary, keys)
