"""Attention Explorer: one image, several steering modules, one view, side by side on one colour scale."""

from __future__ import annotations

import numpy as np
import streamlit as st

from toast_core.data.images import ImageInputError
from toast_core.data.mixed import MIXED_DESCRIPTION, MIXED_TASK
from toast_core.data.scenes import SPLITS, TASKS
from toast_core.frontends import app_state as S
from toast_core.views import compare
from toast_core.views.viz import (
    COLORMAPS,
    box_from_selection,
    box_picker_figure,
    comparison_figure,
    deletion_figure,
    difference_figure,
    layer_head_figure,
)

SOURCES = ("Built-in scene", "Upload an image")


def apply_preset(backbone) -> None:
    """A preset chosen on the home page sets the widgets once, then leaves them to the user."""
    key = st.session_state.pop("explorer_preset", None)
    p = S.preset(key, backbone) if key else None
    if p is None:
        return
    st.session_state.update(
        ex_source=SOURCES[0], ex_task=p.task, ex_split=p.split, ex_index=p.index,
        ex_view=next(label for label, name in S.VIEW_LABELS.items() if name == p.view),
    )
    st.info(f"Preset: **{p.title}**. {p.note}")


def pick_image(size: int) -> S.ImageChoice | None:
    """The image to explore: a built-in scene (with its ground-truth mask) or a safe-decoded upload."""
    source = st.radio("Image", SOURCES, key="ex_source", horizontal=True)
    if source == SOURCES[0]:
        c1, c2 = st.columns(2)
        task = c1.selectbox("Task", [*TASKS, MIXED_TASK], key="ex_task",
                            format_func=lambda t: "mixed: one star + one digit" if t == MIXED_TASK else t)
        mixed = task == MIXED_TASK
        if mixed:  # a test set only: the split is fixed, and the focus region is one of the two objects
            st.session_state["ex_split"] = "test"
        split = c2.selectbox("Split", list(SPLITS), index=2, key="ex_split", disabled=mixed)
        index = st.number_input("Scene index", 0, 9999, 0, key="ex_index")
        focus = st.radio("Focus region", ("star", "digit"), horizontal=True, key="ex_mixed_focus") if mixed else "star"
        st.caption(MIXED_DESCRIPTION if mixed else TASKS[task].description)
        return S.scene_image(task, split, int(index), size, focus)
    # no `type=` filter: the browser would refuse other extensions with Streamlit's own message;
    # every file reaches the library's decoder, which says what is wrong with it
    upload = st.file_uploader(
        f"An image (PNG, JPEG, BMP, GIF, TIFF, WebP; up to {S.MAX_IMAGE_MB} MB)",
        key="ex_upload",
        max_upload_size=S.MAX_IMAGE_MB,
    )
    if upload is None:
        st.info("Upload an image to compare the modules on it.")
        return None
    try:
        return S.decode_upload(upload.getvalue(), upload.name)
    except ImageInputError as exc:
        st.error(f"This upload cannot be used: {exc}")
        return None


def pick_modules(backbone, task: str) -> list[str]:
    """The modules to compare: the base backbone, the lecture zoo's modules for `task` (the first view
    compares six of them), the user's finished runs, shipped checkpoints and other tasks' zoo."""
    manager = S.run_manager()
    done = S.finished_runs(manager, backbone)
    shipped = S.shipped_modules(backbone)
    zoo = S.zoo_modules(backbone)
    # a mixed scene compares each method's stars module with its glyphs module
    this_task = zoo if task == MIXED_TASK else S.zoo_modules(backbone, task)
    options = (
        [S.BASE_KEY] + list(this_task) + [r.run_id for r in done] + list(shipped)
        + [k for k in zoo if k not in this_task]
    )
    labels = {S.BASE_KEY: S.base_module(backbone).label, **zoo, **{r.run_id: S.run_label(r) for r in done}, **shipped}
    first = S.zoo_first_view(backbone, task)[:6]
    default = [S.BASE_KEY, *first] if first else options[: min(6, len(options))]
    if st.session_state.get("ex_modules_task") != task:  # a new task: its zoo modules are the default
        st.session_state["ex_modules_task"] = task
        st.session_state.pop("ex_modules", None)
    chosen = st.multiselect(
        "Modules", options, default=default, format_func=lambda k: labels.get(k, k), key="ex_modules",
        help="The base backbone, the lecture zoo (shipped, read-only: every method trained from its "
        "recipe on this task) and every finished run on this backbone.",
    )
    if not zoo and len(options) == 1 + len(shipped):
        st.caption("Only the base backbone so far: train modules in the Tuning Lab to compare them here.")
    elif task == MIXED_TASK:
        st.caption("Each method's **stars** module beside its **glyphs** module on the same image: does its "
                   "attention move from the star to the digit with the task?")
    elif this_task:
        st.caption(f"Zoo modules were trained on **{task}**; their predictions name {task} classes.")
    return [k for k in chosen if k in labels]


