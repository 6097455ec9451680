"""The per-run frozen-stage cache: cached runs end where uncached runs end, and refusals hold."""

from __future__ import annotations

import logging

import pytest
import torch

from toast_core.core.backbone import tiny_fixture_backbone
from toast_core.data.base import LabeledImages
from toast_core.methods import build_method
from toast_core.methods.linear import LinearProbe
from toast_core.training.feature_cache import FrozenCache, plan_cache
from toast_core.training.train import TrainConfig, prepare_batch, train

CLASSES = 3


def blobs(n: int = 20, size: int = 32, seed: int = 0) -> LabeledImages:
    """Noise with a bright square whose colour channel is the label."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(60, 120, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % CLASSES
    for i in range(n):
        top, left = torch.randint(0, size - 10, (2,), generator=g).tolist()
        images[i, int(labels[i]), top : top + 10, left : left + 10] = 240
    return LabeledImages(images, labels, ["r", "g", "b"])


@pytest.fixture(scope="module")
def data() -> LabeledImages:
    return blobs()


def _run(backbone, name, cfg, data, **train_cfg):
    """Train a fresh `name` (20 images, batch 8: steps cross epoch ends, so batches repeat images)."""
    method = build_method(name, backbone, CLASSES, cfg)
    values = {"steps": 9, "batch_size": 8, "lr": 3e-3, "seed": 3, "warmup_steps": 2, **train_cfg}
    return method, train(method, data, None, TrainConfig(**values))


def _max_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


CASES = [
    ("linear", {}),
    ("toast", {"init": "scratch"}),
    ("toast", {"init": "scratch", "feedback_to": 1}),  # late feedback: pass 2 resumes at block 1
    ("toast_lite", {"init": "scratch", "var_loss_weight": 0.1}),  # pass-2 captures for the loss
]


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=["linear", "toast", "toast_late", "lite_var"])
def test_cached_run_ends_where_the_uncached_run_ends(fixture_backbone, data, name, cfg):
    cached, res_c = _run(fixture_backbone, name, cfg, data)
    plain, res_p = _run(fixture_backbone, name, cfg, data, cache_mb=0)
    assert res_c.cache["used"] and not res_p.cache["used"]
    assert res_p.cache["reason"] == "off (cache_mb = 0)"
    assert res_c.cache["entries"] == len(data)  # every image computed once, then read
    assert res_c.cache["computed"] == len(data) and res_c.cache["hits"] == 9 * 8 - len(data)
    assert _max_diff(cached, plain) <= 1e-5
    losses_c, losses_p = [h["loss"] for h in res_c.history], [h["loss"] for h in res_p.history]
    assert losses_c == pytest.approx(losses_p, abs=1e-5)
    assert _max_diff(cached, build_method(name, fixture_backbone, CLASSES, cfg)) > 1e-4  # it did train


def test_toast_forward_from_its_frozen_stage_is_its_forward(fixture_backbone, data):
    method = build_method("toast", fixture_backbone, CLASSES, {"init": "scratch", "feedback_to": 1})
    x = prepare_batch(method, data.images[:5])
    whole = method(x)
    cached = method.forward_frozen(method.frozen_stage(x))
    assert torch.allclose(whole.logits, cached.logits, atol=1e-6)
    assert torch.equal(whole.extras["selection"], cached.extras["selection"])


def test_augmented_or_streamed_runs_compute_every_step(fixture_backbone, data):
    flip = lambda images, g: torch.where(
        torch.rand(len(images), 1, 1, 1, generator=g) < 0.5, images.flip(-1), images
    )
    method, res = _run(fixture_backbone, "linear", {}, data)
    aug = build_method("linear", fixture_backbone, CLASSES)
    res_a = train(
        aug, data, None, TrainConfig(steps=9, batch_size=8, lr=3e-3, seed=3, warmup_steps=2), augment=flip
    )
    assert not res_a.cache["used"] and "augmentation" in res_a.cache["reason"]
    assert _max_diff(method, aug) > 1e-6  # the flips reached the steps
    source = lambda step, batch, g: (data.images[:batch], data.labels[:batch])
    res_s = train(
        build_method("toast", fixture_backbone, CLASSES, {"init": "scratch"}),
        source,
        None,
        TrainConfig(steps=2, batch_size=4),
    )
    assert not res_s.cache["used"] and "streamed" in res_s.cache["reason"]


class _PromptedProbe(LinearProbe):
    """Declares the linear probe's stage but trains a pixel offset below it: must be refused."""

    name = "prompted_probe_test"

    def build(self) -> None:
        self.offset = torch.nn.Parameter(torch.zeros(1))

    def transform_input(self, images):
        return images + self.offset


