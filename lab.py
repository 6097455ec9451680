"""Attention Steering Lab: the Streamlit script (navigation and the home page).

`streamlit run app.py` serves this script (app.py only adds a warm-up at server start). Every page
reads the shared frozen backbone and the run registry from `toast_core.app_state` (cached once per
process); `TOAST_LAB_BACKBONE=fixture` swaps in a tiny random-weight ViT for tests,
`TOAST_LAB_RUNS_DIR` points the registry elsewhere.
"""

from __future__ import annotations

import streamlit as st

from toast_core import app_state as S

PAGES_DIR = "pages"


def home() -> None:
    """What the lab is, which backbone is loaded, which runs exist, and lecture shortcuts."""
    st.title("Attention Steering Lab")
    st.write(
        "Where does a tuned Vision Transformer look, and why did a transfer method work? One frozen "
        "pretrained backbone, small steering modules (linear probe, BitFit, LoRA, VPT, pixel prompts, "
        "TOAST, FORT, attention transfer), and their attention maps side by side."
    )
    backbone = S.require_backbone()

    st.subheader("Loaded backbone")
    facts = S.backbone_facts(backbone)
    st.markdown(f"**{facts['Backbone']}**")
    cols = st.columns(4)
    for col, key in zip(cols, ("Parameters", "Input / patch", "Blocks × heads", "Device")):
        col.metric(key, facts[key])
    st.caption(f"Weights hash {facts['Weights hash']} · change the backbone on the Backbones page.")
    quality = backbone.card.get("quality", {})
    if quality:
        with st.expander("Measured quality (from the backbone card)"):
            st.json(quality)
    with st.expander("Backbone card"):
        st.json(backbone.card)

    st.subheader("Runs")
    manager = S.run_manager()
    runs = manager.list(history=False)
    done = S.finished_runs(manager, backbone)
    active = [r for r in runs if r.state in ("queued", "running")]
    cols = st.columns(3)
    cols[0].metric("Finished modules on this backbone", len(done))
    cols[1].metric("Queued or running", len(active))
    cols[2].metric("All runs in the registry", len(runs))
    if done:
        st.dataframe(
            [
                {"run": r.name, "method": r.method, "task": r.task, "val acc": r.final.get("val_acc"),
                 "steps": r.step}
                for r in done[:10]
            ],
            hide_index=True,
            width="stretch",
        )
    else:
        st.info("No trained modules yet: start one in the Tuning Lab (a few hundred steps take minutes on a CPU).")
    st.caption(f"Registry: `{S.runs_root()}`")

    st.subheader("Lecture presets")
    st.write("Built-in scenes with fixed indices that show each method's effect; each opens the Explorer.")
    cols = st.columns(len(S.PRESETS))
    for col, p in zip(cols, S.PRESETS):
        with col, st.container(border=True, height=250):
            st.markdown(f"**{p.title}**")
            st.caption(f"{p.task} · {p.split} #{p.index} — {p.note}")
            if st.button("Open", key=f"preset_{p.key}", width="stretch"):
                st.session_state["explorer_preset"] = p.key
                st.switch_page(f"{PAGES_DIR}/explorer.py")


def main() -> None:
    st.set_page_config(page_title="Attention Steering Lab", page_icon=":material/visibility:", layout="wide")
    pages = [
        st.Page(home, title="Home", icon=":material/home:", default=True),
        st.Page(f"{PAGES_DIR}/explorer.py", title="Attention Explorer", icon=":material/image_search:"),
        st.Page(f"{PAGES_DIR}/tuning_lab.py", title="Tuning Lab", icon=":material/tune:"),
        st.Page(f"{PAGES_DIR}/fewshot.py", title="Few-shot (FORT)", icon=":material/target:"),
        st.Page(f"{PAGES_DIR}/benchmark.py", title="Benchmark", icon=":material/leaderboard:"),
        st.Page(f"{PAGES_DIR}/backbones.py", title="Backbones", icon=":material/memory:"),
    ]
    st.navigation(pages).run()


main()
