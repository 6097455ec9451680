"""The representation ceiling: how far a method gets on a built-in task when nothing distracts.

    python benchmarks/representation_ceiling.py                          # both tasks, linear + lora
    python benchmarks/representation_ceiling.py --tasks glyphs --entries linear
    python benchmarks/representation_ceiling.py --smoke                  # fixture backbone, random data

For each task, every entry is trained with its lecture recipe (same seed, same 300 images per class)
on the task's no-distractor control: the same deciding objects on the same cluttered backgrounds,
with no distractor beside them (`make_task_split(..., distractors=(0, 0))`). Both that module and
the shipped zoo module (trained with distractors) are then scored on both test splits (95% Wilson
intervals, n = test images):

- trained clean, tested clean: the ceiling, what the frozen backbone plus the method can read off
  a lone deciding object;
- zoo module, tested cluttered: the zoo card's number; ceiling minus this is what distractors cost;
- zoo module, tested clean: whether the steered module lost anything by learning among distractors.

The recipes were chosen on the cluttered task's validation split; nothing here is tuned, so reading
the test splits is a measurement, not a selection. Results go to benchmarks/representation_ceiling.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from toast_core.data.base import LabeledImages
from toast_core.training.recipes import RECIPES
from toast_core.training.zoo.evaluate import score_split
from toast_core.training.zoo.train_entry import ZooSplits, build_entry_method, train_entry, zoo_split

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "representation_ceiling.json"
CONTROL = (0, 0)


def _score(method: Any, data: LabeledImages) -> dict[str, Any]:
    s = score_split(method, data)
    return {k: s[k] for k in ("acc", "acc_lo", "acc_hi", "n") if k in s} | (
        {"object_share": s["object_share"]} if "object_share" in s else {}
    )


def _fmt(s: dict[str, Any]) -> str:
    return f"{s['acc']:.3f} [{s['acc_lo']:.3f}, {s['acc_hi']:.3f}] (n={s['n']})"


def measure(task: str, entries: list[str], seed: int, smoke: bool) -> list[dict[str, Any]]:
    from toast_core.core.backbone import load_backbone, tiny_fixture_backbone
    from toast_core.training.zoo.catalog import find_entry, load_entry

    backbone = tiny_fixture_backbone() if smoke else load_backbone("embedded")
    control = ZooSplits(task, smoke=smoke, distractors=CONTROL)
    cluttered_test = zoo_split(task, "test", smoke=smoke)
    rows = []
    for entry in entries:
        recipe = RECIPES[task][entry]
        clean = control.for_recipe(recipe)
        if smoke:
            recipe = dataclasses.replace(recipe, steps=3)
        method = build_entry_method(recipe, backbone, clean["train"].num_classes, seed)
        t0 = time.perf_counter()
        result = train_entry(method, recipe, clean["train"], clean["val"], seed)
        seconds = time.perf_counter() - t0
        method.eval()
        row: dict[str, Any] = {
            "task": task,
            "entry": entry,
            "steps": recipe.steps,
            "lr": recipe.lr,
            "seed": seed,
            "smoke": smoke,
            "train_per_class": len(clean["train"]) // max(1, clean["train"].num_classes),
            "train_s": seconds,
            "train_acc": result.final.get("train_acc"),
            "clean_val": result.final.get("val_acc"),
            "clean_on_clean": _score(method, clean["test"]),
            "clean_on_cluttered": _score(method, cluttered_test),
        }
        if not smoke:
            try:
                zoo_method = load_entry(find_entry(f"{task}/{entry}", backbone), backbone)
                zoo_method.eval()
                row["zoo_on_cluttered"] = _score(zoo_method, cluttered_test)
                row["zoo_on_clean"] = _score(zoo_method, clean["test"])
            except KeyError as err:  # no shipped module for this entry: the control stands alone
                print(f"[{task}] {entry}: {err}", flush=True)
        print(
            f"[{task}] {entry} ({seconds:.0f} s): trained clean -> clean {_fmt(row['clean_on_clean'])}, "
            f"cluttered {_fmt(row['clean_on_cluttered'])}"
            + (
                f"; zoo -> cluttered {_fmt(row['zoo_on_cluttered'])}, clean {_fmt(row['zoo_on_clean'])}"
                if "zoo_on_clean" in row
                else ""
            ),
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="glyphs,stars")
    ap.add_argument("--entries", default="linear,lora")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    entries = [e.strip() for e in args.entries.split(",") if e.strip()]
    rows = []
    for task in (t.strip() for t in args.tasks.split(",") if t.strip()):
        task_rows = measure(task, entries, args.seed, args.smoke)
        rows += task_rows
        if not args.smoke:  # keep other tasks' rows; replace this task's
            stored = json.loads(OUT.read_text()) if OUT.exists() else []
            keep = [r for r in stored if not (r["task"] == task and r["entry"] in entries)]
            OUT.write_text(json.dumps(keep + task_rows, indent=1))
    parts = []
    for r in rows:
        key = f"{r['task']}_{r['entry']}"
        parts.append(f"{key}_ceiling={r['clean_on_clean']['acc']:.4f}")
        if "zoo_on_cluttered" in r:
            parts.append(f"{key}_cluttered={r['zoo_on_cluttered']['acc']:.4f}")
    print("RESULT " + " ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
