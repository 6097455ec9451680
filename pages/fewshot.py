"""Few-shot (FORT): position prompts of a support set, and fine-tuning with vs without them."""

from __future__ import annotations

import numpy as np
import streamlit as st

from toast_core.data.folder import ImageFolderError
from toast_core.data.scenes import TASKS
from toast_core.data.zip_import import ZipImportError
from toast_core.frontends import app_state as S
from toast_core.methods.fort import HEAD_AGGS, PROMPT_WEIGHTS, default_prompt_patches
from toast_core.training.fewshot import EpisodeCache, FewShotConfig, MethodSpec, TunedEpisode, tune_episode
from toast_core.views import compare
from toast_core.views.viz import overlay, overlays

SOURCES = ("Built-in task", "Uploaded zip of class folders")


def pick_episode(size: int):
    source = st.radio("Support set from", SOURCES, key="fs_source", horizontal=True)
    if source == SOURCES[0]:
        task = st.selectbox("Task", list(TASKS), key="fs_task")
        base = task
        n_classes = len(TASKS[task].classes)
    else:
        upload = st.file_uploader(f"A zip with one folder per class (up to {S.MAX_ZIP_MB} MB)", type=["zip"],
                                  key="fs_zip", max_upload_size=S.MAX_ZIP_MB)
        path = st.session_state.get("tl_dataset")
        if upload is not None:
            try:
                path = str(S.import_dataset_zip(upload.getvalue(), upload.name))
                st.session_state["tl_dataset"] = path
            except (ZipImportError, ImageFolderError) as exc:
                st.error(f"This zip cannot be used: {exc}")
                return None, None
        if not path:
            st.info("Upload a zip of class folders (or import one in the Tuning Lab).")
            return None, None
        base = f"folder:{path}"
        n_classes = len(S.dataset_summary(path, size)["classes"])
    cols = st.columns(4)
    n_way = cols[0].number_input("N-way", 2, max(2, n_classes), min(5, n_classes), key="fs_way")
    k_shot = cols[1].number_input("K-shot", 1, 20, 1, key="fs_shot")
    n_query = cols[2].number_input("Queries per class", 1, 30, 2, key="fs_query")
    index = cols[3].number_input("Episode", 0, 10_000, 0, key="fs_index")
    key = f"{base}|{n_way}|{k_shot}|{n_query}|{index}"
    try:
        episode = S.fewshot_episode(base, int(n_way), int(k_shot), int(n_query), int(index), size)
    except (ValueError, ImageFolderError) as exc:
        st.error(f"No episode of that shape: {exc}")
        return None, None
    return episode, key


def rgb(images, i: int) -> np.ndarray:
    return images[i].permute(1, 2, 0).numpy()


def show_prompts(backbone, episode, key: str) -> dict:
    st.subheader("Position prompts")
    st.write("FORT marks each support image's key patches before tuning: gradient-weighted attention rollout "
             "(λ weighs the gradient term), top-P patches, heads aggregated by min (code) or mean (paper).")
    n_patches = backbone.layout.num_patches
    cols = st.columns(4)
    lam = cols[0].slider("λ (gradient weight)", 0.0, 5.0, 1.0, 0.25, key="fs_lam")
    p = cols[1].slider("P (patches per prompt)", 1, n_patches, default_prompt_patches(n_patches), key="fs_p")
    head_agg = cols[2].selectbox("Head aggregation", HEAD_AGGS, key="fs_head_agg")
    weights = cols[3].selectbox("Prompt weights", PROMPT_WEIGHTS, key="fs_weights")
    res = S.position_prompts(backbone, episode, key, lam, p, head_agg, weights)
    support = episode.support
    names = support.class_names
    per_row = 5
    for start in range(0, len(support), per_row):
        row = st.columns(per_row)
        for col, i in zip(row, range(start, min(start + per_row, len(support)))):
            image = rgb(support.images, i)
            imp_tile, prompt_tile = overlays(image, [res["importance"][i], res["prompts"][i]], per_map=True)
            on = res["on_object"]
            with col:
                st.image(image, caption=f"{names[int(support.labels[i])]}", width="stretch")
                st.image(imp_tile, caption="importance", width="stretch")
                st.image(prompt_tile, caption="prompt (top P)" + (f" · {on[i]:.0%} on object" if on is not None else ""),
                         width="stretch")
    if res["on_object"] is not None:
        st.caption(f"Mean share of prompt mass on the deciding object: {float(np.mean(res['on_object'])):.1%} "
                   f"(P = {p} of {n_patches} patches).")
    with st.expander("How λ and head aggregation change the first support image's prompt"):
        image = rgb(support.images, 0)
        cells = []
        for agg in HEAD_AGGS:
            for lam_v in (0.0, lam):
                r = S.position_prompts(backbone, episode, key, lam_v, p, agg, weights)
                cells.append((f"{agg}, λ={lam_v:g}", r["prompts"][0]))
        cols = st.columns(len(cells))
        for col, (title, m) in zip(cols, cells):
            col.image(overlay(image, m / max(float(m.max()), 1e-12)), caption=title, width="stretch")
    return {"lam": lam, "prompt_patches": p, "head_agg": head_agg, "prompt_weights": weights}


def tune_pair(backbone, episode, base: str, steps: int, lr: float, fort: dict) -> list[TunedEpisode]:
    """`base` and `fort_<base>` tuned on the support set as the few-shot benchmark tunes them (ridge
    head init, one shared importance, batch = n_way, constant lr), tuned modules and query attention kept."""
    config = FewShotConfig.for_episode(episode, steps=steps)
    cache = EpisodeCache(backbone, episode, config)
    specs = [MethodSpec(base, base, lr=lr), MethodSpec(f"{base} + FORT", f"fort_{base}", dict(fort), lr=lr)]
    return [tune_episode(backbone, spec, episode, config, cache=cache) for spec in specs]


