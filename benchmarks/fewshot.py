"""Few-shot benchmark: does FORT's position prompt help full FT and LoRA on 5-way 1/5-shot episodes?

Both downstream tasks ("stars": 8 classes, "glyphs": 10 classes — fewer than the 20 that FORT's
official 20-way setting needs, so 5-way) with the embedded backbone. Methods: full FT, FT+FORT,
LoRA (qkv + proj, as FORT's LoRA), LoRA+FORT, linear probe. Every method starts from a ridge head
fitted on the support features (FORT's classifier initialisation) and is tuned with AdamW, batch =
n_way, constant lr, on the same episodes (paired). Reported per task and shot: query accuracy ± 95%
CI, focus on the deciding object (share of last-layer CLS attention on the query's mask; "area" is
its chance level) and, for FORT, the share of the prompts' mass on the support objects.

Budget (2 CPU cores, ≤ 15 min): the headline — FT vs FT+FORT at 1-shot — runs `--episodes` (100)
episodes per task; the other 1-shot cells `--episodes-other` (20), the 5-shot cells
`--episodes-5shot` (10). 5 steps per 1-shot episode (= the official 5 epochs of FT), 10 per 5-shot
episode (2 epochs; the official 5/10 epochs do not fit), 3 queries per class. Episodes run in rounds
of 10 across all cells, and `--max-minutes` stops before the next episode, so a slow machine gets
fewer (still paired) episodes rather than a missing cell; the table says how many ran and the RESULT
line has complete=0 when the headline fell short of `--episodes`.

Learning rates (own choice for this 2.7M-parameter backbone; official ViT-B values in brackets):
FT 1e-4 [1e-5], LoRA 5e-3 [5e-3], linear 1e-2 [1e-2]. FORT: official defaults (τ=1; α=0.03 FT,
0.5 LoRA; P = round(0.07 · patches) = 10 of 144; min over heads; importance-weighted prompts).

    python benchmarks/fewshot.py [--smoke] [--append-results] [--threads 2] [--max-minutes 15]

Last line: RESULT minutes=… fort_gain_1shot=… (FT+FORT − FT, accuracy points, mean of both tasks).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toast_core.backbone import Backbone, load_backbone, tiny_fixture_backbone  # noqa: E402
from toast_core.data.base import LabeledImages  # noqa: E402
from toast_core.fewshot import (  # noqa: E402
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
ROUND = 10


# --- RESULTS.md sections (shared with benchmarks/attention_transfer.py) ------------------------------
def write_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the section between `<!-- key:start -->` and `<!-- key:end -->` only."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


# --- data -------------------------------------------------------------------------------------------
def smoke_task(seed: int, n_classes: int = 6, per_class: int = 8, size: int = 32) -> LabeledImages:
    """Random noise with one coloured square (the label) at a random place; masks = the square."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (n_classes, 3), generator=g, dtype=torch.uint8)
    n = n_classes * per_class
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % n_classes
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    side = size // 3
    for i in range(n):
        top, left = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
        images[i, :, top : top + side, left : left + side] = colours[labels[i]].view(3, 1, 1)
        masks[i, top : top + side, left : left + side] = True
    return LabeledImages(images, labels, [f"c{i}" for i in range(n_classes)], masks, {"task": f"smoke{seed}"})


def load(smoke: bool, per_class: int) -> tuple[Backbone, dict[str, LabeledImages]]:
    if smoke:
        return tiny_fixture_backbone(), {"smoke-a": smoke_task(1), "smoke-b": smoke_task(2)}
    backbone = load_backbone("embedded", device="cpu")
    return backbone, {t: task_pool(t, per_class=per_class, seed=0, split="test") for t in TASKS}


def specs_for(shot: int, args: argparse.Namespace) -> list[MethodSpec]:
    head = args.episodes if shot == 1 else args.episodes_5shot
    other = args.episodes_other if shot == 1 else args.episodes_5shot
    lora = {"targets": ("qkv", "proj")}
    return [
        MethodSpec("FT", "full", lr=args.lr_ft, episodes=head),
        MethodSpec("FT+FORT", "fort_full", lr=args.lr_ft, episodes=head),
        MethodSpec("LoRA", "lora", lora, lr=args.lr_lora, episodes=other),
        MethodSpec("LoRA+FORT", "fort_lora", {}, lr=args.lr_lora, episodes=other),
        MethodSpec("linear", "linear", lr=args.lr_linear, episodes=other),
    ]


