"""Attention Steering Lab: Streamlit entry point (home page)."""

from __future__ import annotations

import streamlit as st

from toast_core.backbone import BackboneError, load_backbone


@st.cache_resource(show_spinner="Loading the frozen backbone…")
def shared_backbone(name: str = "embedded"):
    """One frozen backbone per process, shared read-only by every page and session."""
    return load_backbone(name, device="auto")


def main() -> None:
    st.set_page_config(page_title="Attention Steering Lab", page_icon="🔭", layout="wide")
    st.title("Attention Steering Lab")
    st.write(
        "Where does a tuned Vision Transformer look, and why did a transfer method work? "
        "One frozen backbone, small steering modules, attention maps side by side."
    )
    try:
        backbone = shared_backbone()
    except BackboneError as exc:
        st.error(str(exc))
        return
    info = backbone.describe()
    st.subheader("Loaded backbone")
    cols = st.columns(4)
    cols[0].metric("Backbone", info["name"])
    cols[1].metric("Parameters", f"{info['parameters'] / 1e6:.2f} M")
    cols[2].metric("Input / patch", f"{info['img_size'][0]} px / {info['patch_size'][0]} px")
    cols[3].metric("Blocks × heads", f"{info['depth']} × {info['num_heads']}")
    quality = backbone.card.get("quality", {})
    if quality:
        st.caption("Measured quality (from the backbone card)")
        st.json(quality, expanded=False)
    with st.expander("Backbone card"):
        st.json(backbone.card)


main()
