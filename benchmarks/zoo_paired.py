"""Which zoo module wins? Two shipped modules compared on the same test images, paired.

    python benchmarks/zoo_paired.py --task glyphs --a full --b lora
    python benchmarks/zoo_paired.py --task stars --a full --b lora --per-class 8   # a quick subset

Two modules scored on the same images are correlated, so their separate 95% intervals overlap more
than the difference deserves. This scores both on the task's test split (or its first `--per-class`
images of every class), and reports the accuracy difference a - b with a paired bootstrap 95%
interval over images, and the discordant counts (images only a gets right / only b gets right).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from toast_core.core.stats import bootstrap_interval
from toast_core.training.zoo.evaluate import per_class_subset, score_split
from toast_core.training.zoo.train_entry import zoo_split


def paired(task: str, a: str, b: str, per_class: int = 0) -> dict[str, float]:
    from toast_core.core.backbone import load_backbone
    from toast_core.training.zoo.catalog import find_entry, load_entry

    backbone = load_backbone("embedded")
    test = zoo_split(task, "test")
    if per_class:
        test = per_class_subset(test, per_class)
    correct = {}
    for name in (a, b):
        method = load_entry(find_entry(f"{task}/{name}", backbone), backbone)
        method.eval()
        correct[name] = score_split(method, test, per_image=True)["correct"].astype(np.float64)
    ca, cb = correct[a], correct[b]
    lo, hi = bootstrap_interval((ca, cb), lambda x, y: float(np.mean(x) - np.mean(y)), n_boot=2000)
    return {
        "n": len(ca),
        "acc_a": float(ca.mean()),
        "acc_b": float(cb.mean()),
        "diff": float(ca.mean() - cb.mean()),
        "lo": lo,
        "hi": hi,
        "only_a": int(((ca == 1) & (cb == 0)).sum()),
        "only_b": int(((ca == 0) & (cb == 1)).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="glyphs")
    ap.add_argument("--a", default="full")
    ap.add_argument("--b", default="lora")
    ap.add_argument(
        "--per-class", type=int, default=0, help="score the first N test images per class (0: all)"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = paired(args.task, args.a, args.b, args.per_class)
    print(
        f"[{args.task}] {args.a} {r['acc_a']:.3f} vs {args.b} {r['acc_b']:.3f} on the same {r['n']} test images: "
        f"difference {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] (paired bootstrap 95%); "
        f"only {args.a} right {r['only_a']}, only {args.b} right {r['only_b']}"
    )
    print(
        f"RESULT task={args.task} a={args.a} b={args.b} n={r['n']} acc_a={r['acc_a']:.4f} acc_b={r['acc_b']:.4f} "
        f"diff={r['diff']:+.4f} lo={r['lo']:+.4f} hi={r['hi']:+.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
