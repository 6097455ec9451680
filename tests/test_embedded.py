"""End to end on the shipped checkpoint: it loads, its card is complete, and it still measures what its card says."""

from __future__ import annotations

import json

import pytest
import torch

from toast_core.core.backbone import EMBEDDED_CARD, load_backbone
from toast_core.data.scenes import DATA_VERSION, SOURCE_CLASSES
from toast_core.training.eval_backbone import source_quality

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    return load_backbone("embedded", device="cpu")


def test_card_is_complete(embedded) -> None:
    card = json.loads(EMBEDDED_CARD.read_text())
    assert card["data_version"] == DATA_VERSION, "the backbone was trained on another version of the scenes"
    assert card["class_names"] == list(SOURCE_CLASSES)
    for key in ("steps", "batch_size", "seed", "train_minutes", "images_seen"):
        assert key in card["training"], key
    assert card["training"]["train_minutes"] <= 90
    quality = card["quality"]
    for key in ("source_val_map", "object_focus_ratio", "linear_probe"):
        assert key in quality, key
    assert embedded.class_names == tuple(SOURCE_CLASSES)


def test_shipped_checkpoint_reproduces_its_map_on_a_small_slice(embedded) -> None:
    torch.set_num_threads(2)
    card = json.loads(EMBEDDED_CARD.read_text())
    measured = source_quality(embedded, n=160, seed=0)
    prior = 1.9 / len(SOURCE_CLASSES)  # mean labels per scene / classes: what guessing scores
    assert measured["map"] > 2.5 * prior, "the backbone ranks source classes no better than guessing"
    assert abs(measured["map"] - card["quality"]["source_val_map"]) < 0.08
    assert measured["focus_ratio"] > 1.5, "last-layer CLS attention does not prefer objects"
