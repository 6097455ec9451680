"""The lecture zoo: every method trained on every built-in task from its recipe, shipped read-only
in checkpoints/zoo/, so the app opens on a comparison instead of an empty registry.

- `train_entry`: one entry from its recipe (task, few-shot episode or attention transfer);
- `evaluate`: accuracy and focus with 95% intervals (what a card says);
- `build` / `verify`: `python -m toast_core zoo build|verify`;
- `catalog`: what is shipped, for every front end (never written to at run time).
"""
