"""Task-dependent attention on the zoo: does a method's attention follow the task on one image?

    python benchmarks/task_switch.py                 # 400 mixed scenes, the shipped zoo
    python benchmarks/task_switch.py --n 100 --append-results

Needs the shipped zoo (checkpoints/zoo, `python -m toast_core zoo build`). See
`toast_core.training.zoo.task_switch` for the definition of switch; CI = 1.96 s / sqrt(n) over images.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from toast_core.core.backbone import load_backbone  # noqa: E402
from toast_core.storage.results_file import write_section  # noqa: E402
from toast_core.training.zoo.task_switch import task_switch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## task_switch: does attention follow the task on one image?"
KEYS = {"toast": "toast", "lora": "lora", "vpt_deep": "vpt", "full": "full", "linear": "linear"}


def table(rows: list[dict]) -> str:
    head = ("| entry | switch [95% CI] | star focus: stars / glyphs module | digit focus: glyphs / stars module "
            "| stars module acc on the star | glyphs module acc on the digit |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['entry']} | {r['switch']:+.4f} ± {r['switch_ci']:.4f} | {r['star_focus_stars']:.3f} / "
            f"{r['star_focus_glyphs']:.3f} | {r['digit_focus_glyphs']:.3f} / {r['digit_focus_stars']:.3f} "
            f"| {r['stars_acc_on_star']:.3f} | {r['glyphs_acc_on_digit']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=400, help="mixed test scenes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--append-results", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = task_switch(load_backbone("embedded"), args.n)
    text = table(rows)
    print(text)
    by = {r["entry"]: r for r in rows}
    complete = int(all(k in by for k in KEYS))
    minutes = (time.perf_counter() - T0) / 60
    if args.append_results:
        section = (f"{HEADING}\n\n{text}\n\n- n = {args.n} mixed scenes (one star, one digit, 1-3 distractors; "
                   "`data.mixed.make_mixed_split`), last-layer CLS attention, head mean; switch as defined in "
                   f"`toast_core.training.zoo.task_switch`; command: `python benchmarks/task_switch.py --n {args.n} "
                   f"--append-results` ({time.strftime('%Y-%m-%d')})\n")
        write_section(RESULTS, "task-switch", section)
    values = " ".join(f"{k}_switch={by[e]['switch']:.4f}" if e in by else f"{k}_switch=nan" for e, k in KEYS.items())
    print(f"RESULT complete={complete} minutes={minutes:.2f} {values}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
