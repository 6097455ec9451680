"""Tuning Lab: configure a steering method, submit a background run, watch it learn, cancel it."""

from __future__ import annotations

import time
from typing import Any

import plotly.graph_objects as go
import streamlit as st
import torch
from plotly.subplots import make_subplots

from toast_core.data.folder import ImageFolderError
from toast_core.data.scenes import TASKS
from toast_core.data.zip_import import ZipImportError
from toast_core.frontends import app_state as S
from toast_core.methods import method_names
from toast_core.runs import ACTIVE_STATES, RunError, RunStatus
from toast_core.runs.torchrun import gpu_count
from toast_core.training.recipes import run_defaults
from toast_core.views.viz import heatmap_image, normalise_maps, overlay

POLL_S = 1.0  # seconds between refreshes of the run panel while a run is queued or running
TASK_SOURCES = ("Built-in task", "Uploaded zip of class folders", "Few-shot episode")


def setting_widget(method: str, spec: S.FieldSpec) -> Any:
    """One widget per config field, keyed by method so each method keeps its own values."""
    key = f"tl_{method}_{spec.name}"
    label = spec.name.replace("_", " ")
    if spec.kind == "bool":
        return st.checkbox(label, value=spec.default, key=key)
    if spec.kind == "choice":
        return st.selectbox(label, spec.choices, index=spec.choices.index(spec.default), key=key)
    if spec.kind == "int":
        return int(st.number_input(label, value=spec.default, step=1, key=key))
    if spec.kind == "float":
        return float(st.number_input(label, value=spec.default, format="%g", key=key))
    if spec.kind in ("optional_int", "optional_float"):
        text = st.text_input(f"{label} (empty = default)", value="" if spec.default is None else str(spec.default), key=key)
        if not text.strip():
            return None
        try:
            return int(text) if spec.kind == "optional_int" else float(text)
        except ValueError:
            st.warning(f"'{text}' is not a number; {label} uses its default.")
            return None
    if spec.kind == "tuple":
        shown = "" if spec.default is None else ", ".join(str(v) for v in spec.default)
        return S.parse_tuple(st.text_input(f"{label} (comma-separated)", value=shown, key=key), spec.default)
    return st.text_input(label, value=str(spec.default), key=key)


def method_settings(method: str) -> dict[str, Any]:
    specs = S.method_fields(method)
    values: dict[str, Any] = {}
    with st.expander(f"{method} settings (defaults as in methods.md)", expanded=False):
        if not specs:
            st.caption("This method has no settings beyond the seed.")
        cols = st.columns(2)
        for i, spec in enumerate(specs):
            with cols[i % 2]:
                values[spec.name] = setting_widget(method, spec)
    return values


def uploaded_dataset() -> str | None:
    """Import an uploaded zip of class folders safely; returns the folder, or None (with a message)."""
    upload = st.file_uploader(
        f"A zip with one folder per class (up to {S.MAX_ZIP_MB} MB)", type=["zip"], key="tl_zip",
        max_upload_size=S.MAX_ZIP_MB,
    )
    if upload is None:
        return st.session_state.get("tl_dataset")
    try:
        path = str(S.import_dataset_zip(upload.getvalue(), upload.name))
    except (ZipImportError, ImageFolderError) as exc:
        st.error(f"This zip cannot be used: {exc}")
        st.session_state.pop("tl_dataset", None)
        return None
    st.session_state["tl_dataset"] = path
    return path


def show_dataset(path: str, size: int) -> bool:
    try:
        info = S.dataset_summary(path, size)
    except (ImageFolderError, OSError) as exc:
        st.error(f"The imported folder cannot be read as a dataset: {exc}")
        return False
    counts = ", ".join(f"{k}: {v}" for k, v in info["counts"].items())
    st.success(f"{len(info['classes'])} classes, {info['images']} images ({counts}).")
    if info["skipped"]:
        with st.expander(f"{len(info['skipped'])} files skipped"):
            st.dataframe(info["skipped"], hide_index=True)
    return True


