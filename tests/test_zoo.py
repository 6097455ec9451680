"""The lecture zoo: recipes, deterministic builds, cards, verify, the catalog and the focus measure
that tells "on the deciding object" from "on any object"."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from toast_core.core.backbone import tiny_fixture_backbone
from toast_core.core.stats import bootstrap_interval, ratio_of_means, wilson_interval
from toast_core.methods import build_method, method_names
from toast_core.storage.checkpoints import load_module, save_module
from toast_core.training.recipes import RECIPES, TEST_PER_CLASS, default_for, recipe
from toast_core.training.zoo.build import ZOO_DIR, build, round_to_storage
from toast_core.training.zoo.catalog import find_entry, first_view, load_entry, zoo_entries
from toast_core.training.zoo.verify import result_line, verify
from toast_core.views.objects import focus_report

SMOKE_ENTRIES = ("linear", "lora", "full", "fewshot_lora_fort", "transfer_copy")


@pytest.fixture(scope="module")
def backbone():
    return tiny_fixture_backbone()


@pytest.fixture(scope="module")
def smoke_zoo(tmp_path_factory, backbone):
    root = tmp_path_factory.mktemp("zoo")
    cards = build(["stars"], SMOKE_ENTRIES, root=root, backbone=backbone, smoke=True, threads=1, log=lambda _: None)
    return root, cards


# --- recipes -------------------------------------------------------------------------------------------
def test_every_recipe_builds_its_registry_method(backbone):
    for task, table in RECIPES.items():
        for r in table.values():
            assert r.method in method_names(), (task, r.entry)
            m = build_method(r.method, backbone, 3, {**r.method_config, "seed": 0})
            assert m.trainable_count() > 0
            cfg = r.train_config(seed=3)
            assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.seed) == (r.steps, r.batch_size, r.lr, 3)


def test_recipe_lookup_names_the_known_entries():
    assert recipe("glyphs", "lora").method == "lora"
    assert default_for("stars", "vpt").entry == "vpt_shallow"
    assert default_for("stars", "fort_full") is None  # episode recipes are not task defaults
    with pytest.raises(KeyError, match="Recipes: linear"):
        recipe("glyphs", "nope")


def test_test_split_is_at_least_500_images():
    from toast_core.data.scenes import TASKS

    assert all(TEST_PER_CLASS * len(spec.classes) >= 500 for spec in TASKS.values())


# --- build / verify ------------------------------------------------------------------------------------
def test_build_writes_cards_with_recipe_seed_and_intervals(smoke_zoo, backbone):
    root, cards = smoke_zoo
    assert len(cards) == len(SMOKE_ENTRIES)
    card = json.loads((root / "stars" / "lora.json").read_text())
    zoo = card["extra"]["zoo"]
    assert zoo["recipe"]["entry"] == "lora" and zoo["seed"] == 0 and zoo["smoke"] is True
    assert card["backbone"]["weights_hash"] == backbone.weights_hash
    test = zoo["test"]
    assert test["acc_lo"] <= test["acc"] <= test["acc_hi"] and test["n"] == 12
    for key in ("focus_share", "focus_ratio", "object_share", "object_chance"):
        assert f"{key}_lo" in test and test[f"{key}_lo"] <= test[key] + 1e-12 <= test[f"{key}_hi"] + 2e-12
    episode = json.loads((root / "stars" / "fewshot_lora_fort.json").read_text())["extra"]["zoo"]
    assert len(episode["episode"]["classes"]) == 3 and episode["prompt_on_object"] is not None


def test_each_entry_trains_on_its_recipes_split_size():
    """Full fine-tuning validated better on more images than the others need: the build renders one
    train split per size (val and test once) and an episode draws from the zoo's default split."""
    import dataclasses

    from toast_core.training.recipes import TRAIN_PER_CLASS
    from toast_core.training.zoo.train_entry import ZooSplits

    small = dataclasses.replace(recipe("stars", "lora"), per_class=2)
    larger = dataclasses.replace(recipe("stars", "full"), per_class=3)
    assert recipe("stars", "fewshot_full").train_per_class == TRAIN_PER_CLASS
    assert larger.train_per_class == 3
    cache = ZooSplits("stars")
    a, b, again = cache.for_recipe(small), cache.for_recipe(larger), cache.for_recipe(small)
    classes = a["train"].num_classes
    assert (len(a["train"]), len(b["train"])) == (2 * classes, 3 * classes)
    assert again["train"] is a["train"] and b["val"] is a["val"] and cache.test is a["test"]
    assert a["train"].class_names == b["train"].class_names


