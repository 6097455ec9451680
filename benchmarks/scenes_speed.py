"""Scene generation speed on one core: source scenes (pretraining) and the two downstream tasks.

The target is >= 500 images/s per core, so that data generation never starves pretraining. The
rate is computed from this process's CPU time (single-threaded: OMP/cv2/torch pinned to 1 thread),
which is what one core delivers even on a shared machine; wall-clock rates are printed beside it.
Even CPU time moves by 20% between runs on this VM, so each generator is timed in several rounds
(interleaved, so a slow spell hits all of them) and the median round is the headline; the best
round is printed beside it.

    OMP_NUM_THREADS=1 python benchmarks/scenes_speed.py [--images 256] [--rounds 5] [--smoke]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy / cv2 / torch load their pools

import argparse
import statistics
import time
from collections.abc import Callable

import cv2
import torch

from toast_core.data import scenes


def _rate(fn: Callable[[int], None], n: int) -> tuple[float, float]:
    """(images per CPU second, images per wall second) for producing n images."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn(n)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return n / max(cpu, 1e-9), n / max(wall, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images per generator and round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per generator")
    parser.add_argument("--smoke", action="store_true", help="a few images only, to check it runs")
    args = parser.parse_args()
    n, rounds = (16, 1) if args.smoke else (args.images, args.rounds)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    # warm the per-process caches (texture bank, glyph masks) so they are not timed
    scenes.source_batch(0, "train", 0, 4)
    for task in scenes.TASKS:
        scenes.make_task_split(task, "val", 1)

    batch = 64
    rows = {
        "source": lambda k: [
            scenes.source_batch(0, "train", s, min(batch, k - s)) for s in range(0, k, batch)
        ],
    }
    for task, spec in scenes.TASKS.items():
        rows[task] = lambda k, task=task, c=len(spec.classes): scenes.make_task_split(
            task, "train", max(1, k // c)
        )
    sizes = {
        "source": n,
        **{t: max(1, n // len(s.classes)) * len(s.classes) for t, s in scenes.TASKS.items()},
    }

    cpu: dict[str, list[float]] = {name: [] for name in rows}
    wall: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            cpu_rate, wall_rate = _rate(fn, sizes[name])
            cpu[name].append(cpu_rate)
            wall[name].append(wall_rate)
    median = {name: statistics.median(v) for name, v in cpu.items()}
    print(f"{'generator':<10} {'images':>7} {'rounds':>7} {'img/s cpu (median)':>19} {'(best)':>7} {'img/s wall (median)':>20}")
    for name in rows:
        print(
            f"{name:<10} {sizes[name]:>7} {rounds:>7} {median[name]:>19.0f} {max(cpu[name]):>7.0f} "
            f"{statistics.median(wall[name]):>20.0f}"
        )
    print(f"load average (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(
        f"RESULT source_img_per_s={median['source']:.0f} stars_img_per_s={median['stars']:.0f} "
        f"glyphs_img_per_s={median['glyphs']:.0f} min_img_per_s={min(median.values()):.0f} "
        f"best_min_img_per_s={min(max(v) for v in cpu.values()):.0f}"
    )

if __name__ == "__main__":
    main()