# --- report -----------------------------------------------------------------------------------------
def _pct(v: float | None, ci: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{100 * v:5.1f}" + (f" ± {100 * ci:4.1f}" if ci is not None and not math.isnan(ci) else "")


def table(task: str, shot: int, summaries: dict[str, FewShotSummary]) -> list[str]:
    rows = [
        f"#### {task}, 5-way {shot}-shot",
        "",
        "| method | episodes | accuracy % (±95% CI) | focus on object % | area % | prompt on object % | s/episode |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries.values():
        per = s.seconds / s.episodes if s.episodes else float("nan")
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
    rows.append("")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fixture backbone, random data, seconds")
    parser.add_argument("--append-results", action="store_true", help="write this section into RESULTS.md")
    parser.add_argument("--results-file", type=Path, default=RESULTS_FILE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--episodes", type=int, default=100, help="headline cells (FT, FT+FORT, 1-shot)")
    parser.add_argument("--episodes-other", type=int, default=20, help="other 1-shot cells")
    parser.add_argument("--episodes-5shot", type=int, default=10)
    parser.add_argument("--query", type=int, default=3, help="query images per class")
    parser.add_argument("--steps-1shot", type=int, default=5)
    parser.add_argument("--steps-5shot", type=int, default=10)
    parser.add_argument("--lr-ft", type=float, default=1e-4)
    parser.add_argument("--lr-lora", type=float, default=5e-3)
    parser.add_argument("--lr-linear", type=float, default=1e-2)
    parser.add_argument("--per-class", type=int, default=20, help="test-split images per class to draw from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.episodes, args.episodes_other, args.episodes_5shot = 3, 2, 2
        args.query, args.steps_1shot, args.steps_5shot = 2, 2, 2
    torch.set_num_threads(max(1, args.threads))
    t0 = time.monotonic()
    deadline = t0 + 60.0 * args.max_minutes

    backbone, tasks = load(args.smoke, args.per_class)
    blocks = [(task, shot) for shot in (1, 5) for task in tasks]
    configs = {
        (task, shot): FewShotConfig(
            n_way=5, k_shot=shot, n_query=args.query, episodes=args.episodes, seed=args.seed,
            steps=args.steps_1shot if shot == 1 else args.steps_5shot,
        )
        for task, shot in blocks
    }
    specs = {shot: specs_for(shot, args) for shot in (1, 5)}
    results: dict[tuple[str, int], dict[str, list[EpisodeResult]]] = {
        b: {s.label: [] for s in specs[b[1]]} for b in blocks
    }
    print(f"backbone: {backbone.name} (grid {backbone.layout.grid}, width {backbone.layout.embed_dim}, "
          f"{backbone.layout.depth} blocks); threads {torch.get_num_threads()}; budget {args.max_minutes} min")
    most = max(args.episodes, args.episodes_other, args.episodes_5shot)
    stopped = False
    for first in range(0, most, ROUND):
        for block in blocks:
            ids = range(first, min(first + ROUND, most))
            got = run_episodes(backbone, tasks[block[0]], specs[block[1]], configs[block], ids, deadline=deadline)
            for label, rs in got.items():
                results[block][label].extend(rs)
            if time.monotonic() > deadline:
                stopped = True
                break
        done = sum(len(v) for r in results.values() for v in r.values())
        print(f"  after round {first // ROUND + 1}: {done} method-episodes, {(time.monotonic() - t0) / 60:.1f} min")
        if stopped:
            print(f"  time budget reached ({args.max_minutes} min): stopping with the episodes done")
            break
    minutes = (time.monotonic() - t0) / 60

    lines: list[str] = []
    summaries: dict[tuple[str, int], dict[str, FewShotSummary]] = {}
    for block in blocks:
        summaries[block] = {s.label: summarise(s, configs[block], results[block][s.label]) for s in specs[block[1]]}
        lines += table(block[0], block[1], summaries[block])
    print("\n".join(lines))

    def gain(a: str, b: str, shot: int) -> tuple[float, list[float], int]:
        per = [paired_difference(summaries[(t, shot)][a], summaries[(t, shot)][b]) for t in tasks]
        vals = [100 * m for m, _, n in per if n]
        return (float(np.mean(vals)) if vals else float("nan")), vals, min(n for _, _, n in per)

    g1, g1_tasks, n1 = gain("FT+FORT", "FT", 1)
    gl1, _, _ = gain("LoRA+FORT", "LoRA", 1)
    g5, _, _ = gain("FT+FORT", "FT", 5)
    complete = int(n1 >= args.episodes)
    per_task = " ".join(f"fort_gain_1shot_{t}={v:.2f}" for t, v in zip(tasks, g1_tasks))
    result = (
        f"RESULT minutes={minutes:.2f} fort_gain_1shot={g1:.2f} {per_task} lora_fort_gain_1shot={gl1:.2f} "
        f"fort_gain_5shot={g5:.2f} episodes_headline={n1} complete={complete} smoke={int(args.smoke)}"
    )
    if args.append_results:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        body = "\n".join(
            [
                "## Few-shot: FORT position prompts (benchmarks/fewshot.py)",
                "",
                f"{stamp}; backbone {backbone.name}; {torch.get_num_threads()} threads; {minutes:.1f} min; "
                f"steps {args.steps_1shot} (1-shot) / {args.steps_5shot} (5-shot); {args.query} queries per class; "
                f"lr FT {args.lr_ft}, LoRA {args.lr_lora}, linear {args.lr_linear}; ridge head init.",
                "",
                *lines,
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