def test_a_larger_validation_split_begins_with_the_zoos():
    """A sweep may rank close trials on more validation images; the zoo's own images stay its first."""
    from toast_core.training.zoo.train_entry import ZooSplits, zoo_split

    larger = ZooSplits("stars", val_per_class=3).val
    zoo_val = zoo_split("stars", "val", per_class=1)
    assert len(larger) == 3 * len(zoo_val)
    assert torch.equal(larger.images[: len(zoo_val)], zoo_val.images)
    assert torch.equal(larger.labels[: len(zoo_val)], zoo_val.labels)


def test_build_is_deterministic_and_keeps_current_cards(smoke_zoo, backbone, tmp_path):
    root, _ = smoke_zoo
    again = build(["stars"], ("lora", "full"), root=tmp_path, backbone=backbone, smoke=True, threads=1, log=lambda _: None)
    for path in again:
        a = json.loads(path.read_text())
        b = json.loads((root / "stars" / path.name).read_text())
        assert a["weights_sha256"] == b["weights_sha256"]
        assert a["extra"]["zoo"]["test"] == b["extra"]["zoo"]["test"]
    said: list[str] = []
    build(["stars"], ("lora",), root=tmp_path, backbone=backbone, smoke=True, threads=1, log=said.append)
    assert said == ["[stars] lora: card is current, kept"]


def test_a_card_with_older_scores_is_rescored_without_retraining(smoke_zoo, backbone, tmp_path):
    import shutil

    import toast_core.training.zoo.build as zb

    root, _ = smoke_zoo
    shutil.copytree(root, tmp_path / "zoo")
    stem = tmp_path / "zoo" / "stars" / "lora"
    card = json.loads(stem.with_suffix(".json").read_text())
    faith = card["extra"]["zoo"].pop("faithfulness")
    card["extra"]["zoo"]["scoring"] = zb.SCORING_VERSION - 1
    stem.with_suffix(".json").write_text(json.dumps(card))
    weights = stem.with_suffix(".safetensors").read_bytes()
    said: list[str] = []
    build(["stars"], ("lora",), root=tmp_path / "zoo", backbone=backbone, smoke=True, threads=1, log=said.append)
    assert len(said) == 1 and "re-scored" in said[0]
    assert stem.with_suffix(".safetensors").read_bytes() == weights
    again = json.loads(stem.with_suffix(".json").read_text())["extra"]["zoo"]
    assert again["scoring"] == zb.SCORING_VERSION and again["faithfulness"] == faith
    assert again["test"] == card["extra"]["zoo"]["test"]
    assert faith["n"] == 12 and faith["gap_lo"] <= faith["gap"] <= faith["gap_hi"]


def test_a_rewritten_card_must_keep_its_weights_hash(smoke_zoo, tmp_path):
    from toast_core.storage.checkpoints import CheckpointError, rewrite_card

    root, _ = smoke_zoo
    card = json.loads((root / "stars" / "lora.json").read_text())
    card["weights_sha256"] = "0" * 64
    with pytest.raises(CheckpointError, match="weights' hash"):
        rewrite_card(root / "stars" / "lora", card)


def test_verify_rescoring_matches_the_cards(smoke_zoo, backbone):
    root, _ = smoke_zoo
    summary = verify(backbone, root, log=lambda _: None)
    assert summary["modules"] == len(SMOKE_ENTRIES) and summary["tasks"] == 1
    assert summary["max_card_drift"] == 0.0
    line = result_line(summary)
    assert line.startswith("RESULT modules=5 tasks=1 ") and "linear_acc_stars=" in line


def test_verify_catches_a_module_that_differs_from_its_card(smoke_zoo, backbone, tmp_path):
    import shutil

    root, _ = smoke_zoo
    shutil.copytree(root, tmp_path / "zoo")
    card_path = tmp_path / "zoo" / "stars" / "linear.json"
    card = json.loads(card_path.read_text())
    card["extra"]["zoo"]["test"]["acc"] = card["extra"]["zoo"]["test"]["acc"] + 0.25
    card_path.write_text(json.dumps(card))
    summary = verify(backbone, tmp_path / "zoo", log=lambda _: None)
    assert summary["max_card_drift"] == pytest.approx(0.25)