def follow_recipe(tag: str, values: dict[str, Any]) -> None:
    """Set the data and budget widgets to a recipe's values when the method or task changes (once
    per change, before the widgets are drawn), so the user's own edits stand until then."""
    if st.session_state.get("tl_recipe_tag") != tag:
        st.session_state["tl_recipe_tag"] = tag
        st.session_state.update(values)
    for key, value in values.items():
        st.session_state.setdefault(key, value)


def task_settings(size: int, method: str) -> dict[str, Any] | None:
    """The run's task string and data sizes, or None when the data is not ready."""
    source = st.radio("Data", TASK_SOURCES, key="tl_source", horizontal=True)
    c1, c2 = st.columns(2)
    if source == TASK_SOURCES[0]:
        task = st.selectbox("Task", list(TASKS), key="tl_task")
        st.caption(TASKS[task].description)
        d = run_defaults(task, method)
        follow_recipe(f"{task}|{method}", {"tl_per_class": d["per_class"], "tl_val": d["val_per_class"],
                                          "tl_steps": d["steps"], "tl_batch": d["batch_size"], "tl_lr": float(d["lr"])})
        per_class = c1.number_input("Training images per class", 1, 5000, key="tl_per_class")
        val = c2.number_input("Validation images per class", 0, 1000, key="tl_val")
        return {"task": task, "per_class": int(per_class), "val_per_class": int(val)}
    if source == TASK_SOURCES[1]:
        path = uploaded_dataset()
        if path is None or not show_dataset(path, size):
            return None
        per_class = c1.number_input("Training images per class (at most)", 1, 5000, 50, key="tl_zip_per_class")
        val = c2.number_input("Held out per class for validation", 0, 1000, 5, key="tl_zip_val")
        return {"task": f"folder:{path}", "per_class": int(per_class), "val_per_class": int(val)}
    bases = list(TASKS) + ([f"folder:{st.session_state['tl_dataset']}"] if st.session_state.get("tl_dataset") else [])
    base = st.selectbox("Episode drawn from", bases, key="tl_ep_base",
                        format_func=lambda b: "uploaded dataset" if b.startswith("folder:") else b)
    cols = st.columns(4)
    n_way = cols[0].number_input("N-way", 2, 50, 5, key="tl_ep_way")
    k_shot = cols[1].number_input("K-shot", 1, 50, 1, key="tl_ep_shot")
    n_query = cols[2].number_input("Queries per class", 1, 100, 5, key="tl_ep_query")
    index = cols[3].number_input("Episode", 0, 10_000, 0, key="tl_ep_index")
    st.caption("Support images train the module; query images are its validation set.")
    return {"task": f"episode:{n_way}:{k_shot}:{n_query}:{index}:{base}", "per_class": 1, "val_per_class": 0}


