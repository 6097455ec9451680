"""The Gradio demo (Hugging Face Spaces): the Explorer's core plus a small tuning tab, CPU-friendly.

    python -m toast_core.frontends.gradio_app [--port 7860] [--backbone embedded] [--runs-dir runs]

Explorer: an uploaded or example image, any shipped or trained modules, one attention view side by
side on ONE shared colour scale, predictions, and focus scores for a box given as numbers. The
comparison is also a named API endpoint (`api_name="compare"`) for `gradio_client`.
Tuning: a short training run through the run manager, with progress; the new run joins the
Explorer's choices.

Heavy objects (backbone, loaded modules, the run manager) live in one `DemoContext` per demo
(`gradio_context.py`, with the comparison and the tuning run), shared by all sessions and keyed by
ids; `gr.State` holds only this session's run ids (strings), so Gradio never deep-copies a model
per session. Everything is computed by the library
(`compare.py` → `views/` / `viz.py`, `runs.py`, `checkpoints.py`); this file is widgets.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toast_core.frontends.cli_common import (
    BACKBONE_HELP,
    SHIPPED_MODULES,
    SHIPPED_RUNS,
    UsageError,
    backbone_from_spec,
    default_runs_dir,
)
from toast_core.frontends.gradio_context import (  # noqa: F401  (FAITH_STEPS, TABLE_HEADERS: re-exported for callers)
    FAITH_STEPS,
    MAX_IMAGE_MB,
    MAX_TUNE_PER_CLASS,
    MAX_TUNE_STEPS,
    TABLE_HEADERS,
    DemoContext,
    _tuning_markdown,
    run_comparison,
    run_tuning,
)

if TYPE_CHECKING:
    import gradio as gr


REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "assets" / "examples"
#: example scenes written by `--write-examples` (the lecture presets' scenes)
EXAMPLE_SCENES: tuple[tuple[str, str, int], ...] = (
    ("stars", "test", 3), ("stars", "test", 11), ("glyphs", "test", 5), ("glyphs", "test", 7),
)
EXAMPLE_SIZE = 192
DEFAULT_CONCURRENCY = 2
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
COLOUR_MAPS = ("jet", "inferno", "viridis", "magma", "turbo", "hot")
LOG = logging.getLogger("toast_core.frontends.gradio_app")


# --- the UI ------------------------------------------------------------------------------------------
def example_images(folder: Path = EXAMPLES_DIR) -> list[str]:
    return [str(p) for p in sorted(folder.glob("*.png"))] if folder.is_dir() else []


def write_examples(folder: Path = EXAMPLES_DIR, size: int = EXAMPLE_SIZE) -> list[Path]:
    """Render the example scenes (built-in test scenes used by the lecture presets) as PNG files."""
    from PIL import Image

    from toast_core.views.compare import scene_image

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
    from toast_core.data.images import ImageInputError
    from toast_core.runs import RunError
    from toast_core.storage.checkpoints import CheckpointError
    from toast_core.views import ViewUnavailable

    return (ValueError, KeyError, CheckpointError, ImageInputError, RunError, ViewUnavailable)


def first_view_refs(backbone: Any, task: str = "stars") -> list[str]:
    """What the demo compares on first open: the base backbone and six zoo modules of `task` (the
    built-in example scenes are of that task), or the base alone where no zoo fits the backbone."""
    from toast_core.training.zoo.catalog import first_view
    from toast_core.views.compare import BASE_KEY

    return [BASE_KEY, *(e.key for e in first_view(backbone, task)[:6])]


def build_demo(ctx: DemoContext, examples: Sequence[str] | None = None) -> gr.Blocks:
    """The Blocks app for one context (one backbone and registry)."""
    import gradio as gr

    from toast_core.data.scenes import TASKS
    from toast_core.methods import method_names
    from toast_core.views.compare import BASE_KEY

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
    p = argparse.ArgumentParser(prog="python -m toast_core.frontends.gradio_app",
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
    from toast_core.core.backbone import BackboneError

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
