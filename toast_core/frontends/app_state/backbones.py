"""The Backbones page's helpers: weights uploads stored safely, loading a backbone with a reason."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from toast_core.core.backbone import Backbone, BackboneError
from toast_core.runs import RunStatus

from .session import BACKBONE_FILES_DIR, MAX_WEIGHTS_MB, BackboneSpec, run_manager, runs_root, shared_backbone

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def save_weights_upload(data: bytes, name: str) -> Path:
    """Store an uploaded weights file under the runs root (content-addressed) so timm can read it by
    path; nothing is unpickled here (the backbone loader reads safetensors or weights_only tensors)."""
    suffix = Path(name).suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(f"'{name}' is not a weights file: use {', '.join(WEIGHT_SUFFIXES)}.")
    if len(data) > MAX_WEIGHTS_MB * 1024 * 1024:
        raise BackboneError(f"'{name}' is {len(data) / 2**20:.0f} MB, over the {MAX_WEIGHTS_MB} MB upload limit; "
                            "give its path on this machine instead.")
    digest = hashlib.sha256(data).hexdigest()[:16]
    folder = runs_root() / BACKBONE_FILES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}{suffix}"
    if not path.is_file():
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def try_backbone(spec: BackboneSpec) -> tuple[Backbone | None, str | None]:
    """Load (and cache) a backbone; (backbone, None) or (None, the reason it failed)."""
    try:
        return shared_backbone(spec), None
    except BackboneError as exc:
        return None, str(exc)
    except (OSError, RuntimeError, ValueError) as exc:  # anything else the loader could not phrase
        return None, f"{type(exc).__name__}: {exc}"


def active_runs(spec: BackboneSpec | None = None) -> list[RunStatus]:
    """Queued or running runs of this session's manager (switching backbone would orphan them)."""
    try:
        manager = run_manager(spec)
    except BackboneError:
        return []
    return [r for r in manager.list(history=False) if r.state in ("queued", "running")]
