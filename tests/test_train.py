"""The shared training loop: seeded, cancellable, scheduled, both losses, callbacks, timings, eval."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from data_factory import rgb_squares

from toast_core.core.forward import Capture
from toast_core.data.base import LabeledImages
from toast_core.methods import build_method
from toast_core.methods.base import MethodOutput, SteeringMethod
from toast_core.training.train import (
    Callbacks,
    TrainConfig,
    _EpochSampler,
    cls_attention_grid,
    evaluate,
    lr_at,
    predict,
    prepare_batch,
    train,
)

CLASSES = 3


@pytest.fixture(scope="module")
def data() -> LabeledImages:
    return rgb_squares(masks=False)


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


def test_same_seed_same_history(fixture_backbone, data):
    """Deep VPT has prompt dropout, so this also checks that the loop seeds the global RNG."""
    cfg = {"num_tokens": 5, "deep": True}
    runs = [
        train(
            build_method("vpt", fixture_backbone, CLASSES, cfg),
            data,
            None,
            TrainConfig(steps=6, batch_size=8, lr=1e-2, seed=s),
        )
        for s in (0, 0, 1)
    ]
    assert runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history


def _history_of(method: SteeringMethod, data) -> list[dict[str, float]]:
    return train(method, data, None, TrainConfig(steps=6, batch_size=8, lr=1e-2, seed=3)).history


@pytest.mark.parametrize(
    ("method_name", "cfg"),
    [("vpt", {"num_tokens": 5, "deep": True}), ("visual_prompt", {"kind": "random_patch", "size": 8})],
)
def test_a_run_keeps_its_random_stream_while_other_threads_use_torchs(
    fixture_backbone, data, method_name, cfg
) -> None:
    """Prompt dropout and prompt placement draw from the run's own generator: another thread
    reseeding and drawing from torch's global one (as a concurrent run may) changes nothing."""
    alone = _history_of(build_method(method_name, fixture_backbone, CLASSES, cfg), data)
    method = build_method(method_name, fixture_backbone, CLASSES, cfg)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(_history_of(method, data)))
    worker.start()
    k = 0
    while worker.is_alive():
        torch.manual_seed(1000 + k)
        torch.rand(64)
        k += 1
    worker.join()
    assert k > 0 and result[0] == alone


class _SlowBuild(SteeringMethod):
    """Draws, yields the GIL, draws again: the window in which another build could reseed."""

    def build(self) -> None:
        self.first = torch.nn.Parameter(torch.randn(8))
        time.sleep(0.05)
        self.second = torch.nn.Parameter(torch.randn(8))


def test_methods_built_at_once_get_the_weights_of_their_own_seed(fixture_backbone) -> None:
    from toast_core.methods.base import MethodConfig

    def weights(seed: int) -> list[torch.Tensor]:
        m = _SlowBuild(fixture_backbone, CLASSES, MethodConfig(seed=seed))
        return [m.first.detach(), m.second.detach(), m.head.weight.detach()]

    serial = {seed: weights(seed) for seed in (0, 1)}
    built: dict[int, list[torch.Tensor]] = {}
    threads = [threading.Thread(target=lambda s=s: built.__setitem__(s, weights(s))) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(built[seed], serial[seed], strict=True)), seed


def test_cancel_stops_within_one_step(fixture_backbone, data):
    cancel = threading.Event()
    seen: list[int] = []

    def on_step(step: int, total: int, metrics: dict) -> None:
        seen.append(step)
        if step == 3:
            cancel.set()

    method = build_method("linear", fixture_backbone, CLASSES)
    result = train(
        method,
        data,
        data,
        TrainConfig(steps=50, batch_size=4),
        callbacks=Callbacks(on_step=on_step),
        cancel=cancel,
    )
    assert result.cancelled and result.steps_done == 3 and seen == [1, 2, 3]
    assert "val_acc" not in result.final, "a cancelled run skips the final evaluation"
    early = threading.Event()
    early.set()
    assert train(method, data, None, TrainConfig(steps=5), cancel=early).steps_done == 0


