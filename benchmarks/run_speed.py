"""End-to-end lecture-recipe runs with and without the frozen-stage cache, side by side in one process.

Why: the cache (`toast_core.training.feature_cache`, issue 17) should make whole runs cheaper, not just a
step, and must not change what they learn. Each recipe (`toast_core.training.recipes`, task "stars" on the
embedded backbone, its training split at the recipe's images per class) is trained twice with the
same seed through the one `train()` — `cache_mb` at its default (cached) and 0 (every step
recomputes the frozen backbone) — and the final modules are compared parameter by parameter.
Order alternates per recipe (cached first, then uncached first), so slow drifts of a shared
machine's load do not favour one side. Times are process CPU seconds (the work, robust to waiting
for a core on a loaded machine) and wall seconds; the speedup uses CPU time.

Usage: `python benchmarks/run_speed.py [--task stars] [--entries linear toast] [--per-class N]
[--steps-scale F] [--threads 1]`; `--smoke` runs the tiny fixture backbone on generated data.
Last line: `RESULT linear_speedup=… toast_speedup=… max_abs_diff=… cache_peak_mb=…`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from toast_core.core.backbone import Backbone, load_embedded, tiny_fixture_backbone
from toast_core.data.base import LabeledImages
from toast_core.methods import build_method
from toast_core.training.recipes import Recipe, recipe
from toast_core.training.train import TrainResult, train


def load(args: argparse.Namespace) -> tuple[Backbone, LabeledImages, LabeledImages, str]:
    if args.smoke:
        bb = tiny_fixture_backbone()
        g = torch.Generator().manual_seed(0)
        n = 3 * args.per_class
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        data = LabeledImages(images, torch.arange(n) % 3, ["a", "b", "c"])
        return bb, data, data.subset(list(range(min(n, 12)))), "tiny fixture backbone, random images"
    from toast_core.data.scenes import make_task_split

    bb = load_embedded(device="cpu")
    train_set = make_task_split(args.task, "train", args.per_class, 0)
    val_set = make_task_split(args.task, "val", 20, 0)
    return bb, train_set, val_set, f"embedded backbone ({bb.name}), task {args.task}"


def run_once(
    bb: Backbone,
    rec: Recipe,
    data: LabeledImages,
    val: LabeledImages,
    cache_mb: float,
    steps: int,
    threads: int,
) -> tuple[torch.nn.Module, TrainResult, float, float]:
    cfg = rec.train_config(0, steps=steps, cache_mb=cache_mb, num_threads=threads)
    method = build_method(rec.method, bb, data.num_classes, {**rec.method_config, "seed": 0})
    w0, c0 = time.perf_counter(), time.process_time()
    result = train(method, data, val, cfg)
    return method, result, time.process_time() - c0, time.perf_counter() - w0


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="stars")
    parser.add_argument("--entries", nargs="+", default=["linear", "toast"])
    parser.add_argument("--per-class", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every recipe's steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    recipes = {e: recipe(args.task, e) for e in args.entries}
    if args.smoke:
        recipes = {e: dataclasses.replace(r, steps=12, batch_size=8, per_class=8) for e, r in recipes.items()}
    per_class = {r.per_class for r in recipes.values()}
    args.per_class = args.per_class or max(per_class)
    torch.set_num_threads(args.threads)
    bb, data, val, desc = load(args)
    print(
        f"run_speed: {desc}, {len(data)} training images ({args.per_class}/class), {len(val)} val, "
        f"{args.threads} thread(s), CPU; cached = TrainConfig.cache_mb default, uncached = 0"
    )
    print(f"{'entry':<8} {'steps':>5} {'batch':>5} {'cached cpu s':>12} {'plain cpu s':>11} {'speedup':>8} "
          f"{'wall c/p s':>13} {'max|Δ|':>9} {'cache MB':>9}  cache")  # fmt: skip
    out: dict[str, float] = {}
    diffs, peaks = [], []
    for i, (entry, rec) in enumerate(recipes.items()):
        steps = max(1, round(rec.steps * args.steps_scale))
        sides = (("cached", 1024.0), ("plain", 0.0))
        runs = {}
        for side, mb in sides if i % 2 == 0 else sides[::-1]:
            runs[side] = run_once(bb, rec, data, val, mb, steps, args.threads)
        (mc, rc, cc, wc), (mp, rp, cp, wp) = runs["cached"], runs["plain"]
        diff = max_abs_diff(mc, mp)
        diffs.append(diff)
        peaks.append(rc.cache["peak_mb"])
        out[f"{entry}_speedup"] = cp / cc
        out[f"{entry}_cached_cpu_s"], out[f"{entry}_plain_cpu_s"] = cc, cp
        per_image = rc.cache["peak_mb"] / max(rc.cache["entries"], 1)
        print(
            f"{entry:<8} {steps:>5} {rec.batch_size:>5} {cc:>12.1f} {cp:>11.1f} {cp / cc:>7.1f}x "
            f"{wc:>6.1f}/{wp:<6.1f} {diff:>9.1e} {rc.cache['peak_mb']:>9.1f}  {rc.cache['kind']}, "
            f"{rc.cache['entries']} rows ({per_image * 1024:.1f} KB each; 200/class: "
            f"{per_image * 200 * data.num_classes:.0f} MB); val acc cached {rc.final.get('val_acc', float('nan')):.3f} "
            f"vs {rp.final.get('val_acc', float('nan')):.3f}; uncached reason: {rp.cache['reason']}"
        )
    out["max_abs_diff"] = max(diffs)
    out["cache_peak_mb"] = max(peaks)
    keys = [f"{e}_speedup" for e in recipes] + ["max_abs_diff", "cache_peak_mb"]
    print("RESULT " + " ".join(f"{k}={out[k]:.3g}" for k in keys))


if __name__ == "__main__":
    main()
