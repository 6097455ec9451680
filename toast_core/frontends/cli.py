"""`python -m toast_core <command>`: the library without the app — train, eval, compare, bench,
export, import, list, resume, zoo.

This module holds the entry (parser, errors, exit codes), `train` and `bench`; `cli_views` holds
eval / compare, `cli_runs` the registry commands, `cli_common` what they share, `zoo.cli` the zoo.

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

from toast_core.frontends import cli_runs, cli_views
from toast_core.frontends.cli_common import (
    BENCH_DIR,
    DEBUG_ENV,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    REPO_ROOT,
    UsageError,
    _add_backbone_args,
    _add_runs_dir,
    _fmt,
    _limit_threads,
    _method_settings,
    backbone_from_spec,
    default_runs_dir,
)


# --- train ---------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from toast_core.methods import method_names
    from toast_core.runs import RunConfig, RunManager

    if args.method not in method_names():
        raise UsageError(f"unknown method '{args.method}'; methods: {', '.join(method_names())}.")
    from toast_core.training.recipes import run_defaults

    defaults = run_defaults(args.task, args.method)
    for name in ("per_class", "val_per_class", "steps", "batch_size", "lr", "weight_decay", "warmup_steps"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if defaults["recipe"] and not args.quiet:
        print(f"lecture recipe '{defaults['recipe']}' for {args.task}: {args.steps} steps x {args.batch_size}, "
              f"lr {args.lr:g}, {args.per_class} images per class", file=sys.stderr)
    train = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps, "eval_every": args.eval_every}
    train.update(defaults["recipe_train"])
    config = RunConfig(
        method=args.method, task=args.task, method_config=_method_settings(args.set), name=args.name,
        per_class=args.per_class, val_per_class=args.val_per_class, train=train, device=args.device,
        seed=args.seed, data_seed=args.data_seed, snapshot_every=args.snapshot_every, checkpoint_every=args.checkpoint_every,
    )
    if args.run_config:  # a launcher's exact RunConfig (toast_core.runs.torchrun.launch)
        config = RunConfig.from_dict(json.loads(Path(args.run_config).read_text()))
    from toast_core.runs import torchrun

    world = torchrun.join(config)  # under torchrun: rank 0 records the run, the other ranks follow it
    _limit_threads(args.threads)
    backbone = backbone_from_spec(args.backbone, args.weights, config.device)
    if world is not None and not world.is_main:
        from toast_core.runs.follower import follow

        follow(config, backbone, config.device, args.threads)
        return EXIT_OK
    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    manager = RunManager(runs_dir, backbone, cpu_workers=1, gpu_workers_per_device=1, cpu_threads=args.threads)
    run_id = None
    try:
        run_id = manager.submit(config)
        torchrun.write_run_id(args.run_id_file, run_id)
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
            why = f": {status.error}" if status.state == "failed" else " (resume it in the app's Tuning Lab)"
            print(f"{status.state} run {run_id} at step {status.step}{why}", file=sys.stderr)
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
    # data and budget default to the lecture recipe on a built-in task (toast_core.training.recipes.run_defaults)
    p.add_argument("--per-class", type=int, default=None, help="training images per class (default: the recipe's, else 50)")
    p.add_argument("--val-per-class", type=int, default=None, help="validation images per class (default: recipe 20, else 10; 0 = none)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the recipe's, else 100)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the recipe's, else 32)")
    p.add_argument("--lr", type=float, default=None, help="(default: the recipe's, else 1e-3)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
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
    p.add_argument("--run-id-file", default=None, help=argparse.SUPPRESS)  # a torchrun launcher learns the id here
    p.add_argument("--run-config", default=None, help=argparse.SUPPRESS)  # ... and hands over its exact RunConfig
    _add_runs_dir(p)
    _add_backbone_args(p)
    p.set_defaults(func=cmd_train)

    cli_views.add_parsers(sub)  # eval, compare

    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (arguments after --)",
                       description="Run benchmarks/<NAME>.py with this Python; arguments after '--' go to the "
                       "script, e.g. `python -m toast_core bench methods_small -- --smoke`.")
    p.add_argument("name", nargs="?", help="benchmark name (see --list)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark, after --")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.set_defaults(func=cmd_bench)

    cli_runs.add_parsers(sub)  # export, import, list, resume

    from toast_core.training.zoo import cli as zoo_cli

    zoo_cli.add_parser(sub)
    sub.choices["zoo"].set_defaults(func=zoo_cli.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user: one line, no traceback."""
    from toast_core.core.backbone import BackboneError
    from toast_core.data.images import ImageInputError
    from toast_core.data.zip_import import ZipImportError
    from toast_core.runs import RunError
    from toast_core.storage.bundles import BundleError
    from toast_core.storage.checkpoints import CheckpointError
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
