"""Benchmark: every run in the registry — accuracy, trainable share, speed, focus — with filters and plots."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from toast_core.frontends import app_state as S

ACCURACY_AXIS = dict(range=[0, 1.05], tickformat=".0%")  # accuracy is a share: never a negative axis


def filtered(df: pd.DataFrame) -> pd.DataFrame:
    c1, c2, c3, c4 = st.columns([2, 2, 2, 1.6])  # wide enough for the toggle's label
    methods = c1.multiselect("Methods", sorted(df["method"].unique()), key="bm_methods", placeholder="all")
    tasks = c2.multiselect("Tasks", sorted(df["task"].unique()), key="bm_tasks", placeholder="all")
    states = c3.multiselect("States", sorted(df["state"].unique()), default=["done"] if "done" in set(df["state"]) else [],
                            key="bm_states", placeholder="all")
    own = c4.toggle("This backbone only", value=True, key="bm_own")
    keep = pd.Series(True, index=df.index)
    if methods:
        keep &= df["method"].isin(methods)
    if tasks:
        keep &= df["task"].isin(tasks)
    if states:
        keep &= df["state"].isin(states)
    if own:
        keep &= df["this backbone"]
    return df[keep]


def plots(df: pd.DataFrame) -> None:
    done = df[df["val acc"].notna()]
    if done.empty:
        st.info("No finished run with a validation accuracy matches the filters.")
        return
    c1, c2 = st.columns(2)
    with c1:
        with_share = done[done["trainable %"].notna() & (done["trainable %"] > 0)]
        if not with_share.empty:
            fig = px.scatter(with_share, x="trainable %", y="val acc", color="method", hover_name="run",
                             log_x=True, title="Accuracy vs trainable parameters")
            fig.update_layout(height=360, margin=dict(l=10, r=10, t=50, b=10))
            fig.update_xaxes(dtick=1)  # one tick per decade of the log axis
            fig.update_yaxes(ACCURACY_AXIS)
            st.plotly_chart(fig, key="bm_share")
    with c2:
        with_focus = done[done["focus ratio"].notna()]
        if with_focus.empty:
            st.info("Focus is measured on built-in tasks only (their scenes have ground-truth masks).")
        else:
            fig = px.scatter(with_focus, x="focus ratio", y="val acc", color="method", hover_name="run",
                             title="Focus on the deciding object vs accuracy")
            fig.add_vline(x=1.0, line_dash="dot", annotation_text="chance")
            fig.update_layout(height=360, margin=dict(l=10, r=10, t=50, b=10))
            fig.update_yaxes(ACCURACY_AXIS)
            st.plotly_chart(fig, key="bm_focus")


def zoo_section(backbone) -> None:
    """The shipped lecture zoo: every method trained from its recipe, with 95% intervals."""
    rows = S.zoo_table(S.active_spec().key)
    if not rows:
        return
    st.subheader("The lecture zoo (shipped)")
    st.caption("Every method trained on each built-in task from its lecture recipe (learning rates, and the "
               "length of full fine-tuning and LoRA, and full fine-tuning's training-set size, chosen on the validation split; "
               "the few-shot and attention-"
               "transfer entries keep the project's defaults), scored on the test split. Brackets: 95% intervals (Wilson for "
               "accuracy, bootstrap over images for focus). Object share: the deciding object's share of "
               "the attention that lands on objects; chance = its share of the objects' area. Faith gap: LeRF − MoRF "
               "token-deletion AUC of the same map (> 0: the prediction depends on where the map points).")
    df = pd.DataFrame(rows)
    tasks = sorted(df["task"].unique())
    task = st.radio("Task", tasks, horizontal=True, key="bm_zoo_task")
    mine = df[df["task"] == task]
    st.dataframe(
        mine.drop(columns=["key", "task"]), hide_index=True, width="stretch",
        column_config={c: st.column_config.NumberColumn(format="%.3f") for c in
                       ("test acc", "acc lo", "acc hi", "val acc", "object share", "object lo", "object hi",
                        "object chance", "trainable %", "faith gap", "gap lo", "gap hi", "MoRF AUC", "LeRF AUC")} | {
                       c: st.column_config.NumberColumn(format="%.2f") for c in ("focus ratio", "focus lo", "focus hi")},
        key="bm_zoo_table",
    )
    task_rows = mine[mine["kind"] == "task"].sort_values("test acc")
    c1, c2 = st.columns(2)
    with c1:
        fig = px.scatter(task_rows, x="test acc", y="entry", error_x=task_rows["acc hi"] - task_rows["test acc"],
                         error_x_minus=task_rows["test acc"] - task_rows["acc lo"], title=f"Test accuracy on {task} (95% CI)")
        fig.update_xaxes(ACCURACY_AXIS)
        fig.update_layout(height=360, margin=dict(l=10, r=10, t=50, b=10))
        st.plotly_chart(fig, key="bm_zoo_acc")
    with c2:
        fig = px.scatter(task_rows, x="object share", y="test acc", text="entry",
                         title="Attention on the right object vs accuracy")
        chance = float(task_rows["object chance"].mean())
        fig.add_vline(x=chance, line_dash="dot", annotation_text="chance")
        fig.update_traces(textposition="top center")
        fig.update_yaxes(ACCURACY_AXIS)
        fig.update_layout(height=360, margin=dict(l=10, r=10, t=50, b=10))
        st.plotly_chart(fig, key="bm_zoo_focus")
    st.download_button("Download the zoo table (CSV)", df.to_csv(index=False).encode(), file_name="zoo.csv",
                       mime="text/csv", key="bm_zoo_csv")


def main() -> None:
    st.title("Benchmark")
    backbone = S.require_backbone()
    zoo_section(backbone)
    manager = S.run_manager()
    st.subheader("Your runs")
    with_focus = st.toggle("Measure focus (last-layer CLS attention on the deciding object, "
                           f"{S.FOCUS_IMAGES} built-in test scenes per run)", value=True, key="bm_focus_on")
    with_faith = st.toggle("Measure faithfulness (the same maps' MoRF / LeRF token-deletion curves, "
                           f"{S.FAITH_STEPS} steps; slower)", value=False, key="bm_faith_on")
    rows = S.benchmark_rows(manager, backbone, with_focus=with_focus, with_faithfulness=with_faith)
    if not rows:
        st.info("No runs of your own in the registry yet: train some in the Tuning Lab.")
        return
    df = filtered(pd.DataFrame(rows))
    st.dataframe(
        df.drop(columns=["run_id", "this backbone"]),
        hide_index=True,
        width="stretch",
        column_config={
            "val acc": st.column_config.NumberColumn(format="%.3f"),
            "train acc": st.column_config.NumberColumn(format="%.3f"),
            "trainable %": st.column_config.NumberColumn(format="%.3f"),
            "ms / image (train)": st.column_config.NumberColumn(format="%.2f"),
            "focus ratio": st.column_config.NumberColumn(format="%.2f", help="1 = chance (the area share)"),
            "MoRF AUC": st.column_config.NumberColumn(
                format="%.3f", help="area under the class probability as the most attended patches go (lower = faithful)"),
            "LeRF − MoRF": st.column_config.NumberColumn(
                format="%.3f", help="least-first minus most-first deletion area (higher = the map is used)"),
        },
    )
    st.download_button("Download CSV", df.to_csv(index=False).encode(), file_name="benchmark.csv",
                       mime="text/csv", key="bm_csv")
    plots(df)


main()
