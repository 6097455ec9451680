"""What the Gradio demo computes, apart from its widgets: the shared `DemoContext` (backbone, loaded
modules, run manager, one per demo), the comparison behind the Explorer tab and the API endpoint,
and the tuning tab's run.

Heavy objects live in the context, shared by all sessions and keyed by ids; `gr.State` holds only a
session's run ids (strings), so Gradio never deep-copies a model per session.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from toast_core.core.backbone import Backbone
    from toast_core.methods.base import SteeringMethod
    from toast_core.runs import RunManager

MAX_TUNE_STEPS = 300
MAX_TUNE_PER_CLASS = 50
MAX_IMAGE_MB = 20
MODULE_CACHE_SIZE = 32
OUTPUT_TTL_S = 600  # a request's PNGs are removed this long after it (Gradio copies them first)
TABLE_HEADERS = ["module", "prediction", "confidence", "focus share", "area share", "focus ratio", "peak inside",
                 "MoRF AUC", "LeRF − MoRF", "note"]
FAITH_STEPS = 10  # deletion steps per curve for the table's faithfulness columns (two forwards a step)


class DemoContext:
    """What every session shares: the frozen backbone, a cache of loaded modules, the run manager."""

    def __init__(
        self,
        backbone: Backbone,
        runs_dir: str | Path,
        shipped_runs: Sequence[str | Path] = (),
        module_dirs: Sequence[str | Path] = (),
        cpu_threads: int | None = None,
    ):
        self.backbone = backbone
        self.runs_dir = Path(runs_dir)
        self.roots = [self.runs_dir, *(Path(p) for p in shipped_runs if Path(p).resolve() != self.runs_dir.resolve())]
        self.module_dirs = [Path(p) for p in module_dirs]
        self.cpu_threads = cpu_threads
        self._modules: OrderedDict[tuple[str, float], SteeringMethod] = OrderedDict()
        self._lock = threading.Lock()
        self._manager: RunManager | None = None
        self._outputs: Path | None = None

    # --- modules ------------------------------------------------------------------------------
    def choices(self) -> list[tuple[str, str]]:
        from toast_core.views.compare import module_choices

        return module_choices(self.backbone, self.roots, self.module_dirs)

    def _stamp(self, ref: str) -> float:
        """Changes when the module on disk changes (a re-trained or re-imported run), so the cache reloads."""
        from toast_core.runs import RunError
        from toast_core.runs.registry import find_run
        from toast_core.storage.checkpoints import paths_for

        try:
            card = find_run(ref, self.roots) / "module.json"
        except RunError:
            card = paths_for(ref)[1]
        try:
            return card.stat().st_mtime
        except OSError:
            return 0.0

    def module(self, ref: str) -> SteeringMethod:
        """A loaded module by reference (see `compare.load_module_ref`), cached (LRU) across sessions."""
        from toast_core.views.compare import BASE_KEY, load_module_ref

        key = (ref, 0.0 if ref == BASE_KEY else self._stamp(ref))
        with self._lock:
            if key in self._modules:
                self._modules.move_to_end(key)
                return self._modules[key]
        method = load_module_ref(ref, self.backbone, self.roots)
        with self._lock:
            self._modules[key] = method
            while len(self._modules) > MODULE_CACHE_SIZE:
                self._modules.popitem(last=False)
        return method

    # --- runs ---------------------------------------------------------------------------------
    def manager(self) -> RunManager:
        """The run manager for the writable registry, started on the first tuning request."""
        from toast_core.runs import RunManager

        with self._lock:
            if self._manager is None:
                self._manager = RunManager(self.runs_dir, self.backbone, cpu_workers=1, gpu_workers_per_device=1,
                                           cpu_threads=self.cpu_threads)
            return self._manager

    # --- output files -------------------------------------------------------------------------
    def output_pngs(self, images: Sequence[np.ndarray | Any]) -> list[str]:
        """One request's images as PNG files named for this request alone. Returned as arrays, Gradio
        writes identical outputs of concurrent requests to ONE content-addressed cache file, rewriting
        it in place each time, so a client still downloading it got a truncated body under load
        (benchmarks/load.py); a file path is copied into that cache once, under its own name."""
        from PIL import Image

        with self._lock:
            if self._outputs is None:
                self._outputs = Path(tempfile.mkdtemp(prefix="toast-demo-outputs-"))
            outputs = self._outputs
        now = time.time()
        for old in outputs.iterdir():
            try:
                if now - old.stat().st_mtime > OUTPUT_TTL_S:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass  # another request removed it
        folder = Path(tempfile.mkdtemp(dir=outputs))
        paths = []
        for i, image in enumerate(images):
            path = folder / f"{folder.name}-{i}.png"
            (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).save(path, format="PNG")
            paths.append(str(path))
        return paths

    def close(self) -> None:
        with self._lock:
            manager, self._manager = self._manager, None
            outputs, self._outputs = self._outputs, None
        if manager is not None:
            manager.shutdown(cancel=True, wait=True, timeout=30)
        if outputs is not None:
            shutil.rmtree(outputs, ignore_errors=True)


# --- the comparison (also the API endpoint) ---------------------------------------------------------
def _box(values: Sequence[Any]) -> tuple[float, float, float, float] | None:
    """Four numbers, or None when the box is left empty; a partial or empty-area box is an error."""
    given = [v for v in values if v is not None and v != ""]
    if not given:
        return None
    if len(given) != 4:
        raise ValueError("Give all four box numbers (x0, y0, x1, y1) or none.")
    x0, y0, x1, y1 = (float(v) for v in given)
    if x0 == x1 or y0 == y1:
        raise ValueError("The box has no area (x0 = x1 or y0 = y1).")
    return x0, y0, x1, y1


def run_comparison(
    ctx: DemoContext,
    image_path: str | None,
    refs: Sequence[str] | str | None,
    view: str = "cls",
    layer: float = -1,
    head: str = "mean",
    x0: float | None = None,
    y0: float | None = None,
    x1: float | None = None,
    y1: float | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> tuple[list[tuple[np.ndarray, str]], list[list[Any]], Any, str]:
    """(gallery of overlays, table rows, composed figure, note) for one image and several modules.
    User mistakes raise ValueError (the UI shows them via gr.Error)."""
    from toast_core.data.images import load_image
    from toast_core.views.compare import (
        ImageInput,
        check_view_args,
        compare_runs,
        comparison_image,
        focus_rows,
        overlay_tiles,
        prediction_row,
    )

    if not image_path:
        raise ValueError("Upload an image or pick an example first.")
    refs = [refs] if isinstance(refs, str) else list(refs or [])
    if not refs:
        raise ValueError("Choose at least one module to compare.")
    head_value = check_view_args(ctx.backbone, view, int(layer), head)
    image = ImageInput(load_image(Path(image_path), max_bytes=MAX_IMAGE_MB * 1024 * 1024), Path(image_path).name)
    box = _box((x0, y0, x1, y1))
    modules = {ref: ctx.module(ref) for ref in dict.fromkeys(refs)}
    results = compare_runs(ctx.backbone, modules, image, view, int(layer), head_value)
    usable = [r for r in results if r.view is not None]
    tiles = overlay_tiles(image, usable, alpha=float(alpha), cmap=cmap, box=box)
    gallery = [(tile, r.caption()) for tile, r in zip(tiles, usable)]
    scores = {row["module"]: row for row in focus_rows(usable, box, image.size)} if box else {}
    faith = _faithfulness(ctx, modules, usable, image.rgb)
    table = []
    for r in results:
        row = {**prediction_row(r), **scores.get(r.label, {}), **faith.get(r.key, {})}
        table.append([
            r.label, row["prediction"] if r.view is not None else "", row["confidence"],
            row.get("focus_share"), row.get("area_share"), row.get("focus_ratio"), row.get("pointing_game"),
            row.get("morf_auc"), row.get("gap"), r.error or "",
        ])
    figure = comparison_image(image, results, alpha=float(alpha), cmap=cmap, box=box) if usable else None
    h, w = image.size
    note = f"Image {w}×{h} px (box coordinates are in these pixels); one colour scale for all maps."
    if not box:
        note += " Give a box to score focus."
    return gallery, table, figure, note


def _faithfulness(
    ctx: DemoContext, modules: dict[str, SteeringMethod], usable: Sequence[Any], rgb: np.ndarray
) -> dict[str, dict[str, float]]:
    """MoRF / LeRF deletion AUCs of each shown map (token deletion, FAITH_STEPS steps), by module ref;
    none for a base without a trained head (its prediction means nothing)."""
    from toast_core.views import deletion_curves
    from toast_core.views.compare import model_input

    x = model_input(ctx.backbone, rgb)
    return {
        r.key: deletion_curves(modules[r.key], x, r.view.map, steps=FAITH_STEPS, orders=("morf", "lerf")).summary()
        for r in usable
        if not (r.is_base and not r.class_names)
    }


# --- tuning ----------------------------------------------------------------------------------------
def run_tuning(
    ctx: DemoContext, method: str, task: str, steps: float, per_class: float, lr: float, batch_size: float,
    progress: Any = None, seed: float = 0,
) -> tuple[str, dict[str, Any]]:
    """Train one short run through the run manager, reporting progress; returns (run id, status summary).
    The seed fixes the module's initialisation and the training order (same seed, same numbers)."""
    from toast_core.runs import RunConfig

    steps, per_class, batch_size = int(steps), int(per_class), int(batch_size)
    if seed is None or float(seed) != int(float(seed)):
        raise ValueError(f"The seed must be a whole number, got {seed!r}.")
    if not 1 <= steps <= MAX_TUNE_STEPS:
        raise ValueError(f"Steps must be between 1 and {MAX_TUNE_STEPS} in this demo.")
    if not 1 <= per_class <= MAX_TUNE_PER_CLASS:
        raise ValueError(f"Images per class must be between 1 and {MAX_TUNE_PER_CLASS} in this demo.")
    config = RunConfig(
        method=method, task=task, per_class=per_class, val_per_class=max(1, per_class // 4),
        train={"steps": steps, "batch_size": batch_size, "lr": float(lr)}, name=f"{method} on {task} (demo)",
        snapshot_every=0, checkpoint_every=0, seed=int(float(seed)),
    )
    manager = ctx.manager()
    run_id = manager.submit(config)
    while True:
        try:
            status = manager.wait(run_id, timeout=0.5)
            break
        except TimeoutError:
            status = manager.status(run_id, history=False)
            if progress is not None:
                desc = "waiting for a free worker" if status.state == "queued" else f"training {status.name}"
                progress((status.step, max(1, status.total)), desc=desc, unit="steps")
    return run_id, {"state": status.state, "step": status.step, "final": status.final, "error": status.error,
                    "seconds": status.timings.get("total_s"), "name": status.name}


def _tuning_markdown(run_id: str, summary: dict[str, Any]) -> str:
    if summary["state"] != "done":
        return f"**Run `{run_id}` {summary['state']}**: {summary.get('error') or 'stopped before the end'}"
    final = summary["final"]
    parts = [f"{k.replace('_', ' ')} {v:.3f}" for k, v in final.items() if isinstance(v, int | float)]
    secs = summary.get("seconds")
    return (f"**{summary['name']}** done in {summary['step']} steps" + (f" ({secs:.1f} s)" if secs else "")
            + f": {', '.join(parts)}. Run id `{run_id}`; it is now in the Explorer's module list.")
