"""Run bundles: one zip that carries a finished run to another machine, and back into a registry.

A bundle holds the run's steering module (`module.safetensors` + its card `module.json`), its
`config.json`, the run record `run.json`, its history as `metrics.csv`, attention figures
(`figures/*.png`) and `manifest.json` with the SHA-256 of every other member. Importing trusts
nothing: member names are checked for traversal and links (the same checks as dataset zips, from
`data.zip_import`), every hash is verified while the bytes are read, the module must belong to the
loaded backbone (same weights hash), and it is loaded with `checkpoints.load_module` (safetensors,
never unpickled) before the run appears, atomically, in the registry.

Run lookup (`find_run`, `read_run`) is the registry's (`runs.registry`); the comparison figures are
rendered by `compare.comparison_figures`. This module imports both and neither imports it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
import zipfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from toast_core.core.backbone import Backbone
from toast_core.data.zip_import import ZipImportError, _safe_parts
from toast_core.runs import (
    CONFIG_FILE,
    HISTORY_FILE,
    MODULE_STEM,
    SNAPSHOT_FILE,
    STATUS_FILE,
    RunStatus,
)
from toast_core.runs import FORMAT as RUN_FORMAT
from toast_core.runs import FORMAT_VERSION as RUN_FORMAT_VERSION
from toast_core.runs.record import _STATUS_FIELDS
from toast_core.runs.registry import find_run, read_run
from toast_core.storage.checkpoints import CheckpointError, load_module, paths_for, read_card
from toast_core.views.compare import comparison_figures

BUNDLE_FORMAT = "toast-run-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
MODULE_WEIGHTS = MODULE_STEM + ".safetensors"
MODULE_CARD = MODULE_STEM + ".json"
RUN_RECORD = "run.json"
METRICS = "metrics.csv"
FIGURES_DIR = "figures"
REQUIRED = (MODULE_WEIGHTS, MODULE_CARD, CONFIG_FILE)
OPTIONAL = (RUN_RECORD, METRICS)
MAX_BUNDLE_BYTES = 2 * 1024**3  # unpacked; a full fine-tune of a ViT-B is ~350 MB
_FIGURE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}\.png$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}$")
_CHUNK = 1 << 20


class BundleError(RuntimeError):
    """A bundle could not be written or was refused; the message says why, for the user."""


# --- export ---------------------------------------------------------------------------------------
def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def history_csv(history: Sequence[dict[str, Any]]) -> bytes:
    """History entries as CSV: `step` first, then every other key in first-seen order."""
    keys: list[str] = ["step"]
    for entry in history:
        keys += [k for k in entry if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in history:
        writer.writerow({k: ("" if entry.get(k) is None else entry.get(k)) for k in keys})
    return buf.getvalue().encode()


def parse_history_csv(data: bytes) -> list[dict[str, Any]]:
    """`history_csv` back to entries: `step` as int, numbers as float, empty cells left out."""
    rows = []
    for row in csv.DictReader(io.StringIO(data.decode("utf-8"))):
        entry: dict[str, Any] = {}
        for key, value in row.items():
            if key is None or value in (None, ""):
                continue
            try:
                entry[key] = int(value) if key == "step" else float(value)
            except ValueError:
                entry[key] = value
        rows.append(entry)
    return rows


def _png(array: np.ndarray | Any) -> bytes:
    from PIL import Image

    image = array if isinstance(array, Image.Image) else Image.fromarray(np.asarray(array))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _snapshot_figure(run_dir: Path) -> bytes | None:
    """The last attention snapshot taken during training (CLS attention of the probe image) as a heat map."""
    path = run_dir / SNAPSHOT_FILE
    if not path.is_file():
        return None
    from toast_core.views.viz import heatmap_image, normalise_maps

    grid = np.load(path, allow_pickle=False)
    if grid.ndim != 2 or grid.size == 0:
        return None
    map01 = normalise_maps([grid])[0]
    scale = max(1, 192 // max(grid.shape))
    return _png(heatmap_image(map01, (grid.shape[0] * scale, grid.shape[1] * scale), smooth=False))


def export_bundle(
    run: str | os.PathLike[str],
    out_zip: str | os.PathLike[str],
    *,
    runs_root: str | os.PathLike[str] | None = None,
    backbone: Backbone | None = None,
    figures: bool = True,
) -> Path:
    """Write a finished run (folder path, or run id in `runs_root`) as one bundle zip; returns its path.

    With a `backbone` matching the module, the bundle gets comparison figures (base vs this module on
    built-in test scenes); the training snapshot figure needs no backbone. The zip is written to a
    temporary file and renamed into place, so a failure never leaves half a bundle.
    """
    run_dir = find_run(run, [runs_root] if runs_root is not None else [])
    status = read_run(run_dir)
    weights_path, card_path = paths_for(run_dir / MODULE_STEM)
    if status.state != "done" or not weights_path.is_file() or not card_path.is_file():
        raise BundleError(f"Run '{status.run_id}' is {status.state}; only a done run with a saved module can be exported.")
    card = read_card(card_path)
    members: dict[str, bytes] = {
        MODULE_WEIGHTS: weights_path.read_bytes(),
        MODULE_CARD: card_path.read_bytes(),
        CONFIG_FILE: json.dumps(status.config, indent=1).encode(),
        METRICS: history_csv(status.history),
    }
    record = {f.name: getattr(status, f.name) for f in dataclasses.fields(status) if f.name in _STATUS_FIELDS}
    record.update(traceback=None, note=None)
    members[RUN_RECORD] = json.dumps(record, indent=1, allow_nan=False).encode()
    if figures:
        snap = _snapshot_figure(run_dir)
        if snap is not None:
            members[f"{FIGURES_DIR}/training_snapshot.png"] = snap
        if backbone is not None and backbone.weights_hash == (card.get("backbone") or {}).get("weights_hash"):
            module = load_module(run_dir / MODULE_STEM, backbone)
            module.label = status.name  # type: ignore[attr-defined]
            for name, data in comparison_figures(module, backbone, status.task).items():
                members[f"{FIGURES_DIR}/{name}"] = data
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": status.run_id,
        "name": status.name,
        "method": status.method,
        "task": status.task,
        "backbone": card.get("backbone"),
        "files": {name: {"sha256": _sha256_bytes(data), "bytes": len(data)} for name, data in sorted(members.items())},
    }
    out = Path(out_zip)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=1))
            for name, data in sorted(members.items()):
                zf.writestr(name, data)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# --- import ---------------------------------------------------------------------------------------
def _member_name(info: zipfile.ZipInfo) -> str | None:
    """The member's checked name ('module.json', 'figures/x.png'), None for a directory entry."""
    try:
        parts = _safe_parts(info.filename)
    except ZipImportError as exc:
        raise BundleError(str(exc)) from None
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise BundleError(f"Refused: member '{info.filename}' is a symbolic link.")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise BundleError(f"Refused: member '{info.filename}' is not a regular file.")
    if info.flag_bits & 0x1:
        raise BundleError(f"Refused: member '{info.filename}' is encrypted.")
    if info.is_dir() or not parts:
        return None
    name = "/".join(parts)
    allowed = name in (MANIFEST, *REQUIRED, *OPTIONAL) or (
        len(parts) == 2 and parts[0] == FIGURES_DIR and _FIGURE_NAME.match(parts[1])
    )
    if not allowed:
        raise BundleError(f"Refused: unexpected member '{info.filename}' (a run bundle holds only the module, "
                          "its card, config, run record, metrics, figures/*.png and the manifest).")
    return name


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """Read a member, enforcing its declared size (and the bundle limit) on the bytes actually produced,
    so a header that lies cannot inflate past what the size check above allowed."""
    chunks, produced = [], 0
    with zf.open(info) as src:
        while chunk := src.read(_CHUNK):
            produced += len(chunk)
            if produced > info.file_size or produced > limit:
                raise BundleError(f"Refused: member '{info.filename}' is larger than declared or allowed.")
            chunks.append(chunk)
    return b"".join(chunks)


