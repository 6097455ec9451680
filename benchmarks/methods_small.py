"""Every steering method on a built-in downstream task, same seed, same data, same loop.

    python benchmarks/methods_small.py --task stars            # the real run (embedded backbone)
    python benchmarks/methods_small.py --task all --append-results
    python benchmarks/methods_small.py --smoke                 # fixture backbone, random data, 3 steps

Columns: test accuracy, trainable parameters (and % of the backbone), train-step time per image,
peak memory during training (CUDA allocator peak, or growth of the process RSS on CPU), and focus:
the share of the last-layer CLS attention (head mean, patch tokens only) that falls on the
deciding object's mask, with the mask resized to the patch grid as an area share per patch
(`views.focus_share`); focus ratio = mean focus / mean mask area share (1 = chance).

Budget: <= 10 minutes per task on 2 CPU cores. The embedded ViT (96 px, patch 8 -> 145 tokens,
width 192, 6 blocks) costs ~0.9 GFLOP per image forward, ~20 ms on 2 cores; a training step that
back-propagates to the input (LoRA, VPT, BitFit, pixel prompt) ~3x that, full fine-tune a little
more, the linear probe only the forward. Hence per method (HPARAMS): linear 80 x 32 images
(~50 s), full 40 x 16 (~45 s), the other four 50 x 16 (~45 s each), plus ~5 s of evaluation each
(80 val + 200 test images) and ~15 s of scene rendering: ~5 minutes, which leaves room for TOAST and
TOAST-Lite (two passes each) when they are added to METHODS. `--steps-scale` stretches all runs.
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # minutes in the RESULT line include start-up and imports

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

from toast_core.core.backbone import Backbone, load_backbone, tiny_fixture_backbone  # noqa: E402
from toast_core.data.base import LabeledImages  # noqa: E402
from toast_core.methods import build_method, method_names  # noqa: E402
from toast_core.methods.base import SteeringMethod  # noqa: E402
from toast_core.training.train import TrainConfig, TrainResult, train, view_over  # noqa: E402
from toast_core.views import focus_summary  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
HEADING = "## methods_small: every steering method on a built-in task"
TASK_NAMES = ("stars", "glyphs")

#: the methods compared, in table order; a method registered later is one more line here
METHODS: list[str] = [
    "linear",
    "full",
    "bitfit",
    "lora",
    "vpt",
    "visual_prompt",
    "toast",
    "toast_scratch",
    "toast_lite",
]

#: settings shared by every run (the loop is the same for all methods)
COMMON: dict[str, Any] = {"warmup_steps": 5, "min_lr": 0.05, "grad_clip": 1.0, "eval_batch_size": 64}

#: per-method defaults: TrainConfig fields, plus "config" for the method's own settings
HPARAMS: dict[str, dict[str, Any]] = {
    "linear": {"steps": 80, "batch_size": 32, "lr": 1e-2},
    "full": {"steps": 40, "batch_size": 16, "lr": 1e-4, "weight_decay": 0.05},
    "bitfit": {"steps": 50, "batch_size": 16, "lr": 5e-3},
    "lora": {
        "steps": 50,
        "batch_size": 16,
        "lr": 3e-3,
        "config": {"r": 4, "alpha": 4.0, "targets": ("q", "v")},
    },
    "vpt": {"steps": 50, "batch_size": 16, "lr": 1e-2, "config": {"num_tokens": 10, "deep": True}},
    # the official pixel-prompt recipe is SGD lr 40 for 1000 epochs; a short AdamW run mostly trains the head
    "visual_prompt": {"steps": 50, "batch_size": 16, "lr": 1e-2, "config": {"kind": "padding"}},
    # TOAST stage 2 starts from the shipped pre-tuned module (init "auto"); the scratch row measures that
    "toast": {"steps": 50, "batch_size": 16, "lr": 1e-3},
    "toast_scratch": {"method": "toast", "steps": 50, "batch_size": 16, "lr": 1e-3, "config": {"init": "scratch"}},
    "toast_lite": {"steps": 50, "batch_size": 16, "lr": 3e-3},
}

SPLIT_SIZES = {"train": 50, "val": 10, "test": 25}  # images per class
SMOKE_STEPS = 3


# --- data ------------------------------------------------------------------------------------------
def random_split(n_per_class: int, classes: int, size: int, seed: int) -> LabeledImages:
    """Smoke data: random pixels, labels and box masks (proves the pipeline runs, learns nothing)."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * classes
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
        masks[i, top : top + size // 3, left : left + size // 3] = True
    labels = torch.arange(n) % classes
    return LabeledImages(images, labels, [f"class{k}" for k in range(classes)], masks)


def load_splits(task: str, smoke: bool, per_class: int, seed: int) -> dict[str, LabeledImages]:
    if smoke:
        return {s: random_split(4, 3, 32, seed + i) for i, s in enumerate(SPLIT_SIZES)}
    from toast_core.data.scenes import make_task_split

    sizes = {**SPLIT_SIZES, "train": per_class}
    return {s: make_task_split(task, s, per_class=n, seed=seed) for s, n in sizes.items()}


# --- one method ------------------------------------------------------------------------------------
def score_split(method: SteeringMethod, data: LabeledImages, batch_size: int = 64) -> dict[str, float]:
    """Accuracy and attention focus on the deciding-object masks, from one forward per batch."""
    view = view_over(method, data.images, "cls", batch_size, layer=-1, head="mean")
    out = {"test_acc": float((torch.from_numpy(view.pred) == data.labels).sum()) / max(len(data), 1)}
    if data.masks is not None:
        focus = focus_summary(view.map, data.masks)
        out.update(focus=focus["focus_share"], area=focus["area_share"], focus_ratio=focus["focus_ratio"])
    return out


def run_method(
    name: str,
    backbone: Backbone,
    splits: dict[str, LabeledImages],
    seed: int,
    smoke: bool,
    steps_scale: float,
    device: str,
) -> dict[str, Any]:
    hp = dict(HPARAMS.get(name, {}))
    registry_name = hp.pop("method", name)  # a row label may differ from its registry name
    config = {**hp.pop("config", {}), "seed": seed}
    base_steps = hp.pop("steps", 50)
    steps = SMOKE_STEPS if smoke else max(1, round(base_steps * steps_scale))
    if smoke:
        hp["batch_size"] = min(hp.get("batch_size", 16), 8)
    cfg = TrainConfig(**{**COMMON, **hp, "steps": steps, "seed": seed, "device": device})
    t0 = time.perf_counter()
    method = build_method(registry_name, backbone, splits["train"].num_classes, config)
    result: TrainResult = train(method, splits["train"], splits["val"], cfg)
    scores = score_split(method, splits["test"], cfg.eval_batch_size)
    return {
        "method": name,
        **scores,
        "val_acc": result.final.get("val_acc", float("nan")),
        "trainable": method.trainable_count(),
        "share": method.trainable_share(),
        "ms_per_img": result.timings["train_ms_per_img"],
        "peak_mb": result.memory["peak_mb"],
        "memory_kind": result.memory["kind"],
        "steps": steps,
        "batch": cfg.batch_size,
        "seconds": time.perf_counter() - t0,
    }


# --- report ----------------------------------------------------------------------------------------
def _fmt(value: float, spec: str) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and not np.isfinite(value))
        else format(value, spec)
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | test acc | val acc | trainable params | % of backbone | train ms/img | peak MB "
        "| focus | focus ratio | steps x batch | time s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_fmt(r['test_acc'], '.3f')} | {_fmt(r['val_acc'], '.3f')} | "
            f"{r['trainable']:,} | {_fmt(100 * r['share'], '.2f')} | {_fmt(r['ms_per_img'], '.1f')} | "
            f"{_fmt(r['peak_mb'], '.0f')} | {_fmt(r.get('focus', float('nan')), '.3f')} | "
            f"{_fmt(r.get('focus_ratio', float('nan')), '.2f')} | {r['steps']} x {r['batch']} | "
            f"{_fmt(r['seconds'], '.0f')} |"
        )
    return "\n".join(lines)


