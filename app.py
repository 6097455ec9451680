"""Attention Steering Lab: `streamlit run app.py`. This file is both the server's entry and the home page.

Two roles, told apart by `__name__`:
- `streamlit run app.py` finds the `st.App` below (Streamlit reads the file's syntax tree) and the server
  imports this file as the module `app`. Its lifespan starts `app_state.warm_up` in a background thread
  as soon as the server is up: the first page needs torch, timm and the frozen backbone, about five
  seconds of CPU, and a plain script would begin that only once the browser has loaded the page and
  opened its session. The first script run then finds the backbone in the shared `st.cache_resource`
  cache, or waits for the load in progress (the cache computes each key once). Same load, begun earlier.
- Streamlit's script runner executes this same file as `__main__` on every rerun: it declares the
  pages with `st.navigation` and draws the home page.

Streamlit also treats a `pages/` folder next to the main script as an old-style page folder until some
session has called `st.navigation`, so a first visitor who opened a page URL (/explorer) got that page
alone, without the navigation and wide layout; the `PagesManager` flag says at start-up what
`main()` says on its first run. Heavy imports stay inside functions so the server starts at once.
Every page reads the shared backbone and run registry from `toast_core.frontends.app_state`;
`TOAST_LAB_BACKBONE=fixture` swaps in a tiny random-weight ViT for tests, `TOAST_LAB_RUNS_DIR` points
the registry elsewhere.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

PagesManager.uses_pages_directory = False  # pages come from st.navigation in main(), never the folder

PAGES_DIR = "pages"


def home() -> None:
    """What the lab is, which backbone is loaded, which runs exist, and lecture shortcuts."""
    from toast_core.frontends import app_state as S

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
        zoo = S.zoo_modules(backbone)
        st.info((f"No runs of your own yet. The lecture zoo's {len(zoo)} shipped modules (every method, both "
                 "built-in tasks) are ready to compare in the Attention Explorer; " if zoo else "No trained modules yet: ")
                + "start a run of your own in the Tuning Lab (a lecture recipe takes a few CPU-minutes).")
    st.caption(f"Registry: `{S.runs_root()}`")

    st.subheader("Lecture presets")
    shown = S.presets(backbone)
    if shown is S.PRESETS:
        st.write("Example built-in scenes; each opens the Explorer. (With the lecture zoo for this backbone, "
                 "the presets are picked from the test split by measured criteria.)")
    else:
        st.write("Scenes picked from the test split by measured criteria over the lecture zoo's modules "
                 "(e.g. the linear probe wrong and a steering module right); each opens the Explorer.")
    cols = st.columns(min(4, len(shown)))
    for i, p in enumerate(shown):
        col = cols[i % len(cols)]
        with col, st.container(border=True):  # no fixed height: a long note never hides the button
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



@asynccontextmanager
async def lifespan(_app: Any) -> AsyncIterator[None]:
    """Start the warm-up and return at once, so the server never waits for it."""

    def warm() -> None:
        # the heavy imports happen here, off the server's path
        from toast_core.frontends.app_state import warm_up

        warm_up()

    threading.Thread(target=warm, name="lab-warm-up", daemon=True).start()
    yield


if __name__ == "__main__":  # Streamlit's script runner (and AppTest): draw the app
    main()
else:  # imported by the server that `streamlit run app.py` starts: serve this file
    app = st.App(__file__, lifespan=lifespan)