def _read_manifest(zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo]) -> dict[str, Any]:
    if MANIFEST not in infos:
        raise BundleError(f"Refused: the zip has no {MANIFEST}; it is not a run bundle.")
    try:
        manifest = json.loads(_read_member(zf, infos[MANIFEST], 1 << 20))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"Refused: {MANIFEST} is not valid JSON ({exc}).") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"Refused: {MANIFEST} is not a run-bundle manifest (format '{BUNDLE_FORMAT}').")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_VERSION:
        raise BundleError(f"Refused: bundle format version {version!r}; this library reads up to {BUNDLE_VERSION}.")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()
    ):
        raise BundleError(f"Refused: {MANIFEST} lacks the file list with SHA-256 hashes.")
    listed, present = set(files), set(infos) - {MANIFEST}
    if present - listed:
        raise BundleError(f"Refused: member(s) not in the manifest: {', '.join(sorted(present - listed))}.")
    if listed - present:
        raise BundleError(f"Refused: member(s) listed in the manifest are missing: {', '.join(sorted(listed - present))}.")
    missing = [n for n in REQUIRED if n not in present]
    if missing:
        raise BundleError(f"Refused: the bundle lacks {', '.join(missing)}.")
    return manifest


def _check_backbone(card_bytes: bytes, backbone: Backbone) -> dict[str, Any]:
    try:
        card = json.loads(card_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"Refused: {MODULE_CARD} is not valid JSON ({exc}).") from exc
    saved = card.get("backbone") if isinstance(card, dict) else None
    if not isinstance(saved, dict):
        raise BundleError(f"Refused: {MODULE_CARD} does not say which backbone the module belongs to.")
    if saved.get("weights_hash") != backbone.weights_hash:
        raise BundleError(
            f"Refused: this bundle's module was trained on backbone '{saved.get('name')}' (weights hash "
            f"{saved.get('weights_hash')}), but the loaded backbone is '{backbone.name}' (weights hash "
            f"{backbone.weights_hash}). Import it with the matching backbone."
        )
    return card