def show_runs(backbone, episode, key: str, prompt: dict) -> None:
    st.subheader("Fine-tune with and without FORT")
    cols = st.columns(4)
    bases = list(S.FORT_BASES)
    base = cols[0].selectbox("Tuning", bases, key="fs_base")
    steps = cols[1].number_input("Steps", 0, 500, 5 * max(1, len(episode.support) // len(episode.support.class_names)),
                                 key="fs_steps")
    lr = cols[2].number_input("Learning rate", 1e-6, 1.0, S.FORT_BASES[base], format="%g", key=f"fs_lr_{base}")
    from toast_core.methods import config_for

    alpha = cols[3].number_input("α (FORT loss weight)", 0.0, 100.0, float(config_for(f"fort_{base}").fort_alpha),
                                 format="%g", key=f"fs_alpha_{base}")
    if st.button("Run both on this episode", type="primary", key="fs_run"):
        with st.spinner("Tuning on the support set…"):
            runs = tune_pair(backbone, episode, base, int(steps), float(lr), {"fort_alpha": float(alpha), **prompt})
        st.session_state["fewshot_result"] = {"key": key, "runs": runs}
    result = st.session_state.get("fewshot_result")
    if not result or result["key"] != key:
        return
    runs = result["runs"]
    cols = st.columns(len(runs))
    for col, run in zip(cols, runs):
        r = run.result
        focus = "" if r.focus is None else f" · focus {r.focus:.2f} (chance {r.area:.2f})"
        col.metric(r.label, f"{r.acc:.1%} query accuracy", help=f"{r.seconds:.1f} s")
        col.caption(f"{run.module.name}{focus}" + ("" if r.prompt_on_object is None else
                                                   f" · prompts {r.prompt_on_object:.0%} on object"))
    query = episode.query
    names = query.class_names
    st.markdown("**Query predictions and last-layer attention** (image, then each module; one colour scale per query)")
    per_row = 2  # queries per row, each as image + one tile per module
    for start in range(0, len(query), per_row):
        row = st.columns(per_row * (1 + len(runs)))
        for q, i in enumerate(range(start, min(start + per_row, len(query)))):
            image = rgb(query.images, i)
            truth = int(query.labels[i])
            cells = row[q * (1 + len(runs)) : (q + 1) * (1 + len(runs))]
            cells[0].image(image, caption=f"true: {names[truth]}", width="stretch")
            for cell, r, tile in zip(cells[1:], runs, overlays(image, [r.view for r in runs], index=i)):
                pred = int(r.view.pred[i])
                mark = "✓" if pred == truth else "✗"
                cell.image(tile, caption=f"{mark} {r.result.label}: {names[pred]} ({float(r.view.conf[i]):.2f})",
                           width="stretch")


def show_zoo(backbone, size: int) -> None:
    """The zoo's shipped FORT modules: FT / LoRA with and without position prompts on one episode."""
    rows = [r for r in S.zoo_table(S.active_spec().key) if r["kind"] == "episode"]
    if not rows:
        return
    with st.expander("The lecture zoo's FORT modules (shipped)", expanded=True):
        tasks = sorted({r["task"] for r in rows})
        task = st.radio("Task", tasks, horizontal=True, key="fs_zoo_task")
        mine = [r for r in rows if r["task"] == task]
        classes = mine[0]["episode classes"]
        st.caption(f"Tuned on one {len(classes)}-way episode of "
                   f"**{task}** ({', '.join(classes)}), scored on every test image of those classes "
                   f"(n = {mine[0]['n test']}); brackets: 95% Wilson intervals. Prompt on object: share of "
                   "the position prompts' mass on the support images' deciding objects.")
        st.dataframe(
            [{"module": r["entry"], "method": r["method"], "test acc": r["test acc"],
              "95% CI": f"[{r['acc lo']:.3f}, {r['acc hi']:.3f}]", "object share": r["object share"],
              "prompt on object": r["prompt on object"]} for r in mine],
            hide_index=True, width="stretch", key="fs_zoo_table",
        )
        index = st.number_input("Test scene of the episode's classes", 0, 200, 0, key="fs_zoo_index")
        n_classes = len(TASKS[task].classes)
        ids = mine[0]["episode class ids"]
        scene = ids[int(index) % len(ids)] + n_classes * (int(index) // len(ids))
        image = S.scene_image(task, "test", int(scene), size)
        views = S.module_views(backbone, [r["key"] for r in mine], image, "cls", backbone.layout.depth - 1, "mean")
        usable = [mv for mv in views if mv.view is not None]
        cols = st.columns(len(usable) + 1)
        cols[0].image(image.rgb, caption=f"{image.name} · true: {image.true_label}", width="stretch")
        for col, mv, tile in zip(cols[1:], usable, compare.overlay_tiles(image, usable)):
            col.image(tile, caption=f"{mv.label}: {mv.caption()}", width="stretch")


def main() -> None:
    st.title("Few-shot with FORT")
    backbone = S.require_backbone()
    size = int(backbone.layout.img_size[0])
    show_zoo(backbone, size)
    episode, key = pick_episode(size)
    if episode is None:
        return
    prompt = show_prompts(backbone, episode, key)
    show_runs(backbone, episode, key, prompt)


main()
