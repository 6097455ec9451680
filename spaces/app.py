"""Hugging Face Spaces entry point (`app_file: spaces/app.py`): the Gradio demo on the embedded backbone.

Spaces runs `python spaces/app.py` from the repository root and sets GRADIO_SERVER_NAME=0.0.0.0;
everything else (backbone, runs registry, threads) can be set with the same flags / environment as
`python -m toast_core.frontends.gradio_app`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from toast_core.frontends.gradio_app import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--host" not in args:
        args += ["--host", os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0")]
    if "--threads" not in args and os.environ.get("TOAST_LAB_THREADS"):
        args += ["--threads", os.environ["TOAST_LAB_THREADS"]]
    sys.exit(main(args))
