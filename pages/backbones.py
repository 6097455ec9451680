"""Backbones: the embedded default, a timm hub model, or a local weights file (uploaded or by path)."""

from __future__ import annotations

import streamlit as st

from toast_core.frontends import app_state as S

CHOICES = ("Embedded (default)", "timm model from the hub", "Local weights file")


def show_current() -> None:
    spec = S.active_spec()
    backbone, error = S.try_backbone(spec)
    st.subheader("In use")
    if backbone is None:
        st.error(f"'{spec.describe()}' could not be loaded: {error}")
        return
    facts = S.backbone_facts(backbone)
    st.markdown(f"**{facts['Backbone']}**")
    cols = st.columns(4)
    for col, key in zip(cols, ("Parameters", "Input / patch", "Blocks × heads", "Device")):
        col.metric(key, facts[key])
    if S.is_fixture(backbone):
        st.warning(f"This is the {S.FIXTURE_LABEL} backbone (TOAST_LAB_BACKBONE=fixture): for tests only.")
    layout = backbone.layout
    st.caption(
        f"Source: {backbone.source} · grid {layout.grid[0]}×{layout.grid[1]} · width {layout.embed_dim} · "
        f"prefix tokens {layout.num_prefix_tokens} · device {facts['Device']} · weights hash {facts['Weights hash']}"
    )
    with st.expander("Card"):
        st.json(backbone.card)


def switch_to(spec: S.BackboneSpec) -> None:
    """Load the new backbone; keep the old one on any failure, with the loader's message."""
    busy = S.active_runs()
    if busy and spec != S.active_spec():
        st.error(f"{len(busy)} run(s) are queued or running on the current backbone; wait for them or cancel "
                 "them in the Tuning Lab before switching.")
        return
    with st.spinner(f"Loading {spec.describe()}…"):
        backbone, error = S.try_backbone(spec)
    if backbone is None:
        st.error(f"Could not load '{spec.describe()}': {error}")
        return
    S.set_active_spec(spec)
    st.success(f"Now using {S.backbone_title(backbone)}. Runs trained on other backbones stay in the registry "
               "but only modules of this one can be loaded.")


def main() -> None:
    st.title("Backbones")
    st.write("Every steering module belongs to the frozen backbone it was trained on (checked by weights hash).")
    show_current()
    st.subheader("Switch")
    choices = list(CHOICES)
    if S.spec_from_env().kind == S.FIXTURE:
        choices.append(f"Test fixture ({S.FIXTURE_LABEL})")
    choice = st.radio("Source", choices, key="bb_choice", horizontal=True)
    if choice == CHOICES[0]:
        st.caption("The project's own ViT (96 px, patch 8), pretrained on generated scenes; no network needed.")
        if st.button("Use the embedded backbone", key="bb_embedded"):
            switch_to(S.BackboneSpec())
    elif choice == CHOICES[1]:
        name = st.text_input("timm model name", value="deit_tiny_patch16_224", key="bb_hub_name",
                             help="Any timm ViT / DeiT with pretrained weights; needs the network on first use.")
        if st.button("Load from the hub", key="bb_hub_load"):
            switch_to(S.BackboneSpec("hub", name.strip()))
    elif choice == CHOICES[2]:
        arch = st.text_input("timm architecture of the file", value="vit_small_patch16_224", key="bb_arch")
        upload = st.file_uploader(f"Weights file (.safetensors, .pth, .pt, .bin; up to {S.MAX_WEIGHTS_MB} MB)",
                                  type=[s.lstrip(".") for s in S.WEIGHT_SUFFIXES], key="bb_upload",
                                  max_upload_size=S.MAX_WEIGHTS_MB)
        path = st.text_input("…or a path on this machine", key="bb_path")
        if st.button("Load the file", key="bb_file_load"):
            try:
                weights = str(S.save_weights_upload(upload.getvalue(), upload.name)) if upload else path.strip()
            except S.BackboneError as exc:
                st.error(str(exc))
                return
            if not weights:
                st.warning("Upload a weights file or give its path.")
                return
            switch_to(S.BackboneSpec("file", arch.strip(), weights))
    else:
        if st.button("Use the test fixture", key="bb_fixture"):
            switch_to(S.BackboneSpec(S.FIXTURE, S.FIXTURE))


main()
