"""`python -m toast_core <command>`: the library without the app — train, eval, compare, bench,
export, import, list.

Everything goes through the library (RunManager for training, checkpoints for modules, compare.py
for views, bundles.py for export/import), so a run trained here shows up in the app and vice versa.
Exit codes: 0 ok, 1 runtime error (one line on stderr, no traceback unless --debug), 2 usage error,
130 interrupted. Heavy imports (torch, timm) happen inside the commands so `--help` stays quick.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toast_core.backbone import Backbone

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "benchmarks"
SHIPPED_RUNS = REPO_ROOT / "checkpoints" / "runs"
SHIPPED_MODULES = REPO_ROOT / "checkpoints"
RUNS_DIR_ENV = "TOAST_LAB_RUNS_DIR"  # the same variable the Streamlit app reads
DEBUG_ENV = "TOAST_DEBUG"
FIXTURE = "fixture"
#: the test-only random-init backbone; the same shape the app uses for TOAST_LAB_BACKBONE=fixture,
#: so runs made here with `--backbone fixture` open there too (same weights hash)
FIXTURE_KWARGS: dict[str, Any] = dict(img_size=96, patch_size=8, embed_dim=32, depth=2, num_heads=2)
BACKBONE_HELP = (
    "backbone: 'embedded' (default, the shipped ViT), a timm model name (hub weights, needs network), "
    "'<timm arch>@<weights file>' or --weights; 'fixture' / 'fixture:<seed>' = a tiny RANDOM-INIT ViT "
    "FOR TESTS ONLY (its attention and predictions mean nothing)"
)


class UsageError(Exception):
    """A command line that cannot work as written (exit code 2)."""


# --- shared helpers --------------------------------------------------------------------------------
def default_runs_dir() -> Path:
    """The writable run registry: $TOAST_LAB_RUNS_DIR, else <repo>/runs (what the app uses)."""
    return Path(os.environ.get(RUNS_DIR_ENV) or REPO_ROOT / "runs")


def registry_roots(runs_dir: str | Path | None) -> list[Path]:
    """Where run ids are looked up: the given / default registry, then the shipped checkpoints/runs."""
    roots = [Path(runs_dir) if runs_dir else default_runs_dir()]
    if SHIPPED_RUNS.is_dir() and SHIPPED_RUNS.resolve() not in {r.resolve() for r in roots}:
        roots.append(SHIPPED_RUNS)
    return roots


def backbone_from_spec(spec: str = "embedded", weights: str | None = None, device: str = "auto") -> Backbone:
    """Load a backbone from its command-line spec (see BACKBONE_HELP); BackboneError on failure."""
    from toast_core.backbone import load_backbone, tiny_fixture_backbone

    spec = (spec or "embedded").strip()
    if spec == FIXTURE or spec.startswith(FIXTURE + ":"):
        seed_text = spec.partition(":")[2] or "0"
        if not seed_text.isdigit():
            raise UsageError(f"'{spec}': a fixture seed must be a non-negative integer ('fixture:1').")
        if weights:
            raise UsageError("--weights cannot be combined with the fixture backbone.")
        dev = "cpu" if device == "auto" else device
        return tiny_fixture_backbone(seed=int(seed_text), device=dev, **FIXTURE_KWARGS)
    if "@" in spec and weights is None:
        spec, _, weights = spec.partition("@")
    return load_backbone(spec.strip(), weights=weights, device=device)


def _add_backbone_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--backbone", default="embedded", metavar="SPEC", help=BACKBONE_HELP)
    p.add_argument("--weights", default=None, metavar="FILE", help="local weights file (.safetensors, or .pth/.bin read weights-only) for the --backbone timm architecture")
    if device:
        p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda or cuda:N (default: auto)")


def _add_runs_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default=None, metavar="DIR",
                   help=f"run registry folder (default: ${RUNS_DIR_ENV} or <repo>/runs; checkpoints/runs is searched too)")


def _parse_value(text: str) -> Any:
    """A --set value: JSON when it parses (4, 0.5, true, null, ["q","v"]), a comma list, else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if "," in text:
        return [_parse_value(part.strip()) for part in text.split(",") if part.strip()]
    return text


