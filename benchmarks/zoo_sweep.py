"""The documented learning-rate sweep behind the lecture recipes, scored on the VALIDATION split.

    python benchmarks/zoo_sweep.py                       # glyphs, every task recipe, 1/3 budget
    python benchmarks/zoo_sweep.py --task stars --entries lora,toast
    python benchmarks/zoo_sweep.py --smoke               # fixture backbone, random data, 3 steps
    python benchmarks/zoo_sweep.py --entries lora --steps 300 --arm lr=0.01 --arm head_lr_scale=10 \
        --arm r=8,targets=q+v+proj                       # recipe variants at a fixed step count

For each task recipe in `toast_core.training.recipes` it trains the recipe's learning rate and the
candidates in CANDIDATES at `--budget` times the recipe's steps (same seed, same data), and reports
validation accuracy (n = val images, 95% Wilson interval). The test split is never read. The
chosen rate per method goes into `toast_core/training/recipes.py` by hand-free rule: the highest validation
accuracy; ties (within one image) go to the recipe's current rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from toast_core.core.stats import wilson_interval
from toast_core.training.recipes import RECIPES, VAL_PER_CLASS, Recipe
from toast_core.training.zoo.train_entry import ZooSplits, build_entry_method, train_entry

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "zoo_sweep.json"

#: learning rates tried per registry method besides the recipe's own
CANDIDATES: dict[str, tuple[float, ...]] = {
    "linear": (1e-3, 3e-3, 1e-2),
    "full": (1e-4, 3e-4),
    "bitfit": (3e-3, 1e-2, 3e-2),
    "lora": (3e-3, 1e-2),
    "vpt": (1e-2, 3e-2),
    "visual_prompt": (1e-2, 3e-2),
    "toast": (1e-3, 3e-3),
    "toast_lite": (3e-3, 1e-2),
}


#: recipe fields an --arm may set; any other key goes into the method's config
RECIPE_FIELDS = ("lr", "head_lr_scale", "batch_size", "weight_decay")


def parse_arm(spec: str) -> dict[str, Any]:
    """'lr=0.01,r=8,targets=q+v+proj' -> {'lr': 0.01, 'r': 8, 'targets': ('q', 'v', 'proj')}."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, raw = part.partition("=")
        if not sep:
            raise SystemExit(f"--arm expects key=value pairs, got {part!r}")
        value: Any
        if "+" in raw or key == "targets":
            value = tuple(raw.split("+"))
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        out[key.strip()] = value
    return out


def apply_arm(r: Recipe, arm: dict[str, Any]) -> Recipe:
    fields = {k: v for k, v in arm.items() if k in RECIPE_FIELDS}
    config = {**r.method_config, **{k: v for k, v in arm.items() if k not in RECIPE_FIELDS}}
    return dataclasses.replace(r, method_config=config, **fields)


def arm_label(arm: dict[str, Any]) -> str:
    return ",".join(f"{k}={'+'.join(v) if isinstance(v, tuple) else v}" for k, v in arm.items()) or "recipe"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="glyphs")
    ap.add_argument("--entries", default="", help="comma list of recipe entries (default: all task recipes)")
    ap.add_argument("--budget", type=float, default=1 / 3, help="share of each recipe's steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=0, help="absolute steps per trial (overrides --budget)")
    ap.add_argument("--arm", action="append", default=[],
                    help="a recipe variant 'key=value,...' tried beside the recipe itself (instead of the lr candidates)")
    ap.add_argument("--per-class", type=int, default=0, help="training images per class (default: each recipe's own)")
    ap.add_argument("--val-per-class", type=int, default=0,
                    help="validation images per class (default: the zoo's; a larger split ranks close trials)")
    ap.add_argument("--no-baseline", action="store_true", help="with --arm: skip the recipe itself (already measured)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    recipes: list[Recipe] = [r for r in RECIPES[args.task].values() if r.kind == "task"]
    if args.entries:
        wanted = {e.strip() for e in args.entries.split(",") if e.strip()}
        recipes = [r for r in recipes if r.entry in wanted]
    from toast_core.core.backbone import load_backbone, tiny_fixture_backbone

    backbone = tiny_fixture_backbone() if args.smoke else load_backbone("embedded")
    zoo = ZooSplits(args.task, smoke=args.smoke, val_per_class=args.val_per_class or None)
    rows: list[dict[str, Any]] = json.loads(OUT.read_text()) if OUT.exists() and not args.smoke else []
    arms = [parse_arm(a) for a in args.arm]
    ran: dict[str, list[dict[str, Any]]] = {}  # this run's trials per entry (the best is picked among them)
    for r in recipes:
        splits = {"train": zoo.train(args.per_class or r.train_per_class), "val": zoo.val}
        per_class = len(splits["train"]) // max(1, splits["train"].num_classes)
        if arms:
            trials = ([] if args.no_baseline else [({}, r)]) + [(arm, apply_arm(r, arm)) for arm in arms]
        else:
            trials = [({"lr": lr}, r.with_lr(lr)) for lr in sorted({r.lr, *CANDIDATES.get(r.method, ())})]
        for arm, trial in trials:
            lr = trial.lr
            steps = 3 if args.smoke else (args.steps or max(10, round(r.steps * args.budget)))
            method = build_entry_method(trial, backbone, splits["train"].num_classes, args.seed)
            t0 = time.perf_counter()
            result = train_entry(method, trial, splits["train"], splits["val"], args.seed, steps=steps)
            val = result.final.get("val_acc", float("nan"))
            n = len(splits["val"])
            lo, hi = wilson_interval(round(val * n), n)
            row = {
                "task": args.task, "entry": r.entry, "method": r.method, "arm": arm_label(arm) if arms else "lr",
                "lr": lr, "steps": steps,
                "batch": r.batch_size, "train_per_class": per_class, "val_acc": val, "val_n": n, "val_lo": lo, "val_hi": hi,
                "train_acc": result.final.get("train_acc", float("nan")),
                "seconds": time.perf_counter() - t0, "smoke": args.smoke,
            }
            if not args.smoke and OUT.exists():  # re-read: another sweep may have written meanwhile
                rows = json.loads(OUT.read_text())
            rows = [x for x in rows if not (x["task"] == args.task and x["entry"] == r.entry and x["lr"] == lr
                                            and x.get("arm", "lr") == row["arm"] and x["steps"] == steps
                                            and x.get("train_per_class", 300) == per_class
                                            and x.get("val_n") == n)]
            rows.append(row)
            ran.setdefault(r.entry, []).append(row)
            print(
                f"[{args.task}] {r.entry} {row['arm']} lr {lr:g} x{steps}, {per_class}/class: val {val:.3f} [{lo:.3f}, {hi:.3f}] (n={n}), "
                f"train {row['train_acc']:.3f}, {row['seconds']:.0f} s",
                flush=True,
            )
            if not args.smoke:
                OUT.write_text(json.dumps(rows, indent=1))
    best: dict[str, str] = {}
    for r in recipes:
        if r.entry in ran:  # ties (same number of images right) go to the recipe itself
            top = max(ran[r.entry], key=lambda x: (round(x["val_acc"] * x["val_n"]), x["lr"] == r.lr and x["arm"] in ("lr", "recipe")))
            best[r.entry] = top["arm"] if arms else f"{top['lr']:g}"
    minutes = (time.perf_counter() - t_start) / 60
    print(f"val images per class: {args.val_per_class or VAL_PER_CLASS}; budget {args.budget:.2f} of each recipe's steps")
    print(f"RESULT task={args.task} minutes={minutes:.1f} " + " ".join(f"{k}={v}" for k, v in best.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
