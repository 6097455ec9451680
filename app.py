"""Attention Steering Lab: run with `streamlit run app.py` (serves lab.py: navigation and the pages).

Why an `st.App` and not the script itself: the first page a person opens needs torch, timm and the
frozen backbone, about five seconds of CPU before anything can be compared. A plain script starts that
work only when the browser has loaded the page and opened its session; here the server starts it in a
background thread as soon as it is up (`app_state.warm_up`), so it overlaps with the browser loading
the page. The first script run then finds the backbone in the shared `st.cache_resource` cache, or
waits for the load in progress (the cache computes each key once). Nothing is skipped or faked: the
same load, just begun earlier. `streamlit run app.py` detects the `app` below and serves it.

lab.py declares the pages with `st.navigation`. Streamlit also treats a `pages/` folder next to the
main script as an old-style page folder until some session has called `st.navigation`, so a first
visitor who opens a page URL (/explorer) got that page alone, without the app's navigation and wide
layout. The flag below says at start-up what lab.py would say on its first run.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

SCRIPT = "lab.py"
PagesManager.uses_pages_directory = False  # pages come from st.navigation in lab.py, never the folder


@asynccontextmanager
async def lifespan(_app: Any) -> AsyncIterator[None]:
    """Start the warm-up and return at once, so the server never waits for it."""

    def warm() -> None:
        from toast_core.app_state import warm_up  # the heavy imports happen here, off the server's path

        warm_up()

    threading.Thread(target=warm, name="lab-warm-up", daemon=True).start()
    yield


app = st.App(SCRIPT, lifespan=lifespan)
