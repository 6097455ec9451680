"""`zoo reproduce`: rebuild entries from their seeds into a scratch folder and compare the new cards
with the shipped ones.

`zoo verify` checks that each shipped module still scores what its card says; this checks the other
half of the claim, that the card is what `zoo build` makes from the recipe and the seed on this
machine. The shipped folder is only read.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from toast_core.core.backbone import Backbone
from toast_core.storage.checkpoints import read_card
from toast_core.training.zoo.build import ZOO_DIR, build
from toast_core.training.zoo.verify import format_result

#: what is compared, per card: the test and validation scores (weights are compared by hash)
COMPARED = (("test", "acc"), ("val", "acc"), ("test", "focus_ratio"), ("test", "object_share"))


def _value(card: dict[str, Any], split: str, key: str) -> float:
    value = (((card.get("extra") or {}).get("zoo") or {}).get(split) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def compare_cards(shipped: dict[str, Any], rebuilt: dict[str, Any]) -> dict[str, Any]:
    """Largest |rebuilt - shipped| over COMPARED (test accuracy alone as `acc_drift`), and whether
    the stored weights are bit for bit the same."""
    diffs = {f"{s}_{k}": abs(_value(rebuilt, s, k) - _value(shipped, s, k)) for s, k in COMPARED}
    finite = [d for d in diffs.values() if not math.isnan(d)]
    return {
        "acc_drift": diffs["test_acc"],
        "max_drift": max(finite, default=math.nan),
        "same_weights": bool(shipped.get("weights_sha256")) and shipped.get("weights_sha256") == rebuilt.get("weights_sha256"),
        "diffs": diffs,
    }


def reproduce(
    tasks: Iterable[str],
    entries: Iterable[str] | None,
    *,
    seed: int = 0,
    threads: int = 1,
    root: Path = ZOO_DIR,
    into: Path | None = None,
    backbone: Backbone | None = None,
    smoke: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Rebuild (`force`) the chosen entries into `into` (a temporary folder when None) and compare
    each with its card under `root`. Returns the RESULT fields and one row per entry."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="zoo-reproduce-") as scratch:
        target = Path(into) if into is not None else Path(scratch)
        if target.resolve() == Path(root).resolve():
            raise ValueError("zoo reproduce rebuilds into another folder than the one it checks.")
        cards = build(tasks, entries, seed=seed, threads=threads, root=target, backbone=backbone,
                      smoke=smoke, force=True, log=log)
        for card_path in cards:
            task, entry = card_path.parent.name, card_path.stem
            shipped_stem = Path(root) / task / entry
            try:
                shipped = read_card(shipped_stem)
            except Exception as exc:  # noqa: BLE001 - a missing or unreadable card is a finding, not a crash
                rows.append({"task": task, "entry": entry, "error": f"no readable card under {root}: {exc}"})
                log(f"[{task}] {entry}: no shipped card to compare ({exc})")
                continue
            row = {"task": task, "entry": entry, **compare_cards(shipped, read_card(card_path.with_suffix("")))}
            rows.append(row)
            log(f"[{task}] {entry}: test acc drift {row['acc_drift']:.4f}, largest score drift {row['max_drift']:.4f}, "
                f"weights {'identical' if row['same_weights'] else 'differ'}")
    compared = [r for r in rows if "error" not in r]
    return {
        "reproduced": len(compared),
        "missing": len(rows) - len(compared),
        "exact": sum(r["max_drift"] == 0.0 for r in compared),
        "identical_weights": sum(r["same_weights"] for r in compared),
        "max_repro_drift": max((r["acc_drift"] for r in compared), default=math.nan),
        "rows": rows,
    }


def result_line(summary: dict[str, Any]) -> str:
    return format_result(summary, ("reproduced", "missing", "exact", "identical_weights", "max_repro_drift"))