def test_smoke_build_never_writes_the_shipped_zoo(backbone):
    with pytest.raises(ValueError, match="never writes the shipped zoo"):
        build(["stars"], ("linear",), root=ZOO_DIR, backbone=backbone, smoke=True)


def test_large_modules_are_scored_as_stored(backbone, tmp_path, monkeypatch):
    """The zoo scores a large module after its storage round trip: what it scored is what loads."""
    import toast_core.storage.storage_codec as codec
    import toast_core.training.zoo.build as zb

    small = build_method("lora", backbone, 3)
    assert round_to_storage(small) == "float32"
    # the fixture backbone is tiny: lower the thresholds so its matrices take the int8 path
    monkeypatch.setattr(zb, "COMPACT_ABOVE_PARAMS", 10)
    monkeypatch.setattr(codec, "_MIN_NUMEL", 64)
    monkeypatch.setattr(codec, "_MIN_ROWS", 4)
    full = build_method("full", backbone, 3)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    before = {k: v.clone() for k, v in full.state_dict().items()}
    assert round_to_storage(full) == "int8-rows"
    rounded = full.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], rounded[k])]
    assert changed, "the round trip must actually quantise"
    card = save_module(full, tmp_path / "full", task="t", storage="int8-rows")
    loaded = load_module(card, backbone)
    assert all(torch.equal(rounded[k], v) for k, v in loaded.state_dict().items())


# --- catalog -------------------------------------------------------------------------------------------
def test_catalog_lists_loads_and_filters_by_backbone(smoke_zoo, backbone):
    root, _ = smoke_zoo
    entries = zoo_entries(backbone, root)
    assert [e.entry for e in entries] == ["linear", "full", "lora", "fewshot_lora_fort", "transfer_copy"]
    e = find_entry("zoo:stars/lora", backbone, root)
    module = load_entry(e, backbone)
    assert module.name == "lora" and "zoo" in module.label
    assert [x.entry for x in first_view(backbone, "stars", root)] == ["linear", "full", "lora"]
    assert [x.entry for x in zoo_entries(backbone, root, "glyphs")] == []
    other = tiny_fixture_backbone(seed=1)
    assert other.weights_hash != backbone.weights_hash and zoo_entries(other, root) == []
    with pytest.raises(KeyError, match="No zoo module 'stars/nope'"):
        find_entry("zoo:stars/nope", backbone, root)


# --- statistics and the object focus measure -------------------------------------------------------------
def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_bootstrap_interval_is_seeded_and_covers_the_statistic():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.2, 0.4, 200), rng.uniform(0.1, 0.2, 200)
    lo, hi = bootstrap_interval((a, b), ratio_of_means, 300, seed=1)
    assert lo < ratio_of_means(a, b) < hi
    assert (lo, hi) == bootstrap_interval((a, b), ratio_of_means, 300, seed=1)


def _scene_masks(n: int = 6):
    """8x8 images: the deciding object in the top-left 4x4 patch block, a distractor bottom-right."""
    target = np.zeros((n, 8, 8), bool)
    target[:, :4, :4] = True
    objects = target.copy()
    objects[:, 4:, 4:] = True
    return target, objects


def test_object_share_tells_the_right_object_from_any_object():
    target, objects = _scene_masks()
    on_target = np.zeros((6, 2, 2))
    on_target[:, 0, 0] = 1.0
    on_both = np.zeros((6, 2, 2))
    on_both[:, 0, 0] = on_both[:, 1, 1] = 0.5
    uniform = np.ones((6, 2, 2))
    right = focus_report(on_target, target, objects)
    any_obj = focus_report(on_both, target, objects)
    flat = focus_report(uniform, target, objects)
    assert right["object_share"] == pytest.approx(1.0)
    assert any_obj["object_share"] == pytest.approx(0.5) == any_obj["object_chance"]
    assert flat["object_share"] == pytest.approx(flat["object_chance"]) == pytest.approx(0.5)
    # the area ratio alone cannot tell "on any object" from "on the right one" by much: both beat chance
    assert any_obj["focus_ratio"] == pytest.approx(2.0) and right["focus_ratio"] == pytest.approx(4.0)
    assert any_obj["objects_ratio"] == pytest.approx(2.0)
    assert "object_share" not in focus_report(on_target, target)


