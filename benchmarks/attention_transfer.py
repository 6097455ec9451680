"""Attention transfer: how much of the pretrained backbone's value is its attention pattern?

One downstream task ("stars" by default), four models with the same budget (steps, batch, data):
- scratch: a random-init student of the backbone's shape (the control);
- attn_copy: the same student running on the frozen teacher's attention maps (teacher at inference);
- attn_distill: the student trained with β=3 · KL(teacher ‖ student) on the first L−3 blocks;
- fine-tuned teacher: full fine-tune of the pretrained backbone (the usual transfer).
Reported: test accuracy and focus on the deciding object (share of last-layer CLS attention on the
mask; for attn_copy the last block uses the teacher's map, so that is what its focus measures).

Budget (2 CPU cores, ≤ 15 min): `--steps` 100 at batch `--batch` 16 on `--per-class` 40 training
images per class (320 for "stars"), 20 test images per class. AdamW with 10% warmup + cosine; lr
1e-3 (students, weight decay 0.05) and 1e-4 (fine-tuned teacher). `--max-minutes` cancels a run
that would overshoot (the table then shows the steps it finished). The paper's ImageNet budget is
orders of magnitude larger: read the result as "what a few minutes of training makes of each".

    python benchmarks/attention_transfer.py [--smoke] [--append-results] [--task stars] [--threads 2]

Last line: RESULT minutes=… scratch_acc=… copy_acc=… distill_acc=… finetune_acc=… (+ focus).
"""

from __future__ import annotations

import argparse
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from fewshot import RESULTS_FILE, smoke_task

from toast_core.core.backbone import Backbone, load_backbone, tiny_fixture_backbone
from toast_core.core.stats import bootstrap_interval
from toast_core.data.base import LabeledImages
from toast_core.methods import build_method
from toast_core.methods.base import SteeringMethod
from toast_core.storage.results_file import write_section
from toast_core.training.train import TrainConfig, train
from toast_core.training.zoo.evaluate import score_split

RUNS = (  # (label, registry name, lr, weight decay)
    ("scratch", "scratch", 1e-3, 0.05),
    ("attn_copy", "attn_copy", 1e-3, 0.05),
    ("attn_distill", "attn_distill", 1e-3, 0.05),
    ("fine-tuned teacher", "full", 1e-4, 0.05),
)
KEYS = {"scratch": "scratch", "attn_copy": "copy", "attn_distill": "distill", "fine-tuned teacher": "finetune"}


def load(args: argparse.Namespace) -> tuple[Backbone, LabeledImages, LabeledImages]:
    if args.smoke:
        data = smoke_task(3, n_classes=4, per_class=12)
        train_idx = [i for i in range(len(data)) if i % 3 != 0]
        test_idx = [i for i in range(len(data)) if i % 3 == 0]
        return tiny_fixture_backbone(), data.subset(train_idx), data.subset(test_idx)
    from toast_core.data.scenes import make_task_split

    backbone = load_backbone("embedded", device="cpu")
    train_set = make_task_split(args.task, "train", args.per_class, seed=0)
    test_set = make_task_split(args.task, "test", args.test_per_class, seed=0)
    return backbone, train_set, test_set


def run_one(
    backbone: Backbone, name: str, lr: float, wd: float, train_set: LabeledImages, test_set: LabeledImages,
    args: argparse.Namespace, deadline: float,
) -> dict[str, float]:
    method = build_method(name, backbone, train_set.num_classes)
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch, lr=lr, weight_decay=wd, warmup_steps=max(1, args.steps // 10),
        seed=0, grad_clip=1.0,
    )
    cancel = threading.Event()
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), cancel.set)
    timer.start()
    try:
        result = train(method, train_set, None, cfg, cancel=cancel)
    finally:
        timer.cancel()
    t0 = time.perf_counter()
    row = score(method, test_set)
    return {
        **row,
        "steps": result.steps_done,
        "train_s": result.timings["train_s"],
        "eval_s": time.perf_counter() - t0,
        "train_loss": result.final.get("train_loss", float("nan")),
        "trainable": method.trainable_count(),
    }


def score(method: SteeringMethod, test_set: LabeledImages) -> dict[str, Any]:
    """`zoo.evaluate.score_split`'s accuracy (Wilson interval) and per-image correctness (for paired
    recovery intervals), with the mean focus and area shares under this script's names."""
    out = score_split(method, test_set, per_image=True)
    return {**out, "focus": out.get("focus_share", float("nan")), "area": out.get("area_share", float("nan"))}


def zoo_teacher(backbone: Backbone, task: str, test_set: LabeledImages) -> dict[str, Any]:
    """The shipped fine-tune of `task` (zoo:<task>/full) as the fine-tuned teacher, scored on the same test set."""
    from toast_core.training.zoo.catalog import find_entry, load_entry

    entry = find_entry(f"{task}/full", backbone)
    method = load_entry(entry, backbone)
    recipe = entry.zoo.get("recipe") or {}
    return {**score(method, test_set), "steps": recipe.get("steps", 0), "train_s": entry.zoo.get("train_s", float("nan")),
            "eval_s": 0.0, "train_loss": float("nan"), "trainable": method.trainable_count(), "zoo": True}


