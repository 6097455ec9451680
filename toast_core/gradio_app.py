"""The Gradio demo (Hugging Face Spaces): the Explorer's core plus a small tuning tab, CPU-friendly.

    python -m toast_core.gradio_app [--port 7860] [--backbone embedded] [--runs-dir runs]

Explorer: an uploaded or example image, any shipped or trained modules, one attention view side by
side on ONE shared colour scale, predictions, and focus scores for a box given as numbers. The
comparison is also a named API endpoint (`api_name="compare"`) for `gradio_client`.
Tuning: a short training run through the run manager, with progress; the new run joins the
Explorer's choices.

Heavy objects (backbone, loaded modules, the run manager) live in one `DemoContext` per demo,
shared by all sessions and keyed by ids; `gr.State` holds only this session's run ids (strings),
so Gradio never deep-copies a model per session. Everything is computed by the library
(`compare.py` → `views/` / `viz.py`, `runs.py`, `checkpoints.py`); this file is widgets.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toast_core.cli_common import (
    BACKBONE_HELP,
    SHIPPED_MODULES,
    SHIPPED_RUNS,
    UsageError,
    backbone_from_spec,
    default_runs_dir,
)

if TYPE_CHECKING:
    import gradio as gr

    from toast_core.backbone import Backbone
    from toast_core.methods.base import SteeringMethod
    from toast_core.runs import RunManager

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "assets" / "examples"
#: example scenes written by `--write-examples` (the lecture presets' scenes)
EXAMPLE_SCENES: tuple[tuple[str, str, int], ...] = (
    ("stars", "test", 3), ("stars", "test", 11), ("glyphs", "test", 5), ("glyphs", "test", 7),
)
EXAMPLE_SIZE = 192
DEFAULT_CONCURRENCY = 2
MAX_TUNE_STEPS = 300
MAX_TUNE_PER_CLASS = 50
MAX_IMAGE_MB = 20
MODULE_CACHE_SIZE = 32
OUTPUT_TTL_S = 600  # a request's PNGs are removed this long after it (Gradio copies them first)
VIEW_CHOICES: tuple[tuple[str, str], ...] = (
    ("CLS attention", "cls"),
    ("Attention rollout", "rollout"),
    ("Gradient rollout (FORT)", "grad_rollout"),
    ("Grad-CAM", "gradcam"),
    ("Class relevance (Chefer 2021)", "relevance"),
    ("TOAST pass 1 (unsteered)", "toast_pass1"),
    ("TOAST pass 2 (steered)", "toast_pass2"),
    ("TOAST selection mask", "selection"),
)
TABLE_HEADERS = ["module", "prediction", "confidence", "focus share", "area share", "focus ratio", "peak inside",
                 "MoRF AUC", "LeRF − MoRF", "note"]
FAITH_STEPS = 10  # deletion steps per curve for the table's faithfulness columns (two forwards a step)
COLOUR_MAPS = ("jet", "inferno", "viridis", "magma", "turbo", "hot")
LOG = logging.getLogger("toast_core.gradio_app")


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
        from toast_core.compare import module_choices

        return module_choices(self.backbone, self.roots, self.module_dirs)

    def _stamp(self, ref: str) -> float:
        """Changes when the module on disk changes (a re-trained or re-imported run), so the cache reloads."""
        from toast_core.checkpoints import paths_for
        from toast_core.runs import RunError
        from toast_core.runs.registry import find_run

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
        from toast_core.compare import BASE_KEY, load_module_ref

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
    from toast_core.compare import (
        ImageInput,
        check_view_args,
        compare_runs,
        comparison_image,
        focus_rows,
        overlay_tiles,
        prediction_row,
    )
    from toast_core.data.images import load_image

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
    from toast_core.compare import model_input
    from toast_core.views import deletion_curves

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


# --- the UI ------------------------------------------------------------------------------------------
def example_images(folder: Path = EXAMPLES_DIR) -> list[str]:
    return [str(p) for p in sorted(folder.glob("*.png"))] if folder.is_dir() else []


def write_examples(folder: Path = EXAMPLES_DIR, size: int = EXAMPLE_SIZE) -> list[Path]:
    """Render the example scenes (built-in test scenes used by the lecture presets) as PNG files."""
    from PIL import Image

    from toast_core.compare import scene_image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for task, split, index in EXAMPLE_SCENES:
        image = scene_image(task, split, index, size)
        path = folder / f"{task}_{split}_{index}.png"
        Image.fromarray(image.rgb).save(path, format="PNG")
        out.append(path)
    return out


def _user_error(exc: Exception, action: str = "request") -> Exception:
    """The library's message as a Gradio error shown in the page, logged as one line: a refused upload
    is the user's mistake, not the server's, so no traceback (gr.Error prints one by default)."""
    import gradio as gr

    message = " ".join(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).split())
    LOG.warning("%s refused (%s): %s", action, type(exc).__name__, message)
    return gr.Error(message, print_exception=False)


def _expected_errors() -> tuple[type[Exception], ...]:
    from toast_core.checkpoints import CheckpointError
    from toast_core.data.images import ImageInputError
    from toast_core.runs import RunError
    from toast_core.views import ViewUnavailable

    return (ValueError, KeyError, CheckpointError, ImageInputError, RunError, ViewUnavailable)


def first_view_refs(backbone: Any, task: str = "stars") -> list[str]:
    """What the demo compares on first open: the base backbone and six zoo modules of `task` (the
    built-in example scenes are of that task), or the base alone where no zoo fits the backbone."""
    from toast_core.compare import BASE_KEY
    from toast_core.zoo.catalog import first_view

    return [BASE_KEY, *(e.key for e in first_view(backbone, task)[:6])]


def build_demo(ctx: DemoContext, examples: Sequence[str] | None = None) -> gr.Blocks:
    """The Blocks app for one context (one backbone and registry)."""
    import gradio as gr

    from toast_core.compare import BASE_KEY
    from toast_core.data.scenes import TASKS
    from toast_core.methods import method_names

    layout = ctx.backbone.layout
    fixture = ctx.backbone.source == "fixture"
    examples = example_images() if examples is None else list(examples)
    errors = _expected_errors()

    def compare_fn(image, refs, view, layer, head, x0, y0, x1, y1, alpha, cmap):
        try:
            gallery, table, figure, note = run_comparison(ctx, image, refs, view, layer, head, x0, y0, x1, y1, alpha, cmap)
        except errors as exc:
            raise _user_error(exc, "compare") from exc
        paths = ctx.output_pngs([tile for tile, _ in gallery] + ([figure] if figure is not None else []))
        tiles = [(path, caption) for path, (_, caption) in zip(paths, gallery)]
        return tiles, table, paths[-1] if figure is not None else None, note

    def refresh_fn(selected):
        choices = ctx.choices()
        values = {v for _, v in choices}
        keep = [s for s in (selected or []) if s in values] or [BASE_KEY]
        return gr.update(choices=choices, value=keep)

    def tune_fn(method, task, steps, per_class, lr, batch_size, session_runs, seed=0, progress=gr.Progress()):
        try:
            run_id, summary = run_tuning(ctx, method, task, steps, per_class, lr, batch_size, progress, seed)
        except errors as exc:
            raise _user_error(exc, "tune") from exc
        runs = [*(session_runs or []), run_id]
        choices = ctx.choices()
        value = [BASE_KEY] + ([run_id] if summary["state"] == "done" else [])
        return _tuning_markdown(run_id, summary), gr.update(choices=choices, value=value), runs

    def cancel_fn(session_runs):
        if not session_runs:
            return "No run of yours to cancel."
        manager = ctx.manager()
        for run_id in reversed(session_runs):
            if manager.cancel(run_id):
                return f"Cancelling run `{run_id}` (it stops before its next step)."
        return "Your runs have all finished."

    with gr.Blocks(title="Attention Steering Lab", analytics_enabled=False) as demo:
        session_runs = gr.State([])
        gr.Markdown(
            "# Attention Steering Lab\nWhere does a steered ViT look? Compare the attention of the frozen "
            "backbone and of small steering modules (linear probe, LoRA, VPT, TOAST, …) on one image, on one "
            f"shared colour scale. Backbone: **{ctx.backbone.name}** ({layout.img_size[0]} px, patch "
            f"{layout.patch_size[0]}, {layout.depth} blocks × {layout.num_heads} heads)."
            + ("\n\n**Test fixture backbone with random weights: maps and predictions mean nothing.**" if fixture else "")
        )
        with gr.Tab("Explorer"):
            with gr.Row():
                with gr.Column(scale=1):
                    # a plain file, not gr.Image: Gradio's image preprocessing would decode the upload
                    # itself (and fail with its own generic error on an empty, text or bomb file);
                    # run_comparison hands the file to the library's safe decoder instead
                    image = gr.File(type="filepath", file_count="single", label=f"Image (PNG, JPEG, …; up to {MAX_IMAGE_MB} MB)")
                    if examples:
                        gr.Examples(examples=[[p] for p in examples], inputs=[image], label="Built-in scenes")
                    modules = gr.Dropdown(choices=ctx.choices(), value=first_view_refs(ctx.backbone), multiselect=True,
                                          allow_custom_value=True, label="Modules (base = frozen backbone)")
                    refresh = gr.Button("Refresh module list", size="sm")
                    with gr.Row():
                        view = gr.Dropdown(choices=list(VIEW_CHOICES), value="cls", label="View")
                        layer = gr.Slider(-1, layout.depth - 1, value=-1, step=1, label="Layer (-1 = last; CLS/TOAST views)")
                        head = gr.Dropdown(choices=["mean", *(str(h) for h in range(layout.num_heads))], value="mean", label="Head")
                    with gr.Accordion("Focus box (image pixels) and display", open=False):
                        with gr.Row():
                            x0, y0 = gr.Number(label="x0", value=None), gr.Number(label="y0", value=None)
                            x1, y1 = gr.Number(label="x1", value=None), gr.Number(label="y1", value=None)
                        with gr.Row():
                            alpha = gr.Slider(0.1, 0.9, value=0.5, step=0.05, label="Overlay opacity")
                            cmap = gr.Dropdown(choices=list(COLOUR_MAPS), value="jet", label="Colour map")
                    go = gr.Button("Compare", variant="primary")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Attention (shared colour scale)", columns=3, fit_columns=False,
                                         object_fit="contain", format="png", height="auto")
                    table = gr.Dataframe(headers=TABLE_HEADERS, label="Predictions and focus", interactive=False)
                    figure = gr.Image(type="pil", format="png", label="Comparison figure (download for slides)", interactive=False)
                    note = gr.Markdown()
            go.click(compare_fn, [image, modules, view, layer, head, x0, y0, x1, y1, alpha, cmap],
                     [gallery, table, figure, note], api_name="compare")
            refresh.click(refresh_fn, [modules], [modules], api_name="refresh_modules")
        with gr.Tab("Tuning"):
            gr.Markdown(f"Train a steering module for a few steps on a built-in task (CPU is fine; at most "
                        f"{MAX_TUNE_STEPS} steps here). The run lands in the registry and in the Explorer's list.")
            with gr.Row():
                t_method = gr.Dropdown(choices=method_names(), value="linear" if "linear" in method_names() else None, label="Method")
                t_task = gr.Dropdown(choices=list(TASKS), value=next(iter(TASKS)), label="Task")
            with gr.Row():
                t_steps = gr.Slider(1, MAX_TUNE_STEPS, value=30, step=1, label="Steps")
                t_per_class = gr.Slider(1, MAX_TUNE_PER_CLASS, value=8, step=1, label="Training images per class")
                t_batch = gr.Slider(2, 64, value=16, step=1, label="Batch size")
                t_lr = gr.Number(value=1e-3, label="Learning rate")
                t_seed = gr.Number(value=0, precision=0, label="Seed")
            with gr.Row():
                t_go = gr.Button("Train", variant="primary")
                t_cancel = gr.Button("Cancel my run")
            t_out = gr.Markdown()
            t_go.click(tune_fn, [t_method, t_task, t_steps, t_per_class, t_lr, t_batch, session_runs, t_seed],
                       [t_out, modules, session_runs], api_name="tune", concurrency_limit=1)
            t_cancel.click(cancel_fn, [session_runs], [t_out], api_name="cancel")
        demo.load(refresh_fn, [modules], [modules], api_visibility="private")
    demo.queue(default_concurrency_limit=DEFAULT_CONCURRENCY, max_size=64)
    return demo


def _warm_server_imports() -> None:
    """Import what uvicorn imports when its server thread starts: Gradio gives that thread 5 s to
    come up, which a busy machine can miss if the imports happen inside it."""
    import importlib

    for name in ("uvicorn.loops.auto", "uvicorn.loops.asyncio", "uvicorn.protocols.http.auto",
                 "uvicorn.protocols.http.h11_impl", "uvicorn.protocols.websockets.auto", "uvicorn.lifespan.on"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def launch(
    demo: gr.Blocks, port: int | None = None, host: str = "127.0.0.1", block: bool = True, quiet: bool = False
) -> Any:
    """Start the server (no SSR node process, uploads capped at MAX_IMAGE_MB)."""
    _warm_server_imports()
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet,
                       max_file_size=f"{MAX_IMAGE_MB}mb", ssr_mode=False, show_error=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m toast_core.gradio_app",
                                description="Gradio demo of the Attention Steering Lab (Hugging Face Spaces).")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to listen on (0.0.0.0 on Spaces / in containers)")
    p.add_argument("--backbone", default=os.environ.get("TOAST_LAB_BACKBONE", "embedded") or "embedded", metavar="SPEC", help=BACKBONE_HELP)
    p.add_argument("--weights", default=None, metavar="FILE")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs-dir", default=None, help="writable run registry (default: $TOAST_LAB_RUNS_DIR or <repo>/runs)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--write-examples", action="store_true", help=f"(re)write the example scenes into {EXAMPLES_DIR} and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own health checks, one line each
    if args.write_examples:
        for path in write_examples():
            print(path)
        return 0
    from toast_core.backbone import BackboneError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        backbone = backbone_from_spec(args.backbone, args.weights, args.device)
    except (BackboneError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ctx = DemoContext(backbone, args.runs_dir or default_runs_dir(), [SHIPPED_RUNS], [SHIPPED_MODULES], args.threads)
    demo = build_demo(ctx)
    try:
        launch(demo, port=args.port, host=args.host, block=True)
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