def test_task_split_carries_every_objects_mask():
    from toast_core.data.scenes import make_task_split

    data = make_task_split("glyphs", "val", per_class=1, seed=0, size=48)
    assert data.objects is not None and data.objects.shape == data.masks.shape
    assert bool((data.objects | ~data.masks).all())  # the deciding object is an object
    assert int(data.objects.sum()) > int(data.masks.sum())  # and there are distractors
    part = data.subset([0, 2])
    assert torch.equal(part.objects, data.objects[[0, 2]])


def test_presets_are_picked_by_rule_and_stored(smoke_zoo, backbone):
    from toast_core.training.zoo.presets import pick_presets, read_presets, write_presets

    root, _ = smoke_zoo
    from toast_core.training.zoo.presets import _scores

    picked = pick_presets(backbone, "stars", root)
    scores, _ = _scores(backbone, "stars", root)
    stack = np.stack([v["focus"] for v in scores.values()])
    spread = next(p for p in picked if p.key == "stars-spread")
    assert spread.index == int(np.argmax(stack.max(axis=0) - stack.min(axis=0)))
    assert all(0 <= p.index < 64 and p.note and p.criterion for p in picked)
    write_presets(backbone, ["stars"], root)
    assert read_presets(backbone.weights_hash, root) == picked
    assert read_presets("another-backbone", root) == []


