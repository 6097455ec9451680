"""`python -m toast_core zoo build|verify|reproduce|list` — the zoo's command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from toast_core.training.zoo.build import ZOO_DIR


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="the lecture zoo: build (train every entry from its recipe), verify, reproduce, list")
    p.add_argument("action", choices=("build", "verify", "reproduce", "list"),
                   help="verify: re-score the shipped modules against their cards; reproduce: rebuild entries "
                   "from their seeds elsewhere and compare the cards")
    p.add_argument("--task", action="append", help="built-in task (repeatable; default: all)")
    p.add_argument("--entries", default="", help="comma list of recipe entries (default: the shipped set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the shipped zoo was built so)")
    p.add_argument("--root", type=Path, default=ZOO_DIR, help="zoo folder (default: checkpoints/zoo)")
    p.add_argument("--force", action="store_true", help="retrain entries whose card is current")
    p.add_argument("--smoke", action="store_true", help="fixture backbone, random data (needs --root)")
    p.add_argument("--into", type=Path, default=None,
                   help="reproduce: folder for the rebuilt entries (default: a temporary one, removed after)")
    p.add_argument("--append-results", action="store_true",
                   help="verify: write the zoo's table and the verify line into benchmarks/RESULTS.md")


def run(args: argparse.Namespace) -> int:
    from toast_core.core.backbone import load_backbone, tiny_fixture_backbone
    from toast_core.training.recipes import RECIPES

    backbone = tiny_fixture_backbone() if args.smoke else load_backbone("embedded")
    tasks = args.task or list(RECIPES)
    entries = [e.strip() for e in args.entries.split(",") if e.strip()] or None
    if args.action == "build":
        from toast_core.training.zoo.build import build

        cards = build(tasks, entries, seed=args.seed, threads=args.threads, root=args.root,
                      backbone=backbone, smoke=args.smoke, force=args.force)
        from toast_core.training.zoo.presets import write_presets

        presets = write_presets(backbone, tasks, args.root)
        print(f"lecture presets: {presets}")
        print(f"RESULT built={len(cards)} root={args.root}")
        return 0
    if args.action == "verify":
        from toast_core.training.zoo.verify import result_line, verify

        summary = verify(backbone, args.root)
        line = result_line(summary)
        if args.append_results and not args.smoke:
            from toast_core.training.zoo.report import write_results_section, zoo_rows

            write_results_section(zoo_rows(backbone, args.root), line)
        print(line)
        return 0 if summary["modules"] and summary["max_card_drift"] <= 0.02 else 1
    if args.action == "reproduce":
        from toast_core.training.zoo import reproduce

        summary = reproduce.reproduce(tasks, entries, seed=args.seed, threads=args.threads, root=args.root,
                                      into=args.into, backbone=backbone, smoke=args.smoke)
        print(reproduce.result_line(summary))
        ok = summary["reproduced"] and not summary["missing"] and summary["max_repro_drift"] <= 0.02
        return 0 if ok else 1
    from toast_core.training.zoo.catalog import zoo_entries

    for e in zoo_entries(backbone, args.root):
        t = e.test
        print(f"{e.key:32s} {e.method:14s} test {t.get('acc', float('nan')):.3f} "
              f"[{t.get('acc_lo', float('nan')):.3f}, {t.get('acc_hi', float('nan')):.3f}] n={t.get('n')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m toast_core")
    add_parser(ap.add_subparsers(dest="command", required=True))
    return run(ap.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
