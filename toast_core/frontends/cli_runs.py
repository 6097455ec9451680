"""The registry commands: `resume`, `list`, `export`, `import` — every one reads and writes runs
through `toast_core.runs` (the manager, or the registry's read-only `list_runs` / `find_run`), so
they agree with the app on a run's state: a run whose process died reads `interrupted` everywhere."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toast_core.frontends.cli_common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    _add_backbone_args,
    _add_runs_dir,
    _fmt,
    _limit_threads,
    _table,
    backbone_from_spec,
    default_runs_dir,
    registry_roots,
)

if TYPE_CHECKING:
    from toast_core.runs import RunManager, RunStatus


def follow_run(manager: RunManager, run_id: str, *, quiet: bool = False) -> RunStatus:
    """Show a run's progress (tqdm on stderr) until it has finished and its record is on disk."""
    from tqdm import tqdm

    status = manager.status(run_id, history=False)
    bar = tqdm(total=status.total, initial=status.step, desc=status.name, unit="step", file=sys.stderr,
               disable=quiet, dynamic_ncols=True, mininterval=0.5)  # fmt: skip
    try:
        while True:
            try:
                status, finished = manager.wait(run_id, timeout=0.3), True
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
                return status
    finally:
        bar.close()


def report_run(status: RunStatus, run_dir: Path, as_json: bool) -> int:
    """The end of a CLI run: a summary (or JSON) and exit 0 when done, one error line and 1 otherwise."""
    if status.state != "done":
        why = status.error or status.note or "no module was saved"
        print(f"error: run {status.run_id} {status.state}: {why}", file=sys.stderr)
        return EXIT_ERROR
    if as_json:
        summary = {"run_id": status.run_id, "state": status.state, "method": status.method, "task": status.task,
                   "steps": status.step, "final": status.final, "timings": status.timings,
                   "run_dir": str(run_dir), "backbone": status.backbone, "resumed_from": status.resumed_from}  # fmt: skip
        print(json.dumps(summary, indent=1))
    else:
        final = " ".join(f"{k}={_fmt(v)}" for k, v in status.final.items())
        secs = status.timings.get("total_s")
        print(f"run {status.run_id} done: {final} steps={status.step}" + (f" time={secs:.1f}s" if secs else ""))
        print(f"saved in {run_dir}")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    """Re-queue an interrupted / cancelled / failed run from its checkpoint_last and follow it."""
    from toast_core.runs import RunManager

    _limit_threads(args.threads)
    backbone = backbone_from_spec(args.backbone, args.weights, args.device)
    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    manager = RunManager(runs_dir, backbone, cpu_workers=1, gpu_workers_per_device=1, cpu_threads=args.threads)
    try:
        manager.resume(args.run)
        if not args.quiet:
            print(f"resuming run {args.run}: {manager.status(args.run, history=False).note}", file=sys.stderr)
        status = follow_run(manager, args.run, quiet=args.quiet)
    except KeyboardInterrupt:
        manager.cancel(args.run)
        status = manager.wait(args.run, timeout=120)
        print(f"{status.state} run {args.run} at step {status.step} (resume it again later)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        manager.shutdown(cancel=True, wait=True, timeout=120)
    return report_run(status, runs_dir / args.run, args.json)


def cmd_export(args: argparse.Namespace) -> int:
    from toast_core.core.backbone import BackboneError
    from toast_core.runs.registry import find_run
    from toast_core.storage.bundles import bundle_members, export_bundle

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
    from toast_core.storage.bundles import import_bundle

    backbone = backbone_from_spec(args.backbone, args.weights, "cpu")
    root = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    run_id = import_bundle(args.bundle, root, backbone)
    print(f"imported run {run_id} into {root}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from toast_core.runs.registry import (
        list_runs,  # the registry's reader: a dead owner's run reads interrupted
    )

    roots = registry_roots(args.runs_dir)
    rows = []
    for i, root in enumerate(roots):
        for r in list_runs(root):
            final = r.final or {}
            rows.append({"id": r.run_id, "method": r.method, "task": r.task, "state": r.state,
                         "steps": r.step, "val_acc": final.get("val_acc"), "train_acc": final.get("train_acc"),
                         "name": r.name, "registry": str(root), "shipped": i > 0})
    zoo = [] if args.no_zoo else _zoo_rows()
    if args.json:
        print(json.dumps(rows + (zoo if args.with_zoo else []), indent=1))
        return EXIT_OK
    if not rows:
        print(f"no runs in {', '.join(str(r) for r in roots)}")
    else:
        print(_table(rows, ["id", "method", "task", "state", "steps", "val_acc", "train_acc"]))
    if zoo:
        print(f"\nshipped lecture zoo (read-only, {len(zoo)} modules; compare with their ids):")
        print(_table(zoo, ["id", "method", "task", "state", "steps", "val_acc", "test_acc"]))
    return EXIT_OK


def _zoo_rows() -> list[dict[str, Any]]:
    """The shipped lecture zoo as list rows (state "shipped"; the zoo is never written to)."""
    from toast_core.training.zoo.catalog import zoo_entries

    return [{"id": e.key, "method": e.method, "task": e.task, "state": "shipped",
             "steps": (e.zoo.get("recipe") or {}).get("steps"), "val_acc": (e.zoo.get("val") or {}).get("acc"),
             "test_acc": e.test.get("acc"), "name": e.entry, "registry": str(e.card_path.parent), "shipped": True}
            for e in zoo_entries()]


def add_parsers(sub: Any) -> None:
    """The `export`, `import`, `list` and `resume` subcommands."""
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
    p.add_argument("--no-zoo", action="store_true", help="leave out the shipped lecture zoo")
    p.add_argument("--with-zoo", action="store_true", help="with --json: also the zoo's modules (state 'shipped')")
    _add_runs_dir(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("resume", help="continue an interrupted, cancelled or failed run from its last checkpoint",
                       description="Re-queue a run of the registry (interrupted, cancelled or failed) from its "
                       "checkpoint_last (step 0 when there is none) with the remaining steps, and follow it "
                       "like train does. The backbone must be the run's (same weights hash).")
    p.add_argument("run", help="run id in the registry (see `list`)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_runs_dir(p)
    _add_backbone_args(p)
    p.set_defaults(func=cmd_resume)