# --- task-dependent attention ----------------------------------------------------------------------
def test_mixed_scenes_hold_a_star_and_a_digit_with_their_masks():
    from toast_core.data.mixed import make_mixed_split

    d = make_mixed_split(12, size=48)
    assert d.images.shape == (12, 3, 48, 48) and len(d) == 12
    assert d.star_labels.tolist() == [i % 8 for i in range(12)]
    assert d.digit_labels.tolist() == [(i // 8) % 10 for i in range(12)]
    assert bool((d.star_masks.flatten(1).sum(1) > 0).all()) and bool((d.digit_masks.flatten(1).sum(1) > 0).all())
    assert not bool((d.star_masks & d.digit_masks).any())
    assert bool((d.objects | ~(d.star_masks | d.digit_masks)).all())


def test_task_switch_is_zero_for_the_linear_probe(tmp_path, backbone):
    from toast_core.training.zoo.task_switch import task_switch

    build(["stars", "glyphs"], ("linear", "lora"), root=tmp_path, backbone=backbone, smoke=True, threads=1,
          log=lambda _: None)
    rows = {r["entry"]: r for r in task_switch(backbone, n=8, root=tmp_path)}
    assert set(rows) == {"lora", "linear"}
    assert rows["linear"]["switch"] == 0.0 and rows["linear"]["switch_ci"] == 0.0  # one shared attention
    r = rows["lora"]
    expected = (r["star_focus_stars"] - r["star_focus_glyphs"]) + (r["digit_focus_glyphs"] - r["digit_focus_stars"])
    assert r["switch"] == pytest.approx(expected) and r["n"] == 8


def test_the_switch_preset_is_the_scene_where_the_top_switching_method_switches_most(tmp_path, backbone):
    from toast_core.data.mixed import MIXED_TASK, make_mixed_split
    from toast_core.training.zoo.presets import CANDIDATES, pick_switch_presets, read_presets, write_presets
    from toast_core.training.zoo.task_switch import switch_scores

    build(["stars", "glyphs"], ("linear", "lora", "bitfit"), root=tmp_path, backbone=backbone, smoke=True, threads=1,
          log=lambda _: None)  # three task modules: a task's presets need at least three
    scores = switch_scores(backbone, make_mixed_split(CANDIDATES, 0), tmp_path)
    best = max(scores, key=lambda e: float(scores[e]["switch"].mean()))
    (preset,) = pick_switch_presets(backbone, tmp_path)
    assert preset.task == MIXED_TASK and preset.split == "test" and preset.view == "cls"
    assert preset.index == int(np.argmax(scores[best]["switch"])) and best in preset.criterion
    # writing one task's presets keeps the other task's, and the mixed preset is stored beside them
    write_presets(backbone, ["stars"], tmp_path)
    stars = [p for p in read_presets(backbone.weights_hash, tmp_path) if p.task == "stars"]
    write_presets(backbone, ["glyphs"], tmp_path)
    stored = read_presets(backbone.weights_hash, tmp_path)
    assert [p for p in stored if p.task == "stars"] == stars and stars
    assert any(p.task == "glyphs" for p in stored) and [p for p in stored if p.task == MIXED_TASK] == [preset]


def test_a_mixed_scene_reference_is_the_mixed_split_with_the_chosen_focus():
    from toast_core.data.mixed import make_mixed_split
    from toast_core.views.compare import open_image, scene_image

    d = make_mixed_split(6, 0, size=48)
    star = scene_image("mixed", "test", 5, size=48)
    digit = scene_image("mixed", "test", 5, size=48, focus="digit")
    assert np.array_equal(star.rgb, d.images[5].permute(1, 2, 0).numpy()) and np.array_equal(star.rgb, digit.rgb)
    assert np.array_equal(star.mask, d.star_masks[5].numpy()) and np.array_equal(digit.mask, d.digit_masks[5].numpy())
    assert np.array_equal(star.objects, d.objects[5].numpy()) and "(stars)" in star.true_label
    assert open_image("scene:mixed:test:5", size=48).name == "mixed/test/5"
    with pytest.raises(ValueError, match="test set only"):
        scene_image("mixed", "train", 5)
    with pytest.raises(ValueError, match="'star' or 'digit'"):
        scene_image("mixed", "test", 5, focus="letter")


def test_a_card_is_current_while_it_records_every_recipe_field():
    """A field retired from Recipe (it never changed training) leaves old cards current; a changed or
    missing field makes a card stale."""
    import dataclasses

    from toast_core.training.zoo.build import _jsonable_recipe, _records_recipe

    r = recipe("stars", "transfer_copy")
    card = _jsonable_recipe(r)
    assert _records_recipe(card, r)
    assert _records_recipe({**card, "teacher": "full", "expected_s": 0.0}, r)  # retired fields
    assert not _records_recipe({**card, "steps": r.steps + 1}, r)
    assert not _records_recipe({k: v for k, v in card.items() if k != "lr"}, r)
    assert not _records_recipe(_jsonable_recipe(dataclasses.replace(r, lr=r.lr * 2)), r)
    assert not _records_recipe(None, r)


def test_reproduce_rebuilds_elsewhere_and_finds_the_cards_exact(smoke_zoo, backbone, tmp_path):
    """`zoo reproduce` retrains from the seeds into another folder: same machine, same numbers and
    weights; a card whose numbers were changed is caught; the checked folder is never written."""
    from toast_core.training.zoo.reproduce import reproduce

    root, _ = smoke_zoo
    before = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    summary = reproduce(["stars"], ["linear", "lora"], root=root, into=tmp_path / "again", backbone=backbone,
                        smoke=True, log=lambda _: None)
    assert (summary["reproduced"], summary["missing"], summary["exact"], summary["identical_weights"]) == (2, 0, 2, 2)
    assert summary["max_repro_drift"] == 0.0
    assert {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == before

    tampered = tmp_path / "tampered"
    (tampered / "stars").mkdir(parents=True)
    for name in ("lora.json", "lora.safetensors"):
        (tampered / "stars" / name).write_bytes((root / "stars" / name).read_bytes())
    card = json.loads((tampered / "stars" / "lora.json").read_text())
    card["extra"]["zoo"]["test"]["acc"] += 0.25
    (tampered / "stars" / "lora.json").write_text(json.dumps(card))
    summary = reproduce(["stars"], ["lora", "linear"], root=tampered, backbone=backbone, smoke=True, log=lambda _: None)
    assert summary["missing"] == 1  # no linear card in that folder
    assert abs(summary["max_repro_drift"] - 0.25) < 1e-9


def test_reproduce_refuses_to_rebuild_into_the_folder_it_checks(smoke_zoo, backbone):
    from toast_core.training.zoo.reproduce import reproduce

    root, _ = smoke_zoo
    with pytest.raises(ValueError, match="another folder"):
        reproduce(["stars"], ["linear"], root=root, into=root, backbone=backbone, smoke=True, log=lambda _: None)