def pick_view(backbone) -> tuple[str, int, str | int]:
    layout = backbone.layout
    c1, c2, c3 = st.columns([2, 2, 1])
    label = c1.selectbox("View", list(S.VIEW_LABELS), key="ex_view")
    view = S.VIEW_LABELS[label]
    layer = c2.slider(
        "Layer", 0, layout.depth - 1, layout.depth - 1, key="ex_layer", disabled=view not in S.LAYERED_VIEWS
    )
    heads: list[str | int] = ["mean", *range(layout.num_heads)]
    head = c3.selectbox("Head", heads, key="ex_head", disabled=view not in S.HEAD_VIEWS)
    return view, int(layer), head


def show_overlays(image: S.ImageChoice, views: list[S.ModuleView], overlays: list[np.ndarray]) -> None:
    """The original image, then each module's overlay, with its prediction underneath."""
    tiles = iter(overlays)
    per_row = 4
    cells = [("image", image.rgb, f"{image.name}" + (f" · true: {image.true_label}" if image.true_label else ""))]
    for mv in views:
        cells.append((mv.label, next(tiles) if mv.view is not None else None, mv.caption()))
    for start in range(0, len(cells), per_row):
        cols = st.columns(per_row)
        for col, (title, tile, caption) in zip(cols, cells[start : start + per_row]):
            with col:
                st.markdown(f"**{title}**")
                if tile is None:
                    st.warning(caption)
                else:
                    st.image(tile, caption=caption, width="stretch")
    st.caption("All overlays share one colour scale (min and max over every map shown).")


def show_difference(views: list[S.ModuleView]) -> None:
    usable = [mv for mv in views if mv.view is not None]
    if len(usable) < 2:
        st.info("Pick at least two modules with a map to see their difference.")
        return
    labels = [mv.label for mv in usable]
    c1, c2 = st.columns(2)
    a = c1.selectbox("A", range(len(usable)), format_func=lambda i: labels[i], key="ex_diff_a")
    b = c2.selectbox("B", range(len(usable)), index=1, format_func=lambda i: labels[i], key="ex_diff_b")
    if a == b:
        st.info("Choose two different modules.")
        return
    diff = S.difference(usable[a], usable[b])
    st.plotly_chart(difference_figure(diff, title=f"{labels[a]} − {labels[b]} (unit mass each)"), key="ex_diff_fig")
    st.caption("Red: A attends more; blue: B attends more.")


def take_drawn_box(image_size: tuple[int, int]) -> None:
    """A box dragged on the picker becomes the typed box (callbacks run before the widgets exist)."""
    box = box_from_selection(st.session_state["ex_box_fig"].selection, image_size)
    if box is not None:
        st.session_state.update(ex_x0=box[0], ex_y0=box[1], ex_x1=box[2], ex_y1=box[3])