def _method_settings(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set takes KEY=VALUE (e.g. --set rank=4), got '{pair}'.")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _limit_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# --- train ---------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from toast_core.methods import method_names
    from toast_core.runs import RunConfig, RunManager

    if args.method not in method_names():
        raise UsageError(f"unknown method '{args.method}'; methods: {', '.join(method_names())}.")
    train = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps, "eval_every": args.eval_every}
    config = RunConfig(
        method=args.method, task=args.task, method_config=_method_settings(args.set), name=args.name,
        per_class=args.per_class, val_per_class=args.val_per_class, train=train, device=args.device,
        seed=args.seed, data_seed=args.data_seed, snapshot_every=args.snapshot_every, checkpoint_every=args.checkpoint_every,
    )
    _limit_threads(args.threads)
    backbone = backbone_from_spec(args.backbone, args.weights, args.device)
    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    manager = RunManager(runs_dir, backbone, cpu_workers=1, gpu_workers_per_device=1, cpu_threads=args.threads)
    run_id = None
    try:
        run_id = manager.submit(config)
        bar = tqdm(total=args.steps, desc=config.display_name, unit="step", file=sys.stderr,
                   disable=args.quiet, dynamic_ncols=True, mininterval=0.5)
        try:
            while True:
                try:
                    status = manager.wait(run_id, timeout=0.3)
                    finished = True
                except TimeoutError:
                    status, finished = manager.status(run_id), False
                bar.total = status.total or bar.total
                bar.update(status.step - bar.n)
                if status.history:
                    last = status.history[-1]
                    post = {"loss": f"{last.get('loss', float('nan')):.3f}"}
                    if "val_acc" in last:
                        post["val_acc"] = f"{last['val_acc']:.3f}"
                    bar.set_postfix(post, refresh=False)
                if finished:
                    break
        finally:
            bar.close()
    except KeyboardInterrupt:
        if run_id is not None:
            manager.cancel(run_id)
            status = manager.wait(run_id, timeout=120)
            print(f"cancelled run {run_id} at step {status.step} (resume it in the app's Tuning Lab)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        manager.shutdown(cancel=True, wait=True, timeout=120)
    summary = {"run_id": run_id, "state": status.state, "method": status.method, "task": status.task,
               "steps": status.step, "final": status.final, "timings": status.timings,
               "run_dir": str(runs_dir / run_id), "backbone": status.backbone}
    if status.state != "done":
        print(f"error: run {run_id} {status.state}: {status.error or status.note or 'no module was saved'}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        final = " ".join(f"{k}={_fmt(v)}" for k, v in status.final.items())
        secs = status.timings.get("total_s")
        print(f"run {run_id} done: {final} steps={status.step}" + (f" time={secs:.1f}s" if secs else ""))
        print(f"saved in {runs_dir / run_id}")
    return EXIT_OK


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
    mean focus share, mean area share (chance), focus ratio = their quotient, pointing-game rate.
    With `faithfulness_steps`, also the view's MoRF / LeRF / random deletion AUCs and their gap with
    bootstrap 95% intervals (`views.faithfulness_summary`)."""

    from toast_core.compare import view_kwargs
    from toast_core.train import evaluate, view_over
    from toast_core.views import focus_summary

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
    return metrics


def cmd_eval(args: argparse.Namespace) -> int:
    from toast_core.compare import BASE_KEY, check_view_args, load_module_ref

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
    from toast_core.compare import (
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


# --- bench ---------------------------------------------------------------------------------------
def benchmark_names() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.name.startswith("_"))


def cmd_bench(args: argparse.Namespace) -> int:
    names = benchmark_names()
    if args.list or not args.name:
        print("\n".join(names))
        return EXIT_OK
    name = args.name.removesuffix(".py")
    if name not in names:
        raise UsageError(f"unknown benchmark '{args.name}'; benchmarks: {', '.join(names)}.")
    extra = list(args.args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(BENCH_DIR / f"{name}.py"), *extra], cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        print(f"error: benchmark {name} exited with status {proc.returncode}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


# --- export / import / list ------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from toast_core.backbone import BackboneError
    from toast_core.bundles import bundle_members, export_bundle, find_run

    run_dir = find_run(args.run, registry_roots(args.runs_dir))
    backbone = None
    if not args.no_figures:
        try:
            backbone = backbone_from_spec(args.backbone, args.weights, "cpu")
        except BackboneError as exc:
            print(f"warning: no comparison figures (backbone not loaded: {exc})", file=sys.stderr)
    out = export_bundle(run_dir, args.out, backbone=backbone, figures=not args.no_figures)
    members = bundle_members(out)
    figures = [m for m in members if m.startswith("figures/")]
    print(f"exported run {run_dir.name} to {out} ({len(members)} files, {len(figures)} figures, {out.stat().st_size / 1024:.0f} KiB)")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from toast_core.bundles import import_bundle

    backbone = backbone_from_spec(args.backbone, args.weights, "cpu")
    root = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    run_id = import_bundle(args.bundle, root, backbone)
    print(f"imported run {run_id} into {root}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from toast_core.bundles import list_runs

    roots = registry_roots(args.runs_dir)
    rows = []
    for i, root in enumerate(roots):
        for r in list_runs(root):
            final = r.final or {}
            rows.append({"id": r.run_id, "method": r.method, "task": r.task, "state": r.state,
                         "steps": r.step, "val_acc": final.get("val_acc"), "train_acc": final.get("train_acc"),
                         "name": r.name, "registry": str(root), "shipped": i > 0})
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print(f"no runs in {', '.join(str(r) for r in roots)}")
    else:
        print(_table(rows, ["id", "method", "task", "state", "steps", "val_acc", "train_acc"]))
    return EXIT_OK


# --- the parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m toast_core",
        description="Attention Steering Lab without the app: train steering modules, evaluate them, "
        "render attention comparisons, run benchmarks, export and import run bundles.",
    )
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks on errors (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a steering module on a task (a run in the registry)",
                       description="Train one steering method on a task through the run manager; the run "
                       "(config, history, module) lands in the registry the app reads. Progress on stderr.")
    p.add_argument("--method", required=True, help="steering method (linear, full, bitfit, lora, vpt, ...)")
    p.add_argument("--task", required=True, help="'stars', 'glyphs', 'folder:<path>' or 'episode:<n>:<k>:<q>[:<i>]:<base>'")
    p.add_argument("--per-class", type=int, default=50, help="training images per class (default 50)")
    p.add_argument("--val-per-class", type=int, default=10, help="validation images per class (default 10; 0 = none)")
    p.add_argument("--steps", type=int, default=100, help="optimisation steps (default 100)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0 = at the end)")
    p.add_argument("--snapshot-every", type=int, default=10, help="attention snapshot every N steps (0 = never)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="save checkpoint_last every N steps (0 = never)")
    p.add_argument("--seed", type=int, default=0, help="method initialisation and batch order")
    p.add_argument("--data-seed", type=int, default=0, help="which images (same data across methods)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method setting, repeatable (e.g. --set rank=4 --set targets=q,v)")
    p.add_argument("--name", default=None, help="display name of the run")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_runs_dir(p)
    _add_backbone_args(p)
    p.set_defaults(func=cmd_train)

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
    p.add_argument("--view", default="cls", help="cls, rollout, grad_rollout, gradcam, selection, toast_pass1, toast_pass2 (default cls)")
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

    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (arguments after --)",
                       description="Run benchmarks/<NAME>.py with this Python; arguments after '--' go to the "
                       "script, e.g. `python -m toast_core bench methods_small -- --smoke`.")
    p.add_argument("name", nargs="?", help="benchmark name (see --list)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark, after --")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="write a run as a bundle zip (module, card, config, metrics, figures)",
                       description="Export a done run as one zip: module (.safetensors) + card, config.json, "
                       "run.json, metrics.csv, attention figures and a SHA-256 manifest.")
    p.add_argument("run", help="run id or run folder")
    p.add_argument("--out", required=True, help="output .zip")
    p.add_argument("--no-figures", action="store_true", help="skip the attention figures")
    _add_runs_dir(p)
    _add_backbone_args(p, device=False)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="add a run bundle zip to a registry (validated)",
                       description="Import a run bundle: member names, manifest hashes and the backbone's weights "
                       "hash are checked and the module is loaded (never unpickled) before the run appears.")
    p.add_argument("bundle", help="bundle .zip")
    _add_runs_dir(p)
    _add_backbone_args(p, device=False)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("list", help="list runs: id, method, task, state, accuracy",
                       description="List the runs of the registry (read-only; never changes a run).")
    p.add_argument("--json", action="store_true")
    _add_runs_dir(p)
    p.set_defaults(func=cmd_list)

    from toast_core.zoo import cli as zoo_cli

    zoo_cli.add_parser(sub)
    sub.choices["zoo"].set_defaults(func=zoo_cli.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user: one line, no traceback."""
    from toast_core.backbone import BackboneError
    from toast_core.bundles import BundleError
    from toast_core.checkpoints import CheckpointError
    from toast_core.data.images import ImageInputError
    from toast_core.data.zip_import import ZipImportError
    from toast_core.runs import RunError
    from toast_core.views import ViewUnavailable

    return (BackboneError, BundleError, CheckpointError, ImageInputError, ZipImportError, RunError,
            ViewUnavailable, ValueError, KeyError, OSError, TimeoutError)


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (the caller decides whether to sys.exit)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(exc.code or 0)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    sub_prog = f"{parser.prog} {args.command}"
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"{sub_prog}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, _user_errors()):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        else:
            print(f"error: internal error ({type(exc).__name__}: {_one_line(exc)}); rerun with --debug for the traceback",
                  file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