def test_snapshots_are_grid_arrays(fixture_backbone, data):
    shots: list[tuple[int, np.ndarray]] = []
    method = build_method("vpt", fixture_backbone, CLASSES, {"num_tokens": 3})
    train(
        method,
        data,
        None,
        TrainConfig(steps=8, batch_size=4, snapshot_every=4),
        callbacks=Callbacks(on_snapshot=lambda step, a: shots.append((step, a))),
        probe_image=data.images[0],
    )
    assert [s for s, _ in shots] == [0, 4, 8]
    for _, att in shots:
        assert isinstance(att, np.ndarray) and att.shape == (4, 4) and att.dtype == np.float32
        assert np.all(att >= 0) and 0 < att.sum() <= 1 + 1e-5  # patch share of the CLS row (prompts excluded)
    assert not np.array_equal(shots[0][1], shots[-1][1]), "training moved the attention"


def test_cls_attention_grid_matches_full_map(fixture_backbone, data):
    method = build_method("vpt", fixture_backbone, CLASSES, {"num_tokens": 2})
    grid = cls_attention_grid(method, data.images[:2])
    with torch.no_grad():
        full = method.eval()(prepare_batch(method, data.images[:2]), Capture(attn=[-1])).out.attn[1]
    expect = full[:, :, 0, 3:].mean(dim=1).reshape(2, 4, 4)
    assert isinstance(grid, np.ndarray) and grid.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(grid), expect, atol=1e-6, rtol=1e-5)


def test_bce_with_multi_hot_targets_from_a_stream(fixture_backbone, data):
    """A callable batch source with float multi-hot targets trains with BCE-with-logits."""
    calls: list[tuple[int, int]] = []

    def source(step: int, batch: int, gen: torch.Generator):
        calls.append((step, batch))
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        targets = torch.nn.functional.one_hot(data.labels[idx], CLASSES).float()
        targets[:, 0] = 1.0  # class 0 is always also present: genuinely multi-label
        return data.images[idx], targets

    method = build_method("lora", fixture_backbone, CLASSES)
    result = train(method, source, None, TrainConfig(steps=30, batch_size=8, lr=3e-2))
    assert calls[:2] == [(0, 8), (1, 8)] and len(calls) == 30
    losses = _losses(result)
    assert losses[0] < 1.0, "BCE over 3 logits starts near ln 2, not near ln 3 as CE would"
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    multi = LabeledImages(
        data.images, torch.nn.functional.one_hot(data.labels, CLASSES).float(), data.class_names
    )
    metrics = evaluate(method, multi, batch_size=10)
    assert metrics["n"] == len(data) and 0.0 <= metrics["acc"] <= 1.0


def test_eval_every_and_final_metrics(fixture_backbone, data):
    evals: list[int] = []
    method = build_method("linear", fixture_backbone, CLASSES)
    result = train(
        method,
        data,
        data,
        TrainConfig(steps=10, batch_size=8, lr=3e-2, eval_every=5),
        callbacks=Callbacks(on_eval=lambda step, m: evals.append(step)),
    )
    assert evals == [5, 10]
    assert [h["step"] for h in result.history if "val_acc" in h] == [5, 10]
    direct = evaluate(method, data, batch_size=7)
    assert result.final["val_acc"] == pytest.approx(direct["acc"])
    assert result.final["val_loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert not method.training


def test_lr_schedule_warmup_then_cosine(fixture_backbone, data):
    cfg = TrainConfig(steps=10, batch_size=4, lr=0.1, warmup_steps=3, min_lr=0.1)
    lrs = [h["lr"] for h in train(build_method("linear", fixture_backbone, CLASSES), data, None, cfg).history]
    assert lrs[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert lrs[-1] == pytest.approx(0.01) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lr_at(0, TrainConfig(steps=1, lr=0.5)) == 0.5


def test_sgd_and_grad_clip(fixture_backbone, data):
    method = build_method("bitfit", fixture_backbone, CLASSES)
    result = train(
        method, data, None, TrainConfig(steps=25, batch_size=8, lr=0.1, optimizer="sgd", grad_clip=0.5)
    )
    losses = _losses(result)
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])