def new_run_form(backbone, manager) -> None:
    st.subheader("New run")
    methods = method_names()
    method = st.selectbox("Method", methods, index=methods.index("lora") if "lora" in methods else 0, key="tl_method")
    st.caption(S.describe_method(method))
    if S.needs_episode_prompts(method):
        st.info(f"{method} first computes FORT's position prompts (gradient rollout) on every training image "
                "of the run, its support set, then trains with them; the run panel says while it does. "
                "A few-shot episode (K images per class) is the setting FORT was made for.")
    settings = method_settings(method)
    size = int(backbone.layout.img_size[0])
    data = task_settings(size, method)

    task = (data or {}).get("task", "")
    d = run_defaults(task, method)
    if task not in TASKS:  # built-in tasks followed their (recipe or generic) defaults in task_settings
        follow_recipe("generic", {"tl_steps": d["steps"], "tl_batch": d["batch_size"], "tl_lr": float(d["lr"])})
    st.markdown("**Budget**" + (f" — the lecture recipe `{d['recipe']}` for {task}" if d["recipe"] else ""))
    cols = st.columns(4)
    steps = cols[0].number_input("Steps", 1, 100_000, key="tl_steps")
    batch = cols[1].number_input("Batch size", 1, 1024, key="tl_batch")
    lr = cols[2].number_input("Learning rate", 1e-6, 100.0, format="%g", key="tl_lr")
    expected = S.expected_train_s(task, method, int(steps), int(batch))
    if expected is not None:
        st.caption(f"Expected training time: about {expected / 60:.1f} min on one CPU core (the zoo build's "
                   "measured time for this recipe, scaled to these steps and batch; more cores or a GPU take less).")
    cols[3].metric("Image size", f"{size} px", help="The backbone's input size; images are resized to it.")
    cols = st.columns(4)
    eval_every = cols[0].number_input("Evaluate every (steps, 0 = end)", 0, 100_000, 25, key="tl_eval")
    snap_every = cols[1].number_input("Attention snapshot every", 0, 100_000, 10, key="tl_snap",
                                      help="Steps between snapshots of the probe image's attention; every run "
                                           "also records one at its end (0 = only that one).")
    seed = cols[2].number_input("Seed", 0, 2**31 - 1, 0, key="tl_seed")
    devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpus = gpu_count()
    if gpus > 1:  # one run over every GPU: a torchrun subprocess, one process per GPU
        devices.append(f"all {gpus} GPUs (torchrun)")
    device = cols[3].selectbox("Device", devices, key="tl_device")
    processes = gpus if device.startswith("all ") else 1
    if gpus > 1:
        st.caption(f"This machine has {gpus} GPUs: 'all {gpus} GPUs (torchrun)' trains one run on all of them "
                   "(one process per GPU, the batch split across them, gradients all-reduced; the same module "
                   "as one GPU up to rounding). Its progress appears here like any run's.")
    name = st.text_input("Run name (optional)", key="tl_name")

    if st.button("Submit run", type="primary", key="tl_submit", disabled=data is None):
        try:
            run_id = S.submit_run(
                manager, method=method, method_config={**settings, "seed": int(seed)}, name=name.strip() or None,
                train={"steps": int(steps), "batch_size": int(batch), "lr": float(lr), "eval_every": int(eval_every),
                       "weight_decay": float(d["weight_decay"]), "warmup_steps": int(d["warmup_steps"]),
                       **d["recipe_train"]},
                device="cuda" if processes > 1 else device, seed=int(seed), snapshot_every=int(snap_every),
                processes=processes, **(data or {}),
            )
        except (ValueError, TypeError, RunError) as exc:
            st.error(f"The run was not submitted: {exc}")
            return
        st.session_state["tl_selected"] = run_id
        st.success(f"Submitted run `{run_id}`.")


def curves(status: RunStatus) -> go.Figure:
    """Loss (left axis) and accuracies (right axis) per step."""
    h = status.history
    steps = [e["step"] for e in h]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=steps, y=[e.get("loss") for e in h], name="loss", mode="lines"), secondary_y=False)
    fig.add_trace(go.Scatter(x=steps, y=[e.get("train_acc") for e in h], name="train acc", mode="lines",
                             opacity=0.5), secondary_y=True)
    val = [(e["step"], e["val_acc"]) for e in h if e.get("val_acc") is not None]
    if val:
        fig.add_trace(go.Scatter(x=[s for s, _ in val], y=[a for _, a in val], name="val acc",
                                 mode="lines+markers"), secondary_y=True)
    fig.update_yaxes(title_text="loss", secondary_y=False)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], tickformat=".0%", dtick=0.25, secondary_y=True,
                     showgrid=False)
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="step",
                      legend=dict(orientation="h", y=1.15))
    return fig