def recovery(student: dict[str, Any], scratch: dict[str, Any], teacher: dict[str, Any]) -> tuple[float, float, float]:
    """(student − scratch) / (teacher − scratch) and its 95% paired bootstrap interval over test images
    (nan where the gap's own interval reaches 0: no gap to recover)."""
    fn = lambda s, z, t: float((s.mean() - z.mean()) / (t.mean() - z.mean())) if t.mean() != z.mean() else float("nan")
    cols = (student["correct"].astype(float), scratch["correct"].astype(float), teacher["correct"].astype(float))
    gap_lo, _ = bootstrap_interval(cols[1:][::-1], lambda t, z: float(t.mean() - z.mean()))
    if not gap_lo > 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = bootstrap_interval(cols, fn)
    return fn(*cols), lo, hi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fixture backbone, random data, seconds")
    parser.add_argument("--append-results", action="store_true", help="write this section into RESULTS.md")
    parser.add_argument("--results-file", type=Path, default=RESULTS_FILE)
    parser.add_argument("--task", default="stars")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--teacher", choices=("train", "zoo"), default="train",
                        help="fine-tuned teacher: trained here (--steps) or the shipped zoo:<task>/full")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.task = 3, 8, "smoke"
    torch.set_num_threads(max(1, args.threads))
    t0 = time.monotonic()
    deadline = t0 + 60.0 * args.max_minutes

    backbone, train_set, test_set = load(args)
    print(f"backbone: {backbone.name}; task {args.task}: {len(train_set)} train / {len(test_set)} test images, "
          f"{train_set.num_classes} classes; {args.steps} steps × batch {args.batch}; threads {torch.get_num_threads()}")
    rows: dict[str, dict[str, float]] = {}
    for label, name, lr, wd in RUNS:
        if label == "fine-tuned teacher" and args.teacher == "zoo":
            rows[label] = zoo_teacher(backbone, args.task, test_set)
        else:
            rows[label] = run_one(backbone, name, lr, wd, train_set, test_set, args, deadline)
        print(f"  {label}: acc {rows[label]['acc']:.3f} [{rows[label]['acc_lo']:.3f}, {rows[label]['acc_hi']:.3f}] "
              f"({rows[label]['train_s']:.0f} s training)", flush=True)
    minutes = (time.monotonic() - t0) / 60

    lines = [
        f"#### {args.task}: {len(train_set)} training images, {args.steps} steps × batch {args.batch}",
        "",
        "| model | steps done | test accuracy % [95% CI] | focus on object % | area % | train s | trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        name = f"{label} (shipped zoo:{args.task}/full)" if r.get("zoo") else label
        lines.append(
            f"| {name} | {r['steps']} | {100 * r['acc']:.1f} [{100 * r['acc_lo']:.1f}, {100 * r['acc_hi']:.1f}] | "
            f"{100 * r['focus']:.1f} | {100 * r['area']:.1f} | {r['train_s']:.0f} | {int(r['trainable']):,} |"
        )
    chance = 1.0 / train_set.num_classes
    scratch, teacher = rows["scratch"], rows["fine-tuned teacher"]
    learnt = int(scratch["acc_lo"] > chance)
    rec = {k: recovery(rows[label], scratch, teacher) for label, k in (("attn_copy", "copy"), ("attn_distill", "distill"))}
    lines += ["", f"n = {len(test_set)} test images; chance {100 * chance:.1f}%; the scratch student "
              + ("learns above chance (its interval's low end is above it)." if learnt else "does NOT learn measurably above chance.")]
    for k, (v, lo, hi) in rec.items():
        lines.append(f"- recovery of the scratch → fine-tune gap, {k}: " + (
            f"{v:.2f} [{lo:.2f}, {hi:.2f}] (paired bootstrap over images)" if v == v else "undefined (no gap: the "
            "teacher's lead over scratch is within noise)"))
    lines.append("")
    print("\n".join(lines))
    complete = int(all(r["steps"] == args.steps for r in rows.values() if not r.get("zoo")))
    result = "RESULT minutes={:.2f} task={} {} {} {} scratch_above_chance={} complete={} smoke={}".format(
        minutes,
        args.task,
        " ".join(f"{KEYS[k]}_acc={r['acc']:.4f}" for k, r in rows.items()),
        " ".join(f"{KEYS[k]}_focus={r['focus']:.4f}" for k, r in rows.items()),
        " ".join(f"{k}_recovery={v[0]:.3f}" for k, v in rec.items()),
        learnt,
        complete,
        int(args.smoke),
    )
    if args.append_results:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        body = "\n".join(
            [
                "## Attention transfer: scratch vs copy vs distill vs fine-tune (benchmarks/attention_transfer.py)",
                "",
                f"{stamp}; backbone {backbone.name}; {torch.get_num_threads()} threads; {minutes:.1f} min.",
                "",
                *lines,
                "```",
                result,
                "```",
            ]
        )
        write_section(args.results_file, "attention-transfer" + ("-smoke" if args.smoke else ""), body)
        print(f"wrote the attention-transfer section of {args.results_file}")
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