def test_head_lr_scale_multiplies_the_heads_step_and_nothing_else(fixture_backbone, data):
    """One plain SGD step (no momentum, decay or clipping): the head moves head_lr_scale times as far
    as at scale 1 from the same gradient, every other parameter exactly as far."""
    steps = {}
    for scale in (1.0, 10.0):
        method = build_method("bitfit", fixture_backbone, CLASSES)
        before = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
        config = TrainConfig(steps=1, batch_size=8, lr=0.05, optimizer="sgd", momentum=0.0, grad_clip=None,
                             head_lr_scale=scale, cache_mb=0)
        train(method, data, None, config)
        steps[scale] = {n: p.detach() - before[n] for n, p in method.named_parameters() if n in before}
    head = [n for n in steps[1.0] if n.startswith("head.")]
    rest = [n for n in steps[1.0] if not n.startswith("head.")]
    assert head and rest
    for n in head:
        assert steps[1.0][n].abs().max() > 0
        torch.testing.assert_close(steps[10.0][n], 10.0 * steps[1.0][n], rtol=1e-4, atol=1e-7)
    for n in rest:
        torch.testing.assert_close(steps[10.0][n], steps[1.0][n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="head_lr_scale"):
        TrainConfig(head_lr_scale=0.0)


class _AuxMethod(SteeringMethod):
    """A test-only method with an extra loss that needs a capture: CLS-attention entropy."""

    name = "aux_test"

    def capture_for_loss(self) -> Capture:
        return Capture(cls_attn=[-1])

    def extra_losses(self, output: MethodOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        row = output.out.cls_attn[1]  # present only if the loop asked for the capture
        return {"aux": 0.5 * -(row * row.clamp_min(1e-9).log()).sum(-1).mean()}


def test_extra_losses_use_the_requested_capture(fixture_backbone, data):
    result = train(_AuxMethod(fixture_backbone, CLASSES), data, None, TrainConfig(steps=3, batch_size=4))
    for h in result.history:
        assert h["aux"] > 0 and h["loss"] == pytest.approx(h["task_loss"] + h["aux"], rel=1e-6)


def test_prepare_batch_resizes_and_normalises(fixture_backbone):
    method = build_method("linear", fixture_backbone, CLASSES)
    images = torch.full((2, 3, 40, 40), 255, dtype=torch.uint8)
    x = prepare_batch(method, images)
    mean, std = method.layout.mean, method.layout.std
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0], torch.full((2, 32, 32), (1 - mean[0]) / std[0]))


def test_predict_and_timings(fixture_backbone, data):
    method = build_method("linear", fixture_backbone, CLASSES)
    result = train(method, data, None, TrainConfig(steps=4, batch_size=4))
    probs = predict(method, data.images[:5], batch_size=2)
    assert probs.shape == (5, CLASSES)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    assert result.timings["train_ms_per_img"] > 0 and result.timings["images_seen"] == 16
    assert result.timings["total_s"] >= result.timings["train_s"] > 0
    assert result.memory["kind"] == (
        "cuda_max_memory_allocated" if result.device.startswith("cuda") else "cpu_rss_delta"
    )
    assert result.amp == "off" and result.steps_done == 4


def test_epoch_permutation_visits_every_image():
    sampler = _EpochSampler(24, torch.Generator().manual_seed(0))
    first = torch.cat([sampler.next(8) for _ in range(3)])
    second = torch.cat([sampler.next(8) for _ in range(3)])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(24))
    assert not torch.equal(first, second), "a fresh permutation every epoch"
    big = sampler.next(50)  # a batch larger than the data set spans epochs
    assert len(big) == 50 and set(big.tolist()) == set(range(24))


def test_callbacks_may_be_any_objects(fixture_backbone, data):
    seen: list[int] = []

    class Spy:  # only on_step: the other events are skipped
        def on_step(self, step, total, metrics):
            seen.append(step)
            assert total == 3 and "loss" in metrics

    train(
        build_method("linear", fixture_backbone, CLASSES),
        data,
        None,
        TrainConfig(steps=3, batch_size=8),
        callbacks=[Spy()],
    )
    assert seen == [1, 2, 3]


def test_config_and_device_checks(fixture_backbone, data):
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(min_lr=2.0)
    method = build_method("linear", fixture_backbone, CLASSES)
    with pytest.raises(ValueError, match="CUDA only"):
        train(method, data, None, TrainConfig(steps=1, amp="bf16"))
    with pytest.raises((ValueError, RuntimeError), match="cuda|CUDA"):
        train(method, data, None, TrainConfig(steps=1, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_on_cuda(amp, data):
    from toast_core.core.backbone import tiny_fixture_backbone

    backbone = tiny_fixture_backbone(device="cuda")
    method = build_method("lora", backbone, CLASSES)
    result = train(method, data, data, TrainConfig(steps=20, batch_size=8, lr=3e-2, amp=amp))
    assert result.amp == amp and result.memory["kind"] == "cuda_max_memory_allocated"
    assert result.memory["peak_mb"] > 0
    losses = _losses(result)
    assert all(np.isfinite(losses)) and sum(losses[-5:]) < sum(losses[:5])
