"""`eval` and `compare`: a module's accuracy and attention focus on a task split, and one view of
several modules side by side on one image (PNG, CSV) — all through compare.py and the views."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from toast_core.frontends.cli_common import (
    EXIT_OK,
    UsageError,
    _add_backbone_args,
    _add_runs_dir,
    _fmt,
    _limit_threads,
    _table,
    backbone_from_spec,
    registry_roots,
)


# --- eval ----------------------------------------------------------------------------------------
def _eval_data(task: str, split: str, per_class: int, seed: int, size: int) -> Any:
    from toast_core.runs import parse_task

    ref = parse_task(task)
    if ref.kind == "builtin":
        from toast_core.data.scenes import make_task_split

        return make_task_split(ref.name, split, per_class=per_class, seed=seed, size=size)
    if ref.kind == "folder":
        from toast_core.data.folder import load_image_folder

        root = Path(ref.path)
        folder = root / split if (root / split).is_dir() else root
        return load_image_folder(folder, size=size, max_images_per_class=per_class)
    raise UsageError(f"eval takes a built-in task or 'folder:<path>', not an episode ('{task}'); pass --task.")


def evaluate_module(
    method: Any, data: Any, view: str = "cls", layer: int = -1, batch_size: int = 32,
    faithfulness_steps: int = 0, deletion: str = "tokens",
) -> dict[str, Any]:  # fmt: skip
    """Accuracy (train.evaluate) and, when the data has masks, focus of `view` on the deciding object:
    mean focus share, mean area share (chance), focus ratio = their quotient, pointing-game rate, and
    on built-in scenes the deciding object's share of the attention on objects (95% bootstrap
    interval) beside its chance level.
    With `faithfulness_steps`, also the view's MoRF / LeRF / random deletion AUCs and their gap with
    bootstrap 95% intervals (`views.faithfulness_summary`)."""

    from toast_core.training.train import evaluate, view_over
    from toast_core.views import focus_summary
    from toast_core.views.compare import view_kwargs

    metrics: dict[str, Any] = dict(evaluate(method, data, batch_size))
    kwargs = view_kwargs(view, layer, "mean")
    if faithfulness_steps > 0:
        from toast_core.views import faithfulness_summary

        faith = faithfulness_summary(method, data, view, steps=faithfulness_steps, mode=deletion,
                                     batch_size=batch_size, **kwargs)  # fmt: skip
        metrics.update(faith_steps=faith["steps"], deletion=faith["mode"],
                       **{k: v for k, v in faith.items() if k.startswith(("morf", "lerf", "random", "gap"))})
    if data.masks is None:
        return metrics
    maps = view_over(method, data.images, view, batch_size, **kwargs).map
    metrics.update(view=view, **focus_summary(maps, data.masks.cpu().numpy()))
    if data.objects is not None:  # built-in scenes: "the right object" beside "any object"
        from toast_core.views.objects import focus_report

        report = focus_report(maps, data.masks.cpu().numpy(), data.objects.cpu().numpy())
        metrics.update({k: report[k] for k in ("object_share", "object_share_lo", "object_share_hi", "object_chance")})
    return metrics


def cmd_eval(args: argparse.Namespace) -> int:
    from toast_core.views.compare import BASE_KEY, check_view_args, load_module_ref

    if args.target == BASE_KEY:
        raise UsageError("'base' has no head trained for a task; evaluate a run or a module file.")
    _limit_threads(args.threads)
    backbone = backbone_from_spec(args.backbone, args.weights, args.device)
    check_view_args(backbone, args.view, args.layer, "mean")
    method = load_module_ref(args.target, backbone, registry_roots(args.runs_dir))
    card = getattr(method, "card", {}) or {}
    task = args.task or str(card.get("task") or "")
    if not task:
        raise UsageError("the module's card names no task; pass --task.")
    if task.startswith("episode:"):  # an episode's module is evaluated on its base task's split
        from toast_core.runs import parse_task

        ref = parse_task(task)
        task = ref.name or f"folder:{ref.path}"
    data = _eval_data(task, args.split, args.per_class, args.data_seed, int(backbone.layout.img_size[0]))
    if data.num_classes != method.num_classes:
        raise ValueError(f"The module has {method.num_classes} classes but task '{task}' has {data.num_classes}.")
    metrics = evaluate_module(method, data, args.view, args.layer, args.batch_size, args.faithfulness, args.deletion)
    result = {"module": str(getattr(method, "label", method.name)), "method": method.name, "task": task,
              "split": args.split, **metrics}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(" ".join(f"{k}={_fmt(v)}" for k, v in result.items()))
    return EXIT_OK


# --- compare -------------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    from toast_core.views.compare import (
        check_view_args,
        compare_runs,
        comparison_image,
        focus_rows,
        load_module_ref,
        open_image,
        prediction_row,
        write_views_csv,
    )

    _limit_threads(args.threads)
    backbone = backbone_from_spec(args.backbone, args.weights, args.device)
    head = check_view_args(backbone, args.view, args.layer, args.head)
    image = open_image(args.image, size=int(backbone.layout.img_size[0]))
    roots = registry_roots(args.runs_dir)
    modules: dict[str, Any] = {}
    for ref in args.runs:
        method = load_module_ref(ref, backbone, roots)
        label = str(getattr(method, "label", method.name))
        if any(str(getattr(m, "label", "")) == label for m in modules.values()):
            method.label = f"{label} ({ref})"  # type: ignore[attr-defined]
        modules[ref] = method
    results = compare_runs(backbone, modules, image, args.view, args.layer, head)
    for r in results:
        if r.view is None:
            print(f"warning: {r.label}: {r.error}", file=sys.stderr)
    box = tuple(args.box) if args.box else None
    figure = comparison_image(image, results, alpha=args.alpha, cmap=args.cmap, box=box)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out, format="PNG")
    region = box if box is not None else image.mask
    rows = focus_rows(results, region, image.size) if region is not None else [
        prediction_row(r) for r in results if r.view is not None
    ]
    if args.csv:
        write_views_csv(results, args.csv)
    if args.json:
        print(json.dumps({"image": image.name, "view": args.view, "figure": str(out), "csv": args.csv,
                          "region": "box" if box else ("mask" if region is not None else None), "modules": rows}, indent=1))
    else:
        where = "box" if box else "object mask" if region is not None else None
        print(f"{image.name}: view {args.view}" + (f", focus against the {where}" if where else ""))
        cols = ["module", "prediction", "confidence"] + (["focus_share", "area_share", "focus_ratio", "pointing_game"] if where else [])
        print(_table(rows, cols))
        print(f"figure: {out}" + (f"  csv: {args.csv}" if args.csv else ""))
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """The `eval` and `compare` subcommands."""
    p = sub.add_parser("eval", help="accuracy and attention focus of a run or module on a task split",
                       description="Evaluate a run (id or folder) or a module file on a task split: accuracy, "
                       "loss and, on built-in scenes, how much of the view's attention lands on the deciding object.")
    p.add_argument("target", help="run id, run folder, or module file (.json / .safetensors)")
    p.add_argument("--task", default=None, help="task (default: the module's own task)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--per-class", type=int, default=10, help="images per class (default 10)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--view", default="cls", help="view for the focus score (default cls)")
    p.add_argument("--layer", type=int, default=-1, help="layer for single-layer views (default -1)")
    p.add_argument("--faithfulness", type=int, default=0, metavar="STEPS",
                   help="also the view's MoRF / LeRF / random deletion AUCs in STEPS steps (e.g. 20; default 0 = off)")
    p.add_argument("--deletion", default="tokens", choices=("tokens", "mean_fill"),
                   help="delete patch tokens from the sequence (default) or mean-fill their pixels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    _add_runs_dir(p)
    _add_backbone_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="side-by-side attention views of several runs on one image (PNG)",
                       description="Render one view of several modules on one image, side by side on one shared "
                       "colour scale, headless (for slides). IMAGE is a file or 'scene:<task>:<split>:<index>'.")
    p.add_argument("image", help="image file, or a built-in scene such as scene:stars:test:3")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="run ids / run folders / module files; 'base' = the plain backbone")
    p.add_argument("--view", default="cls", help="cls, rollout, grad_rollout, gradcam, relevance, selection, toast_pass1, toast_pass2 (default cls)")
    p.add_argument("--layer", type=int, default=-1, help="layer for cls / TOAST pass views (default -1 = last)")
    p.add_argument("--head", default="mean", help="head index or 'mean' (default mean)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), help="focus region in image pixels (default: the scene's object mask)")
    p.add_argument("--csv", default=None, help="also write every map as CSV")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    p.add_argument("--cmap", default="jet", help="colour map (jet, inferno, viridis, magma, turbo, hot)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    _add_runs_dir(p)
    _add_backbone_args(p)
    p.set_defaults(func=cmd_compare)
