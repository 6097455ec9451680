"""Save and load steering modules: `<stem>.safetensors` (the module's tensors) + `<stem>.json` (its card).

A checkpoint holds only what a method learnt plus the identity of the backbone it belongs to
(name + weights hash), so loading it onto another backbone is refused. Nothing is ever unpickled,
and both files are written atomically (temp file + os.replace) so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from toast_core.core.backbone import Backbone
from toast_core.methods import REGISTRY, build_method, config_for, method_names
from toast_core.methods.base import SteeringMethod
from toast_core.storage.storage_codec import CodecError, decode, encode

FORMAT = "toast-steering-module"
FORMAT_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what and why."""


# --- paths ----------------------------------------------------------------------------------------
def _stem(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.suffix in (WEIGHTS_SUFFIX, CARD_SUFFIX):
        return p.with_suffix("")
    return p


def paths_for(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(weights, card) paths for a stem, or for either of the two files."""
    stem = _stem(path)
    return stem.with_name(stem.name + WEIGHTS_SUFFIX), stem.with_name(stem.name + CARD_SUFFIX)


def _default_stem(directory: Path, method: SteeringMethod, task: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    safe_task = "".join(c if c.isalnum() or c in "-_" else "-" for c in task) or "task"
    stem = directory / f"{method.name}_{safe_task}_{stamp}"
    n = 1
    while any(p.exists() for p in paths_for(stem)):
        n += 1
        stem = directory / f"{method.name}_{safe_task}_{stamp}-{n}"
    return stem


def _atomic_write(target: Path, write: Any) -> None:
    """Write through a temp file in the same folder, then rename over the target."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(value: Any) -> Any:
    """Cards hold plain JSON: numpy / torch scalars become numbers, paths strings, tuples lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    if hasattr(value, "tolist") and callable(value.tolist):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- save -----------------------------------------------------------------------------------------
def save_module(
    method: SteeringMethod,
    path_dir_or_stem: str | os.PathLike[str],
    *,
    task: str,
    metrics: dict[str, Any] | None = None,
    timings: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    storage: str = "float32",
) -> Path:
    """Write the method's state dict and its card; returns the card path (`<stem>.json`).

    A directory gets an automatic stem `<method>_<task>_<UTC time>`; `extra["class_names"]` (or a
    `class_names` attribute on the method) is recorded as the card's class names. `storage` names
    the `storage_codec` the tensors are written with (the card records it; loading decodes it).
    """
    target = Path(path_dir_or_stem)
    extra = dict(extra or {})
    if target.is_dir():
        stem = _default_stem(target, method, task)
    else:
        stem = _stem(target)
        stem.parent.mkdir(parents=True, exist_ok=True)
    weights_path, card_path = paths_for(stem)

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in method.state_dict().items()}
    stored = encode(tensors, storage)
    _atomic_write(weights_path, lambda tmp: save_file(stored, tmp, metadata={"format": FORMAT}))

    backbone = method.backbone
    class_names = extra.pop("class_names", None) or getattr(method, "class_names", None)
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method.name,
        "config": method.config.to_dict(),
        "num_classes": method.num_classes,
        "class_names": list(class_names) if class_names else None,
        "backbone": {
            "name": backbone.name,
            "weights_hash": backbone.weights_hash,
            "img_size": list(backbone.layout.img_size),
            "embed_dim": backbone.layout.embed_dim,
            "depth": backbone.layout.depth,
        },
        "task": task,
        "metrics": metrics or {},
        "timings": timings or {},
        "extra": extra,
        "describe": method.describe(),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "storage": storage,
        "weights_file": weights_path.name,
        "weights_sha256": _sha256(weights_path),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    text = json.dumps(_jsonable(card), indent=2)
    _atomic_write(card_path, lambda tmp: Path(tmp).write_text(text))
    return card_path


def rewrite_card(path: str | os.PathLike[str], card: dict[str, Any]) -> Path:
    """Write a changed card beside its unchanged weights (a re-scored module): the weights' hash must
    still match, so a card can never be made to describe other tensors."""
    weights_path, card_path = paths_for(path)
    if card.get("format") != FORMAT or card.get("weights_sha256") != _sha256(weights_path):
        raise CheckpointError(f"'{card_path.name}': a rewritten card must keep its format and its weights' hash.")
    text = json.dumps(_jsonable(card), indent=2)
    _atomic_write(card_path, lambda tmp: Path(tmp).write_text(text))
    return card_path


# --- load -----------------------------------------------------------------------------------------
def read_card(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The card of a checkpoint (stem, .json or .safetensors path), checked for format."""
    _, card_path = paths_for(path)
    if not card_path.is_file():
        raise CheckpointError(f"Checkpoint card '{card_path}' does not exist.")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"Checkpoint card '{card_path.name}' is not valid JSON ({exc}).") from exc
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise CheckpointError(f"'{card_path.name}' is not a steering-module card (format '{FORMAT}').")
    version = card.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"'{card_path.name}' has format version {version!r}; this library reads up to {FORMAT_VERSION}."
        )
    for key in ("method", "config", "num_classes", "backbone"):
        if key not in card:
            raise CheckpointError(f"Checkpoint card '{card_path.name}' lacks the '{key}' entry.")
    return card


