"""Front ends: the ways in, each a thin layer over the library. `cli` (with `cli_common`, `cli_runs`,
`cli_views`) is `python -m toast_core`, `gradio_app` (with `gradio_context`) the Gradio app, and
`app_state` what the Streamlit pages share."""