def section(tables: dict[str, str], notes: list[str]) -> str:
    parts = [HEADING, ""]
    for task, table in tables.items():
        parts += [f"### task: {task}", "", table, ""]
    parts += [f"- {n}" for n in notes]
    return "\n".join(parts).rstrip() + "\n"


def append_results(text: str, path: Path = RESULTS) -> None:
    """Replace this benchmark's section of RESULTS.md (or add it), leaving other sections alone."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip() + "\n\n" + text
    path.write_text(new.rstrip() + "\n")


# --- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="stars", choices=[*TASK_NAMES, "all"])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list (default: METHODS)")
    ap.add_argument("--per-class", type=int, default=SPLIT_SIZES["train"], help="training images per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every method's steps")
    ap.add_argument("--smoke", action="store_true", help="fixture backbone, random data, 3 steps")
    ap.add_argument("--append-results", action="store_true", help=f"write the table into {RESULTS.name}")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if HPARAMS.get(m, {}).get("method", m) not in method_names()]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(method_names())}")
    backbone = tiny_fixture_backbone() if args.smoke else load_backbone("embedded", device=args.device)
    tasks = list(TASK_NAMES) if args.task == "all" else [args.task]
    tables: dict[str, str] = {}
    best: list[str] = []
    memory_kind = ""
    for task in tasks:
        splits = load_splits(task, args.smoke, args.per_class, args.seed)
        rows = []
        for name in methods:
            row = run_method(name, backbone, splits, args.seed, args.smoke, args.steps_scale, args.device)
            memory_kind = row["memory_kind"]
            print(
                f"[{task}] {name}: test acc {row['test_acc']:.3f}, focus ratio "
                f"{_fmt(row.get('focus_ratio', float('nan')), '.2f')}, {row['seconds']:.0f} s",
                flush=True,
            )
            rows.append(row)
        tables[task] = markdown_table(rows)
        top = max(rows, key=lambda r: r["test_acc"])
        best.append(f"{task}:{top['method']}:{top['test_acc']:.3f}")
        print(f"\n### task: {task}\n\n{tables[task]}\n", flush=True)

    minutes = (time.perf_counter() - T_PROCESS) / 60.0
    device = str(backbone.device)
    notes = [
        f"backbone: {backbone.name} (hash {backbone.weights_hash}), device {device}, "
        f"{args.threads} threads, seed {args.seed}, "
        + (
            f"SMOKE: fixture backbone, random data, {SMOKE_STEPS} steps"
            if args.smoke
            else f"{args.per_class} train / {SPLIT_SIZES['val']} val / {SPLIT_SIZES['test']} test images per class"
        ),
        f"peak MB = {memory_kind} during training; focus = share of last-layer CLS attention (head mean, "
        "patches only) on the deciding-object mask; ratio = focus / mask area share (1 = chance)",
        f"total {minutes:.1f} min; hyper-parameters: HPARAMS in benchmarks/methods_small.py",
        f"command: `python benchmarks/methods_small.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}` ({time.strftime('%Y-%m-%d')})",
    ]
    print("\n".join(f"- {n}" for n in notes))
    if args.append_results:
        if args.smoke:
            print("(--append-results ignored in --smoke mode: smoke numbers are not results)")
        else:
            append_results(section(tables, notes))
            print(f"wrote the table into {RESULTS}")
    print(
        f"RESULT minutes={minutes:.2f} methods={len(methods)} tasks={','.join(tasks)} best={';'.join(best)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
