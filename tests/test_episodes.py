"""N-way K-shot episodes: shapes, relabelling, disjointness, determinism and clear errors."""

from __future__ import annotations

import pytest
import torch

from toast_core.data.base import LabeledImages
from toast_core.data.episodes import Episode, episodes, sample_episode


def _dataset(counts: list[int], with_masks: bool = True) -> LabeledImages:
    """Class c has counts[c] images; pixel [0, 0, 0] holds the image's global index (unique id)."""
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    n = len(labels)
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    images[:, 1, 0, 0] = labels.to(torch.uint8)
    masks = (torch.arange(n).view(n, 1, 1) % 2 == 0).expand(n, 4, 4).clone() if with_masks else None
    names = [f"class{c}" for c in range(len(counts))]
    return LabeledImages(images=images, labels=labels, class_names=names, masks=masks, meta={"task": "toy"})


def _ids(part: LabeledImages) -> list[int]:
    return part.images[:, 0, 0, 0].tolist()


def test_episode_shapes_labels_and_class_names() -> None:
    data = _dataset([6, 7, 8, 9, 10])
    ep = sample_episode(data, n_way=3, k_shot=2, n_query=4, rng_seed=0)
    assert isinstance(ep, Episode) and len(ep.classes) == 3 and len(set(ep.classes)) == 3
    assert len(ep.support) == 6 and len(ep.query) == 12
    assert ep.support.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.bincount(ep.query.labels, minlength=3).tolist() == [4, 4, 4]
    assert ep.support.class_names == [f"class{c}" for c in ep.classes] == ep.query.class_names
    # every image really belongs to the class its new label points at
    for part in (ep.support, ep.query):
        original = part.images[:, 1, 0, 0].long()
        assert torch.equal(original, torch.tensor(ep.classes)[part.labels])
        assert part.masks is not None and part.masks.shape == (len(part), 4, 4)
        assert torch.equal(part.masks[:, 0, 0], torch.tensor([i % 2 == 0 for i in _ids(part)]))
    assert ep.support.meta["task"] == "toy" and ep.query.meta["episode_role"] == "query"


def test_support_and_query_are_disjoint() -> None:
    data = _dataset([5, 5, 5, 5])
    for seed in range(20):
        ep = sample_episode(data, n_way=4, k_shot=2, n_query=3, rng_seed=seed)
        support, query = _ids(ep.support), _ids(ep.query)
        assert len(set(support)) == len(support) and len(set(query)) == len(query)
        assert not set(support) & set(query)
        assert sorted(support + query) == list(range(20))  # 5 per class, all used, none twice


def test_deterministic_per_seed_and_varies_across_seeds() -> None:
    data = _dataset([8, 8, 8, 8, 8, 8])
    a = sample_episode(data, 3, 2, 2, rng_seed=7)
    b = sample_episode(data, 3, 2, 2, rng_seed=7)
    assert a.classes == b.classes and _ids(a.support) == _ids(b.support) and _ids(a.query) == _ids(b.query)
    draws = {
        (tuple(e.classes), tuple(_ids(e.support)))
        for e in (sample_episode(data, 3, 2, 2, s) for s in range(10))
    }
    assert len(draws) > 5


def test_episodes_iterator_count_seed_and_reproducibility() -> None:
    data = _dataset([6, 6, 6, 6])
    first = list(episodes(data, 2, 1, 2, count=5, seed=3))
    again = list(episodes(data, 2, 1, 2, count=5, seed=3))
    other = list(episodes(data, 2, 1, 2, count=5, seed=4))
    assert len(first) == 5
    key = lambda eps: [(e.classes, _ids(e.support), _ids(e.query)) for e in eps]
    assert key(first) == key(again) and key(first) != key(other)
    assert len({tuple(_ids(e.support)) for e in first}) > 1  # episodes differ from each other
    solo = sample_episode(data, 2, 1, 2, rng_seed=(3, 2))
    assert key([solo]) == key([first[2]])  # episode i can be re-drawn on its own
    assert list(episodes(data, 2, 1, 2, count=0, seed=0)) == []


def test_short_classes_are_never_drawn() -> None:
    data = _dataset([10, 2, 10, 10])
    for seed in range(30):
        assert 1 not in sample_episode(data, 3, 2, 2, seed).classes


def test_error_when_too_few_images() -> None:
    data = _dataset([10, 3, 10])
    with pytest.raises(ValueError, match="need 5 images .* Too few images: 'class1' \\(3\\)"):
        sample_episode(data, 3, 2, 3, rng_seed=0)
    with pytest.raises(ValueError, match="Too few images"):
        episodes(data, 3, 2, 3, count=2, seed=0)  # raised at the call, not at the first next()


def test_error_when_n_way_exceeds_classes() -> None:
    data = _dataset([5, 5])
    with pytest.raises(ValueError, match="3-way episodes need 3 classes; the data has 2"):
        sample_episode(data, 3, 1, 1, rng_seed=0)


def test_error_on_non_positive_sizes() -> None:
    data = _dataset([5, 5])
    for args in ((0, 1, 1), (2, 0, 1), (2, 1, 0)):
        with pytest.raises(ValueError, match="at least 1"):
            sample_episode(data, *args, rng_seed=0)
    with pytest.raises(ValueError, match="count"):
        episodes(data, 2, 1, 1, count=-1, seed=0)


def test_works_without_masks() -> None:
    ep = sample_episode(_dataset([4, 4], with_masks=False), 2, 1, 1, rng_seed=0)
    assert ep.support.masks is None and ep.query.masks is None
