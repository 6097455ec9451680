"""Train one zoo entry from its recipe: the task's splits, the module, and the run itself.

Three kinds of entry (see `toast_core.training.recipes.Recipe.kind`): a method on the task's train split; a
method tuned on one few-shot episode drawn from the train split (FORT and its plain baselines, via
`fewshot.tune_episode`, so the few-shot page and the zoo share one recipe path); and an
attention-transfer student (the frozen backbone is its teacher).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from toast_core.core.backbone import Backbone
from toast_core.data.base import LabeledImages
from toast_core.data.episodes import Episode, sample_episode
from toast_core.methods import build_method
from toast_core.methods.base import SteeringMethod
from toast_core.methods.fort import support_features
from toast_core.training.recipes import DATA_SEED, TEST_PER_CLASS, TRAIN_PER_CLASS, VAL_PER_CLASS, Recipe
from toast_core.training.train import TrainResult, prepare_batch, train

SMOKE_SIZES = {"train": 6, "val": 3, "test": 4}  # images per class of the smoke data


def _smoke_split(per_class: int, seed: int) -> LabeledImages:
    """Random pixels with box masks on a 3-class task: proves the pipeline, learns nothing."""
    g = torch.Generator().manual_seed(seed)
    n = per_class * 3
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    masks = torch.zeros(n, 32, 32, dtype=torch.bool)
    objects = torch.zeros(n, 32, 32, dtype=torch.bool)
    for i in range(n):
        top, left = torch.randint(0, 16, (2,), generator=g).tolist()
        masks[i, top : top + 10, left : left + 10] = True
        objects[i, 20:30, 2:12] = True
    objects |= masks
    labels = torch.arange(n) % 3
    return LabeledImages(images, labels, ["a", "b", "c"], masks, {"smoke": True}, objects)


def task_splits(task: str, *, smoke: bool = False, with_test: bool = True) -> dict[str, LabeledImages]:
    """The zoo's train / val (/ test) splits of a built-in task at their default sizes (smoke: tiny
    random data). A caller that needs other sizes or several train sizes uses `ZooSplits`."""
    splits = ZooSplits(task, smoke=smoke)
    out = {"train": splits.train(), "val": splits.val}
    return out | {"test": splits.test} if with_test else out


class ZooSplits:
    """A task's splits, each rendered once: val and test shared, one train split per size asked for.

    The build, the recipe sweep and the representation ceiling all train entries whose recipes want
    different train sizes against one val / test pair; this is the one place that renders them.
    `val_per_class` enlarges the validation split (a sweep ranking close trials; it begins with the
    zoo's own images), `distractors` overrides the task's distractor count ((0, 0): the control)."""

    def __init__(
        self, task: str, *, smoke: bool = False, distractors: tuple[int, int] | None = None,
        val_per_class: int | None = None,
    ) -> None:
        self.task, self.smoke, self.distractors, self.val_per_class = task, smoke, distractors, val_per_class
        self._train: dict[int, LabeledImages] = {}

    def _render(self, split: str, per_class: int | None = None) -> LabeledImages:
        return zoo_split(self.task, split, smoke=self.smoke, per_class=per_class, distractors=self.distractors)

    @cached_property
    def val(self) -> LabeledImages:
        return self._render("val", self.val_per_class)

    @cached_property
    def test(self) -> LabeledImages:
        return self._render("test")

    def train(self, per_class: int | None = None) -> LabeledImages:
        size = per_class or TRAIN_PER_CLASS
        if size not in self._train:
            self._train[size] = self._render("train", size)
        return self._train[size]

    def for_recipe(self, recipe: Recipe, *, with_test: bool = True) -> dict[str, LabeledImages]:
        """The train split of the recipe's size with the shared val (and test) split."""
        out = {"train": self.train(recipe.train_per_class), "val": self.val}
        return out | {"test": self.test} if with_test else out


def zoo_split(
    task: str, split: str, *, smoke: bool = False, per_class: int | None = None,
    distractors: tuple[int, int] | None = None,
) -> LabeledImages:
    """One of the zoo's splits alone (a reader of the test split need not render the train split)."""
    if smoke:
        return _smoke_split(SMOKE_SIZES[split], list(SMOKE_SIZES).index(split))
    from toast_core.data.scenes import make_task_split

    default = {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS, "test": TEST_PER_CLASS}[split]
    return make_task_split(task, split, per_class=per_class or default, seed=DATA_SEED, distractors=distractors)


def build_entry_method(recipe: Recipe, backbone: Backbone, num_classes: int, seed: int) -> SteeringMethod:
    return build_method(recipe.method, backbone, num_classes, {**recipe.method_config, "seed": seed})


def frozen_features(method: SteeringMethod, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Pooled frozen-backbone features of uint8 images (what a head-only method reads)."""
    return torch.cat(
        [support_features(method, prepare_batch(method, images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )


def train_entry(
    method: SteeringMethod,
    recipe: Recipe,
    train_set: LabeledImages,
    val_set: LabeledImages | None,
    seed: int,
    *,
    steps: int | None = None,
    callbacks: Any = None,
) -> TrainResult:
    """Train a task or transfer entry in place with its recipe (optionally fewer steps, for sweeps)."""
    overrides = {} if steps is None else {"steps": steps}
    config = recipe.train_config(seed, **overrides)
    features = frozen_features(method, train_set.images) if method.name == "linear" else None
    return train(method, train_set, val_set, config, features=features, callbacks=callbacks)


@dataclass
class EpisodeEntry:
    """A module tuned on one episode, the episode, and the test images of the episode's classes."""

    module: SteeringMethod
    episode: Episode
    test: LabeledImages
    prompt_on_object: float | None
    seconds: float


def episode_for(train_set: LabeledImages, recipe: Recipe, index: int = 0) -> Episode:
    n_way, k_shot = recipe.episode
    return sample_episode(train_set, n_way, k_shot, 1, (DATA_SEED, index))


def episode_test(test_set: LabeledImages, classes: list[int]) -> LabeledImages:
    """The test images of an episode's classes, relabelled as the episode labels them."""
    labels = test_set.labels.tolist()
    idx = [i for i, c in enumerate(labels) if c in classes]
    part = test_set.subset(idx)
    part.labels = torch.tensor([classes.index(labels[i]) for i in idx], dtype=torch.long)
    part.class_names = [test_set.class_names[c] for c in classes]
    return part


def train_episode_entry(
    backbone: Backbone, recipe: Recipe, train_set: LabeledImages, test_set: LabeledImages, seed: int
) -> EpisodeEntry:
    """Tune the recipe's method on the task's zoo episode with the few-shot page's own path."""
    from toast_core.training.fewshot import FewShotConfig, MethodSpec, tune_episode

    episode = episode_for(train_set, recipe)
    n_way, k_shot = recipe.episode
    config = FewShotConfig(
        n_way=n_way, k_shot=k_shot, n_query=1, episodes=1, seed=seed, steps=recipe.steps,
        batch_size=recipe.batch_size, weight_decay=recipe.weight_decay or 0.01,
    )
    spec = MethodSpec(recipe.entry, recipe.method, {**recipe.method_config, "seed": seed}, lr=recipe.lr)
    t0 = time.perf_counter()
    tuned = tune_episode(backbone, spec, episode, config, index=0)
    return EpisodeEntry(
        tuned.module, episode, episode_test(test_set, episode.classes), tuned.result.prompt_on_object,
        time.perf_counter() - t0,
    )
