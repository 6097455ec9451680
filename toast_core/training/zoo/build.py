"""`zoo build`: train every zoo entry of every built-in task from its recipe and seed, and write it
(safetensors + card) into checkpoints/zoo/<task>/<entry>.

Deterministic: a fixed thread count, the recipe, the seed and the data seed fix every number on the
same machine. Large modules (full fine-tunes and attention-transfer students hold a whole copy of the
backbone; TOAST's decoders) are stored as int8 rows (`storage_codec`) to fit the zoo's size budget;
the card's numbers are measured on the decoded weights, i.e. on exactly what a reader loads.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from toast_core.core.backbone import CHECKPOINT_DIR, Backbone
from toast_core.data.base import LabeledImages
from toast_core.methods.base import SteeringMethod
from toast_core.storage.checkpoints import load_module, read_card, rewrite_card, save_module
from toast_core.storage.storage_codec import roundtrip
from toast_core.training.recipes import (
    DATA_SEED,
    RECIPES,
    TEST_PER_CLASS,
    VAL_PER_CLASS,
    Recipe,
)
from toast_core.training.zoo.evaluate import score_faithfulness, score_split
from toast_core.training.zoo.train_entry import (
    ZooSplits,
    build_entry_method,
    train_entry,
    train_episode_entry,
)

ZOO_DIR = CHECKPOINT_DIR / "zoo"
ZOO_FORMAT = "toast-zoo-entry"
#: what a card's scores hold; a current module whose card has older scores is re-scored, not retrained
#: (2: faithfulness of the CLS map beside accuracy and focus)
SCORING_VERSION = 2
#: modules above this many parameters are stored (and scored) in the compact codec
COMPACT_ABOVE_PARAMS = 250_000
COMPACT_CODEC = "int8-rows"
def entry_stem(task: str, entry: str, root: Path = ZOO_DIR) -> Path:
    return root / task / entry


def shipped_entries(task: str) -> list[Recipe]:
    """Every recipe of the task: the compact storage fits them all in the 40 MB budget."""
    return list(RECIPES[task].values())


def smoke_recipe(recipe: Recipe) -> Recipe:
    """The recipe at smoke scale (2 steps; a 3-way 2-shot episode on the 3-class smoke data)."""
    if recipe.kind == "episode":
        return dataclasses.replace(recipe, episode=(3, 2), steps=2, batch_size=6)
    return dataclasses.replace(recipe, steps=2, batch_size=4)


def storage_for(num_params: int) -> str:
    return COMPACT_CODEC if num_params > COMPACT_ABOVE_PARAMS else "float32"


def round_to_storage(method: SteeringMethod) -> str:
    """Put the module through its storage codec in place (it then holds what a reader will load);
    returns the codec."""
    codec = storage_for(sum(t.numel() for t in method.state_dict().values()))
    roundtrip(method, codec)
    return codec


def _card_is_current(stem: Path, recipe: Recipe, seed: int, backbone: Backbone) -> bool:
    try:
        card = read_card(stem)
    except Exception:
        return False
    zoo = (card.get("extra") or {}).get("zoo") or {}
    num_params = sum(math.prod(shape) for shape in (card.get("tensors") or {}).values())
    return (
        card.get("storage", "float32") == storage_for(num_params)
        and _records_recipe(zoo.get("recipe"), recipe)
        and zoo.get("seed") == seed
        and (card.get("backbone") or {}).get("weights_hash") == backbone.weights_hash
    )


def _records_recipe(recorded: Any, recipe: Recipe) -> bool:
    """Whether a card's recipe has every field of `recipe` with the same value; a field since retired
    from Recipe (it changed no training) does not make a card stale."""
    want = _jsonable_recipe(recipe)
    return isinstance(recorded, dict) and all(k in recorded and recorded[k] == v for k, v in want.items())


def _card_scoring(stem: Path) -> int | None:
    return ((read_card(stem).get("extra") or {}).get("zoo") or {}).get("scoring")


def _jsonable_recipe(recipe: Recipe) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(recipe.describe()))


def _build_one(
    backbone: Backbone, task: str, recipe: Recipe, splits: dict[str, LabeledImages], seed: int
) -> tuple[SteeringMethod, dict[str, Any]]:
    """Train one entry; returns the module (rounded to its storage dtype) and its card's zoo section."""
    info: dict[str, Any] = {}
    cpu0 = time.process_time()
    if recipe.kind == "episode":
        tuned = train_episode_entry(backbone, recipe, splits["train"], splits["test"], seed)
        method, test = tuned.module, tuned.test
        info.update(
            train_s=tuned.seconds,
            episode={"classes": tuned.episode.classes, "support": len(tuned.episode.support),
                     "class_names": tuned.episode.support.class_names},
            prompt_on_object=tuned.prompt_on_object,
        )
        val = None
    else:
        method = build_entry_method(recipe, backbone, splits["train"].num_classes, seed)
        result = train_entry(method, recipe, splits["train"], splits["val"], seed)
        info.update(
            train_s=result.timings["train_s"],
            train_ms_per_img=result.timings["train_ms_per_img"],
            final_train_acc=result.final.get("train_acc"),
            curve=[{k: h[k] for k in ("step", "loss", "train_acc") if k in h} for h in result.history[:: max(1, len(result.history) // 20)]],
        )
        test, val = splits["test"], splits["val"]
    # CPU seconds of this process over its threads: what the run costs on an otherwise idle machine
    # (wall time is inflated by whatever else the machine runs)
    info["train_cpu_s"] = time.process_time() - cpu0
    info["storage_dtype"] = round_to_storage(method)
    method.eval()
    if val is not None:
        info["val"] = score_split(method, val)
    info.update(score_module(method, test))
    info["class_names"] = test.class_names
    return method, info


def score_module(method: SteeringMethod, test: LabeledImages) -> dict[str, Any]:
    """The card's test-split scores of a module as it is stored."""
    return {"test": score_split(method, test), "faithfulness": score_faithfulness(method, test),
            "scoring": SCORING_VERSION}


def _rescore(stem: Path, backbone: Backbone, test: LabeledImages) -> dict[str, Any]:
    """Re-score a stored module (same weights) and rewrite its card with the new scores."""
    from toast_core.training.zoo.train_entry import episode_test

    card = read_card(stem)
    zoo = card["extra"]["zoo"]
    classes = (zoo.get("episode") or {}).get("classes")
    method = load_module(stem, backbone)
    zoo.update(score_module(method, episode_test(test, list(classes)) if classes else test))
    card["metrics"]["test_acc"] = zoo["test"]["acc"]
    rewrite_card(stem, card)
    return zoo


def build(
    tasks: Iterable[str] = ("stars", "glyphs"),
    entries: Iterable[str] | None = None,
    *,
    seed: int = 0,
    threads: int = 1,
    root: Path = ZOO_DIR,
    backbone: Backbone | None = None,
    smoke: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Train (or keep, when its card already records this recipe, seed and backbone) every entry;
    returns the card paths written or kept."""
    from toast_core.core.backbone import load_backbone

    if smoke and Path(root).resolve() == ZOO_DIR.resolve():
        raise ValueError("A smoke build never writes the shipped zoo; give it another root.")
    torch.set_num_threads(threads)
    backbone = backbone or load_backbone("embedded")
    wanted = None if entries is None else set(entries)
    cards: list[Path] = []
    for task in tasks:
        recipes = shipped_entries(task) if wanted is None else [RECIPES[task][e] for e in RECIPES[task] if e in wanted]
        splits = ZooSplits(task, smoke=smoke)
        for recipe in recipes:
            recipe = smoke_recipe(recipe) if smoke else recipe
            stem = entry_stem(task, recipe.entry, root)
            current = not force and _card_is_current(stem, recipe, seed, backbone)
            if current and _card_scoring(stem) == SCORING_VERSION:
                log(f"[{task}] {recipe.entry}: card is current, kept")
                cards.append(stem.with_suffix(".json"))
                continue
            if current:
                zoo = _rescore(stem, backbone, splits.test)
                log(f"[{task}] {recipe.entry}: module is current, re-scored (test acc {zoo['test']['acc']:.3f}, "
                    f"faithfulness gap {zoo['faithfulness']['gap']:.3f})")
                cards.append(stem.with_suffix(".json"))
                continue
            t0 = time.perf_counter()
            data = splits.for_recipe(recipe)
            method, info = _build_one(backbone, task, recipe, data, seed)
            info.update(
                recipe=_jsonable_recipe(recipe), seed=seed, data_seed=DATA_SEED, threads=threads,
                device=str(backbone.device), wall_s=time.perf_counter() - t0, smoke=smoke,
                idle_s_estimate=info["train_cpu_s"] / max(1, threads),
                data={"train_per_class": len(data["train"]) // max(1, data["train"].num_classes), "val_per_class": VAL_PER_CLASS,
                      "test_per_class": TEST_PER_CLASS},
            )
            test = info["test"]
            card = save_module(
                method, stem, task=task,
                metrics={"test_acc": test["acc"], "val_acc": (info.get("val") or {}).get("acc")},
                timings={"train_s": info["train_s"]},
                extra={"class_names": info.pop("class_names"), "zoo": {"format": ZOO_FORMAT, "entry": recipe.entry, **info}},
                storage=info["storage_dtype"],
            )
            cards.append(card)
            log(
                f"[{task}] {recipe.entry}: test acc {test['acc']:.3f} [{test['acc_lo']:.3f}, {test['acc_hi']:.3f}] "
                f"(n={test['n']}), focus ratio {test.get('focus_ratio', float('nan')):.2f}, object share "
                f"{test.get('object_share', float('nan')):.3f} (chance {test.get('object_chance', float('nan')):.3f}), "
                f"{info['train_s']:.0f} s train"
            )
    return cards