def _new_run_id(root: Path, wanted: Any) -> str:
    base = str(wanted) if isinstance(wanted, str) and _RUN_ID.match(wanted) else None
    if base and not (root / base).exists():
        return base
    stem = base or "imported"
    return f"{stem}-import-{uuid.uuid4().hex[:6]}"


def _status_record(
    run_id: str, manifest: dict[str, Any], card: dict[str, Any], record: dict[str, Any] | None,
    history_len: int, source: str,
) -> dict[str, Any]:
    """status.json for the imported run: the exported record where it fits, the facts that must hold
    (done, its checkpoint, its backbone) set here."""
    now = time.time()
    status: dict[str, Any] = {k: v for k, v in (record or {}).items() if k in _STATUS_FIELDS}
    status.update(
        run_id=run_id,
        name=str(status.get("name") or manifest.get("name") or run_id),
        state="done",
        method=str(card.get("method")),
        task=str(card.get("task") or manifest.get("task") or ""),
        checkpoint=f"{run_id}/{MODULE_CARD}",
        checkpoint_last_step=None,
        error=None,
        error_kind=None,
        traceback=None,
        eta_s=None,
        backbone={"name": card["backbone"].get("name"), "weights_hash": card["backbone"].get("weights_hash")},
        note=f"imported from bundle {source}",
        updated=now,
    )
    status.setdefault("created", now)
    status.setdefault("final", card.get("metrics") or {})
    status.setdefault("timings", card.get("timings") or {})
    status.setdefault("class_names", card.get("class_names"))
    status.setdefault("num_classes", card.get("num_classes"))
    RunStatus(**status)  # the registry must be able to read it back
    status.update(format=RUN_FORMAT, format_version=RUN_FORMAT_VERSION, history_len=history_len)
    return status


