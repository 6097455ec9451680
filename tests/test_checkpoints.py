"""Steering-module checkpoints: exact round trip, a full card, and clear refusals of bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from toast_core.core.backbone import tiny_fixture_backbone
from toast_core.methods import build_method
from toast_core.storage.checkpoints import (
    FORMAT_VERSION,
    CheckpointError,
    load_module,
    paths_for,
    read_card,
    save_module,
)

CLASSES = 3


@pytest.fixture
def lora(fixture_backbone):
    """A LoRA module with non-zero updates, so a failed load would show in the logits."""
    method = build_method("lora", fixture_backbone, CLASSES, {"targets": ["q", "v", "proj"], "r": 2})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in method.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return method.eval()


def _save(method, where: Path, **kw) -> Path:
    return save_module(
        method, where, task="squares", metrics=kw.get("metrics", {}), timings={}, extra=kw.get("extra", {})
    )


def test_round_trip_and_card(lora, fixture_backbone, fixture_images, tmp_path):
    card_path = _save(
        lora,
        tmp_path / "run1",
        metrics={"val_acc": np.float64(0.75), "curve": torch.tensor([1.0, 0.5])},
        extra={"class_names": ["red", "green", "blue"], "note": "hi"},
    )
    weights, card_file = paths_for(card_path)
    assert card_path == card_file == tmp_path / "run1.json" and weights == tmp_path / "run1.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run1.json", "run1.safetensors"], (
        "no temp files left"
    )
    card = json.loads(card_file.read_text())
    assert card["format_version"] == FORMAT_VERSION and card["method"] == "lora"
    assert card["config"]["targets"] == ["q", "v", "proj"] and card["config"]["r"] == 2
    assert card["backbone"]["weights_hash"] == fixture_backbone.weights_hash
    assert card["backbone"]["name"] == fixture_backbone.name
    assert card["class_names"] == ["red", "green", "blue"] and card["num_classes"] == CLASSES
    assert card["task"] == "squares" and card["metrics"] == {"val_acc": 0.75, "curve": [1.0, 0.5]}
    assert card["extra"] == {"note": "hi"} and card["created"].endswith("+00:00")
    assert card["describe"]["trainable_params"] == lora.trainable_count()

    for path in (card_path, weights, tmp_path / "run1"):  # any of the three names loads
        loaded = load_module(path, fixture_backbone)
        assert loaded.config == lora.config and loaded.class_names == ["red", "green", "blue"]
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(fixture_images).logits, lora(fixture_images).logits)


def test_directory_gets_an_automatic_stem(lora, tmp_path):
    first = _save(lora, tmp_path)
    second = _save(lora, tmp_path)
    assert first.parent == tmp_path and first.name.startswith("lora_squares_") and first != second
    assert all(p.is_file() for p in (*paths_for(first), *paths_for(second)))


def test_other_backbone_is_refused_naming_both_hashes(lora, tmp_path):
    card = _save(lora, tmp_path / "m")
    other = tiny_fixture_backbone(seed=1)
    assert other.weights_hash != lora.backbone.weights_hash
    with pytest.raises(CheckpointError) as err:
        load_module(card, other)
    assert lora.backbone.weights_hash in str(err.value) and other.weights_hash in str(err.value)


def test_missing_and_corrupt_files(lora, fixture_backbone, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_module(tmp_path / "nothing", fixture_backbone)
    card = _save(lora, tmp_path / "m")
    weights, _ = paths_for(card)
    good_card = card.read_text()

    card.write_text(good_card[:40])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_module(card, fixture_backbone)
    card.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a steering-module card"):
        read_card(card)

    card.write_text(good_card)
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="changed or damaged"):
        load_module(card, fixture_backbone)
    no_hash = json.loads(good_card)
    del no_hash["weights_sha256"]
    card.write_text(json.dumps(no_hash))
    weights.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="as safetensors"):
        load_module(card, fixture_backbone)
    weights.unlink()
    with pytest.raises(CheckpointError, match="weights .* do not exist"):
        load_module(card, fixture_backbone)


def _edit_card(card: Path, **changes) -> None:
    data = json.loads(card.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    card.write_text(json.dumps(data))


def test_tensors_that_do_not_fit(lora, fixture_backbone, tmp_path):
    card = _save(lora, tmp_path / "m")
    _edit_card(card, config={"r": 3})  # same keys, other shapes
    with pytest.raises(
        CheckpointError, match=r"Wrong shapes .*adapters\.0_q\.A: file \(2, 32\) vs method \(3, 32\)"
    ):
        load_module(card, fixture_backbone)

    card2 = _save(lora, tmp_path / "n")
    weights, _ = paths_for(card2)
    save_file({"head.weight": torch.zeros(CLASSES, 32), "stray": torch.zeros(2)}, str(weights))
    _edit_card(card2, weights_sha256=None)
    with pytest.raises(CheckpointError, match=r"Missing \(\d+\): adapters.*Unexpected \(1\): stray"):
        load_module(card2, fixture_backbone)


def test_unknown_method_settings_and_versions(lora, fixture_backbone, tmp_path):
    card = _save(lora, tmp_path / "m")
    good = card.read_text()
    _edit_card(card, method="hypernet")
    with pytest.raises(CheckpointError, match="'hypernet'.*known: linear"):
        load_module(card, fixture_backbone)
    card.write_text(good)
    _edit_card(card, config={"rank_r": 2})
    with pytest.raises(CheckpointError, match="rank_r"):
        load_module(card, fixture_backbone)
    card.write_text(good)
    _edit_card(card, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="format version"):
        load_module(card, fixture_backbone)


def test_full_finetune_checkpoint_holds_its_copy(fixture_backbone, fixture_images, tmp_path):
    method = build_method("full", fixture_backbone, CLASSES)
    with torch.no_grad():
        method.model.blocks[0].attn.qkv.weight.add_(0.1)
    card = _save(method.eval(), tmp_path / "full")
    loaded = load_module(card, fixture_backbone)
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, method.model.blocks[0].attn.qkv.weight)
    with torch.no_grad():
        assert torch.equal(loaded(fixture_images).logits, method(fixture_images).logits)
    assert not torch.equal(
        loaded.model.blocks[0].attn.qkv.weight, fixture_backbone.model.blocks[0].attn.qkv.weight
    )