def show_snapshot(status: RunStatus, size: int) -> None:
    """The latest attention snapshot; a finished run's is its final module's."""
    snap = S.run_snapshot(status, size)
    if snap is None:
        st.caption("No attention snapshot yet." if status.state in ACTIVE_STATES
                   else "This run recorded no attention snapshot.")
        return
    grid, step = snap
    (m,) = normalise_maps([grid])
    probe = S.probe_image(status.config, size)
    tile = overlay(probe, m) if probe is not None else heatmap_image(m, (size, size))
    final = " (final module)" if status.finished and step == status.step else ""
    st.image(tile, caption=f"Probe image, last-layer CLS attention at step {step}{final}", width="stretch")


def describe_state(status: RunStatus) -> None:
    if status.state == "failed":
        st.error(f"Run failed: {status.error}")
        if status.traceback:
            with st.expander("Details"):
                st.code(status.traceback)
    elif status.state == "cancelled":
        st.warning(f"Cancelled at step {status.step} of {status.total}.")
    elif status.state == "interrupted":
        st.warning(status.note or "Interrupted: the app stopped while this run was active.")
    elif status.state == "done":
        acc = status.final.get("val_acc")
        st.success(f"Done: {status.step} steps" + (f", validation accuracy {acc:.3f}" if acc is not None else "")
                   + ". The module now appears in the Explorer and the Benchmark.")
    if status.note and status.state not in ("interrupted",):
        st.caption(status.note)


def run_panel(manager, size: int) -> None:
    """The queue and the selected run, refreshed by polling while anything is active."""
    runs = sorted(manager.list(history=False), key=lambda r: r.created, reverse=True)
    if not runs:
        st.info("No runs yet.")
        return
    st.dataframe(
        [{"run": r.name, "state": r.state, "progress": f"{r.step}/{r.total}",
          "ETA": "" if r.eta_s is None else f"{r.eta_s:.0f} s", "device": r.device or "",
          "val acc": r.final.get("val_acc")} for r in runs],
        hide_index=True, width="stretch", height=min(36 * (len(runs) + 1) + 3, 260),
    )
    ids = [r.run_id for r in runs]
    names = {r.run_id: f"{r.name} · {time.strftime('%H:%M:%S', time.localtime(r.created))}" for r in runs}
    if st.session_state.get("tl_selected") not in ids:
        st.session_state["tl_selected"] = ids[0]
    run_id = st.selectbox("Run", ids, format_func=lambda k: names[k], key="tl_selected")
    status = manager.status(run_id)
    c1, c2 = st.columns([3, 1])
    c1.progress(min(1.0, status.progress), text=f"{status.state}: step {status.step} / {status.total}"
                + ("" if status.eta_s is None else f" · ETA {status.eta_s:.0f} s")
                + (f" · {status.phase}…" if status.phase and status.state == "running" else ""))
    if status.state in ACTIVE_STATES and c2.button("Cancel", key=f"tl_cancel_{run_id}"):
        manager.cancel(run_id)
        st.toast(f"Cancelling {status.name}…")
    describe_state(status)
    left, right = st.columns([3, 2])  # the probe image fills its column: no fixed width to overflow it
    with left:
        if status.history:
            st.plotly_chart(curves(status), key="tl_curves", width="stretch")
    with right:
        show_snapshot(status, size)
    active = any(r.state in ACTIVE_STATES for r in runs)
    was_active = st.session_state.get("tl_was_active", False)
    st.session_state["tl_was_active"] = active
    if was_active and not active:
        st.rerun(scope="app")  # a run just finished: refresh everything that lists runs


def main() -> None:
    st.title("Tuning Lab")
    backbone = S.require_backbone()
    manager = S.run_manager()
    left, right = st.columns([1, 1], gap="large")
    with left:
        new_run_form(backbone, manager)
    with right:
        st.subheader("Runs")
        active = any(r.state in ACTIVE_STATES for r in manager.list(history=False))
        size = int(backbone.layout.img_size[0])
        st.fragment(run_every=POLL_S if active else None)(run_panel)(manager, size)
        st.caption(f"Updated {time.strftime('%H:%M:%S')} · registry `{S.runs_root()}`")


main()