def import_bundle(
    zip_path: str | os.PathLike[str],
    runs_root: str | os.PathLike[str],
    backbone: Backbone,
    *,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> str:
    """Validate a bundle and add its run to the registry at `runs_root`; returns the new run id.

    Refused with a `BundleError` (nothing written): a member outside the bundle layout, a path that
    climbs out, a link, a hash that differs from the manifest, a module from another backbone
    (both weights hashes named) or one whose tensors do not load. The run folder is assembled in a
    dot folder (which the registry ignores) and renamed into place in one step.
    """
    source = Path(zip_path)
    if not source.is_file():
        raise BundleError(f"No bundle file at '{source}'.")
    root = Path(runs_root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"'{source.name}' is not a zip archive: {exc}") from exc
    with zf:
        infos: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            name = _member_name(info)
            if name is None:
                continue
            if name in infos:
                raise BundleError(f"Refused: member '{name}' appears twice.")
            infos[name] = info
        declared = sum(i.file_size for i in infos.values())
        if declared > max_bytes:
            raise BundleError(f"Refused: the bundle unpacks to {declared / 2**20:.0f} MB (limit {max_bytes / 2**20:.0f} MB).")
        manifest = _read_manifest(zf, infos)
        data: dict[str, bytes] = {}
        try:
            for name, info in infos.items():
                if name == MANIFEST:
                    continue
                blob = _read_member(zf, info, max_bytes)
                if _sha256_bytes(blob) != manifest["files"][name]["sha256"]:
                    raise BundleError(
                        f"Refused: '{name}' does not match the manifest's SHA-256: the bundle was changed or damaged."
                    )
                data[name] = blob
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise BundleError(f"'{source.name}' is damaged: {exc}") from exc
    card = _check_backbone(data[MODULE_CARD], backbone)
    try:
        config = json.loads(data[CONFIG_FILE])
        record = json.loads(data[RUN_RECORD]) if RUN_RECORD in data else None
        history = parse_history_csv(data[METRICS]) if METRICS in data else []
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise BundleError(f"Refused: the run's config, record or metrics cannot be read ({exc}).") from exc
    if not isinstance(config, dict) or (record is not None and not isinstance(record, dict)):
        raise BundleError(f"Refused: {CONFIG_FILE} / {RUN_RECORD} must hold JSON objects.")

    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        (staging / MODULE_WEIGHTS).write_bytes(data[MODULE_WEIGHTS])
        (staging / MODULE_CARD).write_bytes(data[MODULE_CARD])
        try:
            load_module(staging / MODULE_STEM, backbone)  # safetensors only; checks shapes and the card's hash
        except CheckpointError as exc:
            raise BundleError(f"Refused: the module does not load: {exc}") from exc
        for name, blob in data.items():
            if name.startswith(FIGURES_DIR + "/"):
                (staging / FIGURES_DIR).mkdir(exist_ok=True)
                (staging / name).write_bytes(blob)
        if METRICS in data:
            (staging / METRICS).write_bytes(data[METRICS])
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        (staging / HISTORY_FILE).write_text(json.dumps(history, indent=1))
        for _attempt in range(5):
            run_id = _new_run_id(root, manifest.get("run_id"))
            status = _status_record(run_id, manifest, card, record, len(history), source.name)
            (staging / STATUS_FILE).write_text(json.dumps(status, indent=1, allow_nan=False))
            try:
                os.rename(staging, root / run_id)  # atomic; fails if the id was taken meanwhile
            except OSError:
                if (root / run_id).exists():
                    continue
                raise
            return run_id
        raise BundleError("Could not find a free run id for the imported run.")
    except (TypeError, ValueError) as exc:
        raise BundleError(f"Refused: the run record does not fit this library ({exc}).") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def bundle_members(zip_path: str | os.PathLike[str]) -> list[str]:
    """The member names of a bundle (for listings and tests)."""
    with zipfile.ZipFile(zip_path) as zf:
        return [i.filename for i in zf.infolist()]


__all__ = [
    "BUNDLE_FORMAT",
    "BundleError",
    "bundle_members",
    "export_bundle",
    "history_csv",
    "import_bundle",
    "parse_history_csv",
]
