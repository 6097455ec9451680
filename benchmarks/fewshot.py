"""Few-shot benchmark: does FORT's position prompt help full FT and LoRA on 5-way 1/5-shot episodes?

Both downstream tasks ("stars": 8 classes, "glyphs": 10 classes — fewer than the 20 that FORT's
official 20-way setting needs, so 5-way) with the embedded backbone. Methods: full FT, FT+FORT,
LoRA (qkv + proj, as FORT's LoRA), LoRA+FORT, linear probe. Every method starts from a ridge head
fitted on the support features (FORT's classifier initialisation) and is tuned with AdamW, batch =
n_way = 5 images, constant lr, on the same episodes (paired). Reported per task × shot × method
(20 cells, `--episodes` = 100 episodes each): query accuracy ± 95% CI, focus on the deciding object
(share of last-layer CLS attention on the query's mask; "area" is its chance level) and, for FORT,
the share of the prompts' mass on the support objects; paired FORT − base differences.

Budget (≤ 15 min on 2 idle cores). This backbone (96 px, patch 8: 145 tokens, width 192, 6 blocks,
≈ 0.87 GFLOP per image forward) costs, as CPU time on one thread (measured under load, so rather
high): forward 13.5 ms per image, train step 45 ms per image (FT; FT+FORT the same), 35 ms (LoRA,
LoRA+FORT: no weight gradients for the frozen weights), FORT's gradient rollout 26 ms per support
image; per tuned method also ~0.2 s to build it (FT's deep copy of the ViT) and check its start
(one 1-image forward). One process with 2 threads took ~33 ms per FT image-step on the idle 2-core
machine, so the second thread adds only ~45/33 = 1.36× on these small batches, while two 1-thread
worker processes add ~2× — so episodes run in 2 workers with 1 torch thread each. An episode (one task, one shot), with S support images,
Q = 5 · `--query` queries and T = steps · 5 images per tuned method, costs in CPU seconds:

    frozen support features + ridge head    S · 13.5 ms       (shared by all five methods)
    position prompts (once, both FORT runs) S · 26 ms         (shared by FT+FORT and LoRA+FORT)
    tuning FT, FT+FORT, LoRA, LoRA+FORT     T · (45+45+35+35) ms = T · 0.16 s, + 4 · 0.2 s
    scoring the 5 methods on the queries    5 · Q · 13.5 ms   (the probe trains on cached features)

Measured (`--episodes 4`, 3 steps, Q = 10): 3.95 CPU-s per 1-shot episode, 4.9 per 5-shot episode,
i.e. 100 episodes × 2 tasks × 8.85 s / 2 workers = 14.8 min — too close to 15. Each step fewer
saves ~0.72 s per episode, so the defaults are 2 steps at both shots (T = 10): ~3.2 + 4.2 CPU-s per
episode pair → 100 × 2 × 7.4 s / 2 = 12.3 min + ~0.3 min start-up, with the idle machine faster
than these loaded-machine CPU times. The official recipe (5 epochs: 5 steps at 1-shot, 25 at
5-shot, 15 queries) would take ~45 min, 5 steps at both shots ~20 min. `--steps-1shot` /
`--steps-5shot` (at 5-shot, 2 batches of 5 of the 25 support images; the ridge head and the
prompts use all 25). Every run prints its measured CPU seconds per episode and the projection for
100 episodes per cell, so a reduced run (`--episodes 10`) on a loaded machine predicts the full one.

Episodes run in rounds over all 20 cells (episode i of every cell before episode i+1 of any), each
(task, shot, episode) is one work unit running all five methods on one shared `EpisodeCache`, and
each unit's result is a pure function of (seed, task, shot, episode) — one thread per worker, seeds
from the episode index — so results do not depend on the number of workers or the order they
finish, and every method sees the same episodes. `--max-minutes` is a safety guard: no unit starts
after it, so a slow machine gets fewer (still paired) episodes in every cell rather than a missing
cell, and the RESULT line has complete=0 when any cell fell short of `--episodes`.

Learning rates (own choice for this 2.7M-parameter backbone; official ViT-B values in brackets):
FT 1e-4 [1e-5], LoRA 5e-3 [5e-3], linear 1e-2 [1e-2]. FORT: defaults of toast_core.methods.fort
(τ=1; α=0.03 FT, 0.5 LoRA; P = round(0.07 · patches) = 10 of 144; importance-weighted prompts).

    python benchmarks/fewshot.py [--smoke] [--append-results] [--workers 2] [--max-minutes 15]

Last line: RESULT minutes=… fort_gain_1shot=… (FT+FORT − FT, accuracy points, mean of both tasks).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from toast_core.core.backbone import Backbone, load_backbone, tiny_fixture_backbone
from toast_core.data.base import LabeledImages
from toast_core.data.squares import coloured_squares
from toast_core.storage.results_file import write_section
from toast_core.training.fewshot import (
    EpisodeResult,
    FewShotConfig,
    FewShotSummary,
    MethodSpec,
    paired_difference,
    run_episodes,
    summarise,
    task_pool,
)

RESULTS_FILE = Path(__file__).resolve().parent / "RESULTS.md"
TASKS = ("stars", "glyphs")
SHOTS = (1, 5)
N_WAY = 5


# --- data -------------------------------------------------------------------------------------------
def smoke_task(seed: int, n_classes: int = 6, per_class: int = 8, size: int = 32) -> LabeledImages:
    """Random noise with one square of a colour drawn from the seed (the label); masks = the square."""
    return coloured_squares(
        n_classes, per_class, size, seed, random_colours=True, noise=(0, 256), meta={"task": f"smoke{seed}"}
    )


def task_names(smoke: bool) -> tuple[str, ...]:
    return ("smoke-a", "smoke-b") if smoke else TASKS


def load_bench_backbone(smoke: bool) -> Backbone:
    return tiny_fixture_backbone() if smoke else load_backbone("embedded", device="cpu")


def load_tasks(smoke: bool, per_class: int) -> dict[str, LabeledImages]:
    if smoke:
        return {"smoke-a": smoke_task(1), "smoke-b": smoke_task(2)}
    return {t: task_pool(t, per_class=per_class, seed=0, split="test") for t in TASKS}


def specs_for(args: argparse.Namespace) -> list[MethodSpec]:
    lora = {"targets": ("qkv", "proj")}
    return [
        MethodSpec("FT", "full", lr=args.lr_ft),
        MethodSpec("FT+FORT", "fort_full", lr=args.lr_ft),
        MethodSpec("LoRA", "lora", lora, lr=args.lr_lora),
        MethodSpec("LoRA+FORT", "fort_lora", {}, lr=args.lr_lora),
        MethodSpec("linear", "linear", lr=args.lr_linear),
    ]


def config_for(shot: int, args: argparse.Namespace) -> FewShotConfig:
    return FewShotConfig(
        n_way=N_WAY, k_shot=shot, n_query=args.query, episodes=args.episodes, seed=args.seed,
        steps=args.steps_1shot if shot == 1 else args.steps_5shot,
    )


# --- work units, in this process or in workers --------------------------------------------------------
@dataclass
class Unit:
    """One (task, shot, episode): all five methods on one shared episode cache."""

    task: str
    shot: int
    index: int


@dataclass
class UnitResult:
    unit: Unit
    results: dict[str, list[EpisodeResult]]
    seconds: float
    cpu_seconds: float


_STATE: dict[str, object] = {}


def init_worker(args: argparse.Namespace, deadline: float) -> None:
    """Load the backbone and the task pools once per process; one torch thread (see the budget)."""
    torch.set_num_threads(max(1, args.threads))
    backbone, tasks = load_bench_backbone(args.smoke), load_tasks(args.smoke, args.per_class)
    _STATE.update(args=args, backbone=backbone, tasks=tasks, deadline=deadline)


def run_unit(unit: Unit) -> UnitResult | None:
    """Every method on one episode; None when the guard's deadline (wall clock) has passed."""
    if time.time() > _STATE["deadline"]:  # type: ignore[operator]
        return None
    args: argparse.Namespace = _STATE["args"]  # type: ignore[assignment]
    t0, c0 = time.perf_counter(), time.process_time()
    results = run_episodes(
        _STATE["backbone"],  # type: ignore[arg-type]
        _STATE["tasks"][unit.task],  # type: ignore[index]
        specs_for(args),
        config_for(unit.shot, args),
        [unit.index],
    )
    return UnitResult(unit, results, time.perf_counter() - t0, time.process_time() - c0)


