"""Focus vs faithfulness for every zoo method on one task: the README figure.

Focus asks whether a module's map lands on the object that decides the label (plausibility);
faithfulness asks whether the module's prediction depends on what the map points at. For every zoo
module of the task (checkpoints/zoo, read through `toast_core.training.zoo.catalog`) on the test split:
- x: focus ratio of the map on the deciding object (`views.objects.focus_report`: ratio of means,
  1 = chance, bootstrap 95% CI over images);
- y: LeRF − MoRF deletion gap of the same map (`views.faithfulness_summary`: patch tokens dropped
  from the sequence, STEPS steps, bootstrap 95% CI over images; 0 = the map's order does not matter).
Two panels: last-layer CLS attention (what the Explorer shows first) and class relevance (Chefer et
al. 2021). The last line gives Spearman's ρ between focus and gap across modules, per panel.

`--smoke` runs the whole path on the tiny random fixture backbone with untrained registry methods
(numbers meaningless) and writes to a temporary folder unless --out is given.

    python benchmarks/focus_faithfulness.py [--task stars] [--per-class 4] [--steps 20] [--seed 0]
        [--out assets/focus_vs_faithfulness.png] [--threads N] [--smoke] [--zoo-root DIR --backbone fixture]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from toast_core.core.backbone import load_backbone, tiny_fixture_backbone
from toast_core.data.scenes import make_task_split
from toast_core.methods import build_method
from toast_core.training.train import view_over
from toast_core.views import faithfulness_summary
from toast_core.views.objects import focus_report

ROOT = Path(__file__).resolve().parent.parent

VIEWS = (("cls", "last-layer CLS attention", {"layer": -1, "head": "mean"}), ("relevance", "class relevance", {}))
SMOKE_METHODS = ("linear", "lora", "vpt")


def modules_and_data(args: argparse.Namespace):
    """(backbone, [(label, module)], test data): the zoo's modules of the task on the first
    `per_class` images per class of the zoo cards' test split (seed 0 = the cards' data seed); a
    smoke zoo (--backbone fixture) on its own smoke test split; or, with --smoke, fresh methods."""
    from toast_core.data.scenes import TASKS

    if args.smoke:
        backbone = tiny_fixture_backbone(img_size=96, patch_size=16)
        data = make_task_split(args.task, "test", per_class=1, seed=args.seed, size=96)
        return backbone, [(n, build_method(n, backbone, len(TASKS[args.task].classes))) for n in SMOKE_METHODS], data
    from toast_core.training.zoo.build import ZOO_DIR
    from toast_core.training.zoo.catalog import load_entry, zoo_entries

    if args.backbone == "fixture":
        from toast_core.training.zoo.train_entry import task_splits

        backbone, data = tiny_fixture_backbone(), task_splits(args.task, smoke=True)["test"]
    else:
        backbone = load_backbone("embedded", device="cpu")
        data = make_task_split(args.task, "test", per_class=args.per_class, seed=args.seed, size=int(backbone.layout.img_size[0]))
    entries = zoo_entries(backbone, root=args.zoo_root or ZOO_DIR, task=args.task)
    modules = [(e.entry, load_entry(e, backbone)) for e in entries]
    return backbone, [(label, m) for label, m in modules if m.num_classes == data.num_classes], data


def measure(method, data, steps: int, seed: int, batch_size: int) -> dict[str, dict[str, float]]:
    out = {}
    for view, _, options in VIEWS:
        maps = view_over(method, data.images, view, batch_size, **options).map
        focus = focus_report(maps, data.masks.numpy(), seed=seed)
        faith = faithfulness_summary(method, data, view, steps=steps, batch_size=batch_size, seed=seed, **options)
        out[view] = {**{k: focus[k] for k in ("focus_ratio", "focus_ratio_lo", "focus_ratio_hi")}, **faith}
    return out


def spearman(a: list[float], b: list[float]) -> float:
    if len(a) < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def draw(rows: list[tuple[str, dict]], task: str, n: int, steps: int, out: Path, smoke: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(VIEWS), figsize=(6.2 * len(VIEWS), 5.0), dpi=120)
    for ax, (view, title, _) in zip(axes, VIEWS):
        for i, (label, res) in enumerate(rows):
            r = res[view]
            x, y = r["focus_ratio"], r["gap"]
            ax.errorbar(
                x, y, xerr=[[x - r["focus_ratio_lo"]], [r["focus_ratio_hi"] - x]],
                yerr=[[y - r["gap_lo"]], [r["gap_hi"] - y]], fmt="o", color=plt.cm.tab20(i % 20), capsize=3, ms=6,
            )  # fmt: skip
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        ax.axhline(0.0, color="grey", ls=":", lw=1)
        ax.set_xlabel("focus ratio on the deciding object (1 = chance)")
        ax.set_ylabel("faithfulness: LeRF − MoRF deletion AUC")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    note = " — SMOKE: random fixture backbone, untrained modules" if smoke else ""
    fig.suptitle(f"Focus vs faithfulness, {task} test split (n = {n} images, {steps} token-deletion steps, "
                 f"95% bootstrap CIs){note}", fontsize=11)  # fmt: skip
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="stars")
    parser.add_argument("--per-class", type=int, default=4, help="test images per class (default 4)")
    parser.add_argument("--steps", type=int, default=20, help="deletion steps per curve (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="data, tie-break, random order and bootstrap seed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--out", default=None, help="PNG (default assets/focus_vs_faithfulness.png)")
    parser.add_argument("--smoke", action="store_true", help="tiny fixture backbone, untrained methods")
    parser.add_argument("--zoo-root", type=Path, default=None, help="zoo folder (default checkpoints/zoo)")
    parser.add_argument("--backbone", default="embedded", choices=("embedded", "fixture"),
                        help="the backbone the zoo was built on (fixture: a smoke zoo)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    backbone, modules, data = modules_and_data(args)
    if not modules:
        print(f"No zoo module for task '{args.task}' on this backbone (build the zoo: python -m toast_core zoo build).")
        return 2
    rows = [(label, measure(m, data, args.steps, args.seed, args.batch_size)) for label, m in modules]
    default_out = Path(tempfile.mkdtemp()) if args.smoke else ROOT / "assets"
    out = Path(args.out) if args.out else default_out / "focus_vs_faithfulness.png"
    smoke = args.smoke or args.backbone == "fixture"  # a smoke zoo learnt nothing either
    draw(rows, args.task, len(data), args.steps, out, smoke)
    out.with_suffix(".json").write_text(json.dumps({label: res for label, res in rows}, indent=1))

    print(f"backbone {backbone.name}; task {args.task} test, n={len(data)}; {args.steps} steps; threads "
          f"{torch.get_num_threads()}; figure {out}")  # fmt: skip
    print("| module | view | focus ratio [95% CI] | MoRF AUC | LeRF AUC | random AUC | LeRF − MoRF [95% CI] |")
    print("|---|---|---|---:|---:|---:|---|")
    for label, res in rows:
        for view, _, _ in VIEWS:
            r = res[view]
            print(f"| {label} | {view} | {r['focus_ratio']:.2f} [{r['focus_ratio_lo']:.2f}, {r['focus_ratio_hi']:.2f}] | "
                  f"{r['morf_auc']:.3f} | {r['lerf_auc']:.3f} | {r['random_auc']:.3f} | "
                  f"{r['gap']:.3f} [{r['gap_lo']:.3f}, {r['gap_hi']:.3f}] |")  # fmt: skip
    rho = {v: spearman([r[v]["focus_ratio"] for _, r in rows], [r[v]["gap"] for _, r in rows]) for v, _, _ in VIEWS}
    print(
        f"RESULT task={args.task} n={len(data)} modules={len(rows)} steps={args.steps} "
        f"spearman_cls={rho['cls']:.3f} spearman_relevance={rho['relevance']:.3f} "
        f"minutes={(time.perf_counter() - t0) / 60:.2f} smoke={int(smoke)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
