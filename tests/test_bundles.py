"""Run bundles: export -> import gives the same module (identical logits) in a registry the run
manager reads; bundles from another backbone, tampered, traversing or unlisted members are refused
and leave nothing behind."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from toast_core.frontends.cli import backbone_from_spec
from toast_core.runs import RunConfig, RunManager
from toast_core.runs.registry import list_runs, read_run
from toast_core.storage.bundles import (
    BundleError,
    export_bundle,
    history_csv,
    import_bundle,
    parse_history_csv,
)
from toast_core.storage.checkpoints import load_module


def train_tiny_run(root: Path, backbone, method: str = "lora") -> str:
    """One real, very short run on the fixture backbone (2 steps, 1 image per class)."""
    config = RunConfig(method=method, task="stars", per_class=1, val_per_class=1, device="cpu",
                       train={"steps": 2, "batch_size": 4}, snapshot_every=1, checkpoint_every=0)
    with RunManager(root, backbone, cpu_workers=1, gpu_workers_per_device=0, cpu_threads=1) as manager:
        run_id = manager.submit(config)
        status = manager.wait(run_id, timeout=600)
    assert status.state == "done", status.error
    return run_id


@pytest.fixture(scope="module")
def backbone():
    return backbone_from_spec("fixture")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, backbone) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("runs")
    return root, train_tiny_run(root, backbone)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, registry, backbone) -> Path:
    root, run_id = registry
    return export_bundle(run_id, tmp_path_factory.mktemp("out") / "run.zip", runs_root=root, backbone=backbone)


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a zip member by member; `change(name, data)` returns new bytes, or None to drop it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def test_bundle_members_and_manifest_hashes(bundle, registry):
    root, run_id = registry
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
        for name, entry in manifest["files"].items():
            assert hashlib.sha256(zf.read(name)).hexdigest() == entry["sha256"]
        figures = [n for n in names if n.startswith("figures/")]
        for name in figures:
            assert Image.open(io.BytesIO(zf.read(name))).format == "PNG"
        metrics = parse_history_csv(zf.read("metrics.csv"))
    assert {"module.safetensors", "module.json", "config.json", "metrics.csv", "run.json", "manifest.json"} <= names
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert "figures/training_snapshot.png" in figures
    assert any(n.startswith("figures/cls_stars_test") for n in figures)  # base vs module comparison
    assert manifest["run_id"] == run_id and manifest["method"] == "lora"
    assert [h["step"] for h in metrics] == [1, 2]


def test_round_trip_gives_identical_logits_in_a_readable_registry(bundle, registry, backbone, tmp_path):
    root, run_id = registry
    new_root = tmp_path / "other_runs"
    new_id = import_bundle(bundle, new_root, backbone)
    assert new_id == run_id  # the id is kept when it is free
    original = load_module(root / run_id / "module", backbone)
    imported = load_module(new_root / new_id / "module", backbone)
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(original(x).logits, imported(x).logits)
    # the run manager reads the imported record like one of its own
    with RunManager(new_root, backbone, cpu_workers=0, gpu_workers_per_device=0) as manager:
        status = manager.status(new_id)
        assert status.state == "done" and status.method == "lora" and status.task == "stars"
        assert [h["step"] for h in status.history] == [1, 2]
        assert status.final == read_run(root / run_id).final
        reloaded = manager.load_run_module(new_id)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, original(x).logits)
    assert (new_root / new_id / "figures" / "training_snapshot.png").is_file()
    # a second import of the same bundle gets its own id and leaves the first alone
    second = import_bundle(bundle, new_root, backbone)
    assert second != new_id and second.startswith(run_id)
    assert {r.run_id for r in list_runs(new_root)} == {new_id, second}
    assert not [p for p in new_root.iterdir() if p.name.startswith(".import-")]


def test_bundle_from_another_backbone_is_refused_naming_both_hashes(bundle, backbone, tmp_path):
    other = backbone_from_spec("fixture:1")
    assert other.weights_hash != backbone.weights_hash
    target = tmp_path / "runs"
    with pytest.raises(BundleError) as err:
        import_bundle(bundle, target, other)
    message = str(err.value)
    assert backbone.weights_hash in message and other.weights_hash in message
    assert _entries(target) == []


def test_tampered_bundle_is_refused(bundle, backbone, tmp_path):
    def flip(name: str, data: bytes) -> bytes:
        if name == "module.safetensors":
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data

    bad = _rewrite(bundle, tmp_path / "tampered.zip", flip)
    target = tmp_path / "runs"
    with pytest.raises(BundleError, match="SHA-256"):
        import_bundle(bad, target, backbone)
    assert _entries(target) == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("traversal", "leave the folder"),
        ("absolute", "absolute path"),
        ("unlisted", "not in the manifest"),
        ("missing", "missing"),
        ("no_manifest", "no manifest.json"),
        ("unexpected", "unexpected member"),
    ],
)
def test_malformed_bundles_are_refused(case, message, bundle, backbone, tmp_path):
    extra: dict[str, bytes] = {}

    def change(name: str, data: bytes) -> bytes | None:
        if case == "missing" and name == "metrics.csv":
            return None
        if case == "no_manifest" and name == "manifest.json":
            return None
        return data

    if case == "traversal":
        extra["../evil.json"] = b"{}"
    elif case == "absolute":
        extra["/etc/evil.json"] = b"{}"
    elif case == "unlisted":
        extra["figures/extra.png"] = b"not listed"
    elif case == "unexpected":
        extra["payload.py"] = b"print('hi')"
    bad = _rewrite(bundle, tmp_path / f"{case}.zip", change)
    with zipfile.ZipFile(bad, "a") as zf:
        for name, data in extra.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    target = tmp_path / "runs"
    with pytest.raises(BundleError, match=message):
        import_bundle(bad, target, backbone)
    assert _entries(target) == []


def test_symlink_member_is_refused(bundle, backbone, tmp_path):
    bad = _rewrite(bundle, tmp_path / "link.zip", lambda n, d: d)
    info = zipfile.ZipInfo("figures/link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(BundleError, match="symbolic link"):
        import_bundle(bad, tmp_path / "runs", backbone)


def test_export_refuses_a_run_that_is_not_done(registry, tmp_path):
    root, run_id = registry
    status_path = root / run_id / "status.json"
    broken = tmp_path / "runs" / run_id
    broken.mkdir(parents=True)
    status = json.loads(status_path.read_text())
    status["state"] = "failed"
    (broken / "status.json").write_text(json.dumps(status))
    with pytest.raises(BundleError, match="failed"):
        export_bundle(broken, tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


def test_history_csv_round_trip():
    history = [{"step": 1, "loss": 2.5, "lr": 0.001}, {"step": 2, "loss": 2.25, "lr": 0.0005, "val_acc": 0.5}]
    assert parse_history_csv(history_csv(history)) == history