def show_focus(image: S.ImageChoice, views: list[S.ModuleView], overlays: list[np.ndarray]) -> None:
    h, w = image.size
    use_mask = image.mask is not None and st.toggle(
        "Use the scene's ground-truth mask (the deciding object)", value=True, key="ex_use_mask"
    )
    if use_mask:
        region = image.mask
        st.caption(f"Region: ground-truth mask, {float(np.mean(image.mask)):.1%} of the image.")
    else:
        st.caption(f"Region: drag a box on the image, or type it in image pixels (the image is {w} × {h}).")
        cols = st.columns(4)
        x0 = cols[0].number_input("x0", 0, w, w // 4, key="ex_x0")
        y0 = cols[1].number_input("y0", 0, h, h // 4, key="ex_y0")
        x1 = cols[2].number_input("x1", 0, w, 3 * w // 4, key="ex_x1")
        y1 = cols[3].number_input("y1", 0, h, 3 * h // 4, key="ex_y1")
        valid = x1 > x0 and y1 > y0
        st.plotly_chart(
            box_picker_figure(image.rgb, (x0, y0, x1, y1) if valid else None),
            key="ex_box_fig", on_select=lambda: take_drawn_box(image.size), selection_mode="box",
            width=340,
        )
        if not valid:
            st.warning("The box is empty: x1 must be greater than x0 and y1 greater than y0.")
            return
        region = (x0, y0, x1, y1)
        st.caption(f"Box ({x0}, {y0})–({x1}, {y1}): {(x1 - x0) * (y1 - y0) / (w * h):.1%} of the image.")
    rows = S.focus_table(views, region, image.size, image.objects if use_mask else None)
    if rows:
        st.dataframe(rows, hide_index=True, width="stretch")
        st.caption("Focus share: attention mass inside the region; a uniform map scores the area share. "
                   "Focus ratio = share / area (1 = chance). A backbone pretrained on objects already "
                   "looks at every object, distractors included; the share of object attention that "
                   "lands on the deciding object, against its chance level, tells \"the right object\" "
                   "from \"any object\".")
        tiles = compare.mark_region(overlays, box=None if use_mask else region, outline=region if use_mask else None)
        st.image(tiles, caption=[mv.label for mv in views if mv.view is not None], width=150)


def show_faithfulness(backbone, image: S.ImageChoice, views: list[S.ModuleView]) -> None:
    """Deletion curves of every module's map, computed when switched on (one forward per step)."""
    st.caption("Does the module use what its map points at? Patches are deleted in the map's order — most "
               "relevant first (MoRF), least relevant first (LeRF), random (the baseline) — and the probability "
               "of the class predicted on the whole image is followed. Faithful: MoRF falls fast (small area) "
               "and LeRF stays high (large area).")
    c1, c2, c3 = st.columns([1, 2, 1])
    steps = c1.number_input("Steps", 2, 50, 20, key="ex_faith_steps")
    mode = c2.radio("Deletion", list(S.DELETION_MODES), key="ex_faith_mode")
    with_random = c3.toggle("Random baseline", value=True, key="ex_faith_random")
    if not st.toggle("Compute the deletion curves", value=False, key="ex_faith_on"):
        return
    with st.spinner("Deleting patches…"):
        pairs = S.module_curves(backbone, views, image, int(steps), S.DELETION_MODES[mode], with_random)
    if not pairs:
        st.info("No module has a map to rank the patches by.")
        return
    st.plotly_chart(deletion_figure([c for _, c in pairs], [mv.label for mv, _ in pairs]), key="ex_faith_fig")
    st.dataframe(S.faithfulness_table(pairs, image), hide_index=True, width="stretch")
    st.caption("AUC: area under the curve over the share deleted (0–1). Focus ratio: the same map's share "
               "on the deciding object over its area — plausibility beside faithfulness. Dropped tokens "
               "leave the sequence; mean-fill shows the model a flat patch it never saw in training.")


def show_export(image: S.ImageChoice, views: list[S.ModuleView], alpha: float, cmap: str, view: str) -> None:
    if not any(mv.view is not None for mv in views):
        return
    # built when clicked, not on every rerun: a large upload's PNG takes seconds and megabytes
    c1, c2 = st.columns(2)
    c1.download_button("Download PNG", lambda: compare.comparison_png_bytes(image, views, alpha=alpha, cmap=cmap),
                       file_name=f"comparison_{view}.png", mime="image/png", key="ex_png")
    c2.download_button("Download CSV (maps)", lambda: S.views_csv_bytes(views),
                       file_name=f"comparison_{view}.csv", mime="text/csv", key="ex_csv")


def main() -> None:
    st.title("Attention Explorer")
    backbone = S.require_backbone()
    apply_preset(backbone)
    size = int(backbone.layout.img_size[0])
    left, right = st.columns([2, 3], gap="large")
    with left:
        image = pick_image(size)
    with right:
        task = st.session_state.get("ex_task") if image is not None and image.mask is not None else None
        if task is None:
            task = st.selectbox("Zoo modules trained on", list(TASKS), key="ex_zoo_task")
        keys = pick_modules(backbone, task)
        view, layer, head = pick_view(backbone)
        with st.expander("Display"):
            alpha = st.slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="ex_alpha")
            cmap = st.selectbox("Colour map", list(COLORMAPS), key="ex_cmap")
    if image is None:
        return
    if not keys:
        st.info("Pick at least one module.")
        return
    with st.spinner("Computing attention…"):
        views = S.module_views(backbone, keys, image, view, layer, head)
    rendered = len([v for v in views if v.view is not None])
    st.session_state["explorer_rendered"] = rendered
    st.caption(f"Compared {rendered} module{'' if rendered == 1 else 's'} on {image.name} · "
               f"{next(k for k, v in S.VIEW_LABELS.items() if v == view)}")

    overlays = compare.overlay_tiles(image, views, alpha, cmap)  # once: two tabs show them
    tabs = st.tabs(["Overlays", "Heat maps", "Difference", "Focus", "Faithfulness", "Layers × heads", "Export"])
    with tabs[0]:
        show_overlays(image, views, overlays)
    with tabs[1]:
        usable = [mv.view for mv in views if mv.view is not None]
        if usable:
            fig = comparison_figure(usable)
            captions = [f"{mv.label}<br>{mv.caption()}" for mv in views if mv.view is not None]
            for annotation, text in zip(fig.layout.annotations, captions):
                annotation.text = text
                annotation.font.size = 12
            fig.update_layout(height=320, margin=dict(l=10, r=10, t=60, b=10))
            st.plotly_chart(fig, key="ex_cmp_fig")
    with tabs[2]:
        show_difference(views)
    with tabs[3]:
        show_focus(image, views, overlays)
    with tabs[4]:
        show_faithfulness(backbone, image, views)
    with tabs[5]:
        labels = {mv.key: mv.label for mv in views}
        key = st.selectbox("Module", list(labels), format_func=lambda k: labels[k], key="ex_grid_module")
        maps, layers = S.cls_grid(backbone, key, image)
        fig = layer_head_figure(maps, layers, title=f"CLS attention of {labels[key]}")
        fig.update_layout(height=140 * len(layers) + 80)
        st.plotly_chart(fig, key="ex_grid_fig")
    with tabs[6]:
        show_export(image, views, alpha, cmap, view)


main()