def test_trainable_parts_below_the_cache_point_are_refused(data):
    bb = tiny_fixture_backbone()
    probe = _PromptedProbe(bb, CLASSES)
    assert "below the pooled feature" in probe.cache_refusal()
    res = train(probe, data, None, TrainConfig(steps=3, batch_size=8))
    assert not res.cache["used"] and float(probe.offset.detach().abs()) > 0  # trained through the backbone
    with pytest.raises(ValueError, match="head-only"):
        train(probe, data, None, TrainConfig(steps=1), features=torch.zeros(len(data), 32))
    for name in ("linear", "toast", "lora"):
        method = build_method(name, bb, CLASSES, {"init": "scratch"} if name == "toast" else None)
        if name == "lora":
            assert "declares no frozen stage" in method.cache_refusal()
            continue
        assert method.cache_refusal() is None
        bb.model.blocks[0].attn.qkv.weight.requires_grad_(True)  # a backbone someone unfroze
        try:
            assert "trainable weights" in method.cache_refusal()
            assert plan_cache(method, data, 64.0)[0] is None
        finally:
            bb.model.blocks[0].attn.qkv.weight.requires_grad_(False)


def test_a_full_cache_recomputes_the_rest_and_says_so(fixture_backbone, data, caplog):
    probe = build_method("toast", fixture_backbone, CLASSES, {"init": "scratch"})
    row_bytes = sum(
        t[0].numel() * 4 for t in probe.frozen_stage(prepare_batch(probe, data.images[:1])).values()
    )
    mb = 6 * row_bytes / 2**20  # room for 6 of the 20 images
    with caplog.at_level(logging.WARNING, logger="toast_core.training.feature_cache"):
        bounded, res_b = _run(fixture_backbone, "toast", {"init": "scratch"}, data, cache_mb=mb)
    plain, _ = _run(fixture_backbone, "toast", {"init": "scratch"}, data, cache_mb=0)
    stats = res_b.cache
    assert stats["used"] and stats["capacity"] == 6 and stats["entries"] == 6
    assert stats["recomputed_over_bound"] > 0 and stats["peak_mb"] == pytest.approx(mb)
    assert sum("cache full" in r.getMessage() for r in caplog.records) == 1  # logged once per run
    assert _max_diff(bounded, plain) <= 1e-5


def test_cache_rows_come_back_in_batch_order_and_repeats_are_stored_once():
    cache = FrozenCache(5, "key", "features", max_bytes=10**6)
    calls: list[list[int]] = []

    def compute(index):
        def fn(rows):
            calls.append(index[rows].tolist())
            return {"features": index[rows].float()[:, None].repeat(1, 2)}

        return fn

    first = torch.tensor([3, 1, 3])
    assert cache.get(first, compute(first))["features"][:, 0].tolist() == [3, 1, 3]
    assert cache.filled == 2  # image 3 twice in one batch (an epoch's end): one slot
    second = torch.tensor([0, 3, 4, 1])
    assert cache.get(second, compute(second))["features"][:, 1].tolist() == [0, 3, 4, 1]
    assert calls == [[3, 1, 3], [0, 4]]  # only the missing rows were computed
    assert cache.stats.hits == 2 and cache.filled == 4