def load_module(path: str | os.PathLike[str], backbone: Backbone) -> SteeringMethod:
    """Rebuild the method through the registry on `backbone` and load its tensors (eval mode).

    Refuses a checkpoint made for another backbone (naming both hashes), an unknown method, missing or
    corrupt files and tensors that do not fit, always with a `CheckpointError`.
    """
    weights_path, card_path = paths_for(path)
    card = read_card(path)
    saved = card["backbone"] or {}
    if saved.get("weights_hash") != backbone.weights_hash:
        raise CheckpointError(
            f"'{card_path.name}' was trained on backbone '{saved.get('name')}' "
            f"(weights hash {saved.get('weights_hash')}), but the loaded backbone is '{backbone.name}' "
            f"(weights hash {backbone.weights_hash}). Load the matching backbone first."
        )
    name = card["method"]
    if name not in REGISTRY:
        raise CheckpointError(
            f"'{card_path.name}' holds method '{name}', which this library does not know "
            f"(known: {', '.join(method_names())})."
        )
    if not isinstance(card["config"], dict):
        raise CheckpointError(f"The config in '{card_path.name}' is not a mapping.")
    try:
        config = config_for(name, **card["config"])
        method = build_method(name, backbone, int(card["num_classes"]), config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"The settings in '{card_path.name}' do not build a '{name}': {exc}") from exc

    if not weights_path.is_file():
        raise CheckpointError(f"Checkpoint weights '{weights_path}' do not exist.")
    expected_sha = card.get("weights_sha256")
    if expected_sha and _sha256(weights_path) != expected_sha:
        raise CheckpointError(
            f"'{weights_path.name}' does not match its card (content hash differs): the file was "
            "changed or damaged after saving."
        )
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"Could not read '{weights_path.name}' as safetensors: {exc}") from exc
    try:
        state = decode(state, str(card.get("storage", "float32")), method.state_dict())
    except CodecError as exc:
        raise CheckpointError(f"'{weights_path.name}' does not decode as its card says: {exc}") from exc
    _load_state(method, state, weights_path.name)
    method.class_names = card.get("class_names")  # type: ignore[attr-defined]
    method.card = card  # type: ignore[attr-defined]
    method.eval()
    return method


def _load_state(method: SteeringMethod, state: dict[str, torch.Tensor], label: str) -> None:
    """Strict load that lists every missing, unexpected or mis-shaped tensor."""
    own = method.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shape_bad = sorted(
        f"{k}: file {tuple(state[k].shape)} vs method {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shape_bad:
        parts = [f"The tensors in '{label}' do not fit a '{method.name}' module."]
        if missing:
            parts.append(f"Missing ({len(missing)}): {', '.join(missing[:10])}.")
        if unexpected:
            parts.append(f"Unexpected ({len(unexpected)}): {', '.join(unexpected[:10])}.")
        if shape_bad:
            parts.append(f"Wrong shapes ({len(shape_bad)}): {'; '.join(shape_bad[:6])}.")
        raise CheckpointError(" ".join(parts))
    method.load_state_dict(state, strict=True)