def run_all(units: list[Unit], args: argparse.Namespace, deadline: float) -> Iterator[UnitResult | None]:
    """Yield the units' results as they finish: in this process (workers=1) or in a spawn pool."""
    if args.workers <= 1:
        init_worker(args, deadline)
        yield from (run_unit(u) for u in units)
        return
    with mp.get_context("spawn").Pool(args.workers, init_worker, (args, deadline)) as pool:
        yield from pool.imap_unordered(run_unit, units, chunksize=1)


# --- report -----------------------------------------------------------------------------------------
def _pct(v: float | None, ci: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{100 * v:5.1f}" + (f" ± {100 * ci:4.1f}" if ci is not None and not math.isnan(ci) else "")


def table(task: str, shot: int, summaries: dict[str, FewShotSummary], unit_cpu: float) -> list[str]:
    rows = [
        f"#### {task}, 5-way {shot}-shot",
        "",
        "| method | episodes | accuracy % (±95% CI) | focus on object % | area % | prompt on object % | CPU s/episode |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries.values():
        per = s.cpu_seconds / s.episodes if s.episodes else float("nan")
        rows.append(
            f"| {s.label} | {s.episodes} | {_pct(s.acc, s.acc_ci95)} | {_pct(s.focus, s.focus_ci95)} | "
            f"{_pct(s.area)} | {_pct(s.prompt_on_object)} | {per:.2f} |"
        )
    for a, b in (("FT+FORT", "FT"), ("LoRA+FORT", "LoRA")):
        mean, ci, n = paired_difference(summaries[a], summaries[b])
        fmean, fci, _ = paired_difference(summaries[a], summaries[b], "focus")
        rows.append(
            f"| **{a} − {b}** (paired, n={n}) | | {100 * mean:+.1f} ± {100 * ci:.1f} pts | "
            f"{100 * fmean:+.1f} ± {100 * fci:.1f} pts | | | |"
            if n
            else f"| **{a} − {b}** | 0 | — | — | | | |"
        )
    rows += [f"| episode total (shared work included) | | | | | | {unit_cpu:.2f} |", ""]
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fixture backbone, random data, seconds")
    parser.add_argument("--append-results", action="store_true", help="write this section into RESULTS.md")
    parser.add_argument("--results-file", type=Path, default=RESULTS_FILE)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (1 = in this process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="safety guard: no episode starts after it")
    parser.add_argument("--episodes", type=int, default=100, help="episodes of every task × shot × method cell")
    parser.add_argument("--query", type=int, default=2, help="query images per class")
    parser.add_argument("--steps-1shot", type=int, default=2)
    parser.add_argument("--steps-5shot", type=int, default=2)
    parser.add_argument("--lr-ft", type=float, default=1e-4)
    parser.add_argument("--lr-lora", type=float, default=5e-3)
    parser.add_argument("--lr-linear", type=float, default=1e-2)
    parser.add_argument("--per-class", type=int, default=20, help="test-split images per class to draw from")
    parser.add_argument("--project-episodes", type=int, default=100, help="episodes per cell for the projection")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.episodes, args.query, args.steps_1shot, args.steps_5shot = min(args.episodes, 3), 2, 2, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t0 = time.monotonic()
    deadline = time.time() + 60.0 * args.max_minutes
    torch.set_num_threads(max(1, args.threads))
    backbone = load_bench_backbone(args.smoke)  # for the report; workers load their own
    tasks = task_names(args.smoke)
    blocks = [(task, shot) for shot in SHOTS for task in tasks]
    specs = specs_for(args)
    units = [Unit(task, shot, i) for i in range(args.episodes) for task, shot in blocks]
    print(f"backbone: {backbone.name} (grid {backbone.layout.grid}, width {backbone.layout.embed_dim}, "
          f"{backbone.layout.depth} blocks); {args.workers} worker(s) × {args.threads} thread(s); "
          f"{len(units)} episodes ({args.episodes} per cell); guard {args.max_minutes} min", flush=True)

    results: dict[tuple[str, int], dict[str, list[EpisodeResult]]] = {b: {s.label: [] for s in specs} for b in blocks}
    unit_times: dict[tuple[str, int], list[tuple[float, float]]] = {b: [] for b in blocks}
    done = 0
    for got in run_all(units, args, deadline):
        if got is None:
            continue
        block = (got.unit.task, got.unit.shot)
        for label, rs in got.results.items():
            results[block][label].extend(rs)
        unit_times[block].append((got.seconds, got.cpu_seconds))
        done += 1
        if done % (5 * len(blocks)) == 0:
            print(f"  {done}/{len(units)} episodes, {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    minutes = (time.monotonic() - t0) / 60
    if done < len(units):
        print(f"  time guard reached ({args.max_minutes} min): {done} of {len(units)} episodes ran")

    lines: list[str] = []
    summaries: dict[tuple[str, int], dict[str, FewShotSummary]] = {}
    cpu_per_unit: dict[tuple[str, int], float] = {}
    for block in blocks:
        for label in results[block]:
            results[block][label].sort(key=lambda r: r.episode)
        summaries[block] = {s.label: summarise(s, config_for(block[1], args), results[block][s.label]) for s in specs}
        cpu_per_unit[block] = float(np.mean([c for _, c in unit_times[block]])) if unit_times[block] else float("nan")
        lines += table(block[0], block[1], summaries[block], cpu_per_unit[block])
    print("\n".join(lines))

    project = args.project_episodes * sum(cpu_per_unit.values()) / max(1, args.workers) / 60
    timing = (
        "CPU s per episode (all 5 methods + shared work): "
        + ", ".join(f"{t} {s}-shot {cpu_per_unit[(t, s)]:.2f}" for t, s in blocks)
        + f"; wall s per episode per worker {np.mean([w for v in unit_times.values() for w, _ in v]):.2f}; "
        f"projection for {args.project_episodes} episodes per cell on {args.workers} idle core(s): {project:.1f} min "
        f"+ start-up"
    )
    print(timing)

    def gain(a: str, b: str, shot: int) -> tuple[float, list[float]]:
        per = [paired_difference(summaries[(t, shot)][a], summaries[(t, shot)][b]) for t in tasks]
        vals = [100 * m for m, _, n in per if n]
        return (float(np.mean(vals)) if vals else float("nan")), vals

    g1, g1_tasks = gain("FT+FORT", "FT", 1)
    gl1, _ = gain("LoRA+FORT", "LoRA", 1)
    g5, _ = gain("FT+FORT", "FT", 5)
    least = min(s.episodes for per in summaries.values() for s in per.values())
    per_task = " ".join(f"fort_gain_1shot_{t}={v:.2f}" for t, v in zip(tasks, g1_tasks))
    result = (
        f"RESULT minutes={minutes:.2f} fort_gain_1shot={g1:.2f} {per_task} lora_fort_gain_1shot={gl1:.2f} "
        f"fort_gain_5shot={g5:.2f} episodes_min={least} complete={int(least >= args.episodes)} "
        f"projected_minutes={project:.2f} smoke={int(args.smoke)}"
    )
    if args.append_results:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        body = "\n".join(
            [
                "## Few-shot: FORT position prompts (benchmarks/fewshot.py)",
                "",
                f"{stamp}; backbone {backbone.name}; {args.workers} workers × {args.threads} thread; {minutes:.1f} min; "
                f"steps {args.steps_1shot} (1-shot) / {args.steps_5shot} (5-shot) of 5 images; {args.query} queries "
                f"per class; lr FT {args.lr_ft}, LoRA {args.lr_lora}, linear {args.lr_linear}; ridge head init.",
                "",
                *lines,
                timing,
                "",
                "```",
                result,
                "```",
            ]
        )
        write_section(args.results_file, "fewshot" + ("-smoke" if args.smoke else ""), body)
        print(f"wrote the few-shot section of {args.results_file}")
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
