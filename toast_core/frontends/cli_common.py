"""What every `python -m toast_core` command shares: exit codes, paths, the backbone spec, the
registry roots, argument helpers and table formatting. Imports nothing heavy (so `--help` is quick)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toast_core.core.backbone import Backbone

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
REPO_ROOT = Path(__file__).resolve().parents[2]
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
    from toast_core.core.backbone import load_backbone, tiny_fixture_backbone

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
