"""Attention transfer: a random student of the backbone's exact shape, taught by the frozen teacher's maps.

Copy mode runs on the teacher's maps (captures show them, and the student's own q/k cannot change the
output); distill's KL is exactly 0 for a student that equals the teacher; scratch has no transfer;
the shared backbone is never changed. Tiny fixture backbones, one CPU thread.
"""

from __future__ import annotations

import pytest
import torch
from data_factory import rgb_squares

from toast_core.core.backbone import Backbone, tiny_fixture_backbone, weights_hash
from toast_core.core.forward import Capture, steered_forward
from toast_core.methods import build_method
from toast_core.methods.attention_transfer import (
    AttentionCopy,
    AttentionDistill,
    StudentMethod,
    attention_kl,
    build_student,
    copy_weights_from_teacher,
)
from toast_core.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sharp() -> Backbone:
    """A fixture teacher with peaked attention (q/k weights scaled up), so maps carry information."""
    bk = tiny_fixture_backbone(seed=1)
    with torch.no_grad():
        for blk in bk.model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.qkv.in_features] *= 8.0
    return bk


@pytest.mark.parametrize(
    "extra",
    [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}, {"init_values": 1e-3, "qk_norm": True}],
)
def test_student_has_the_teachers_architecture_and_fresh_weights(extra: dict) -> None:
    teacher = tiny_fixture_backbone(**extra).model
    student = build_student(teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert {k: v.shape for k, v in t_state.items()} == {k: v.shape for k, v in s_state.items()}
    assert student.num_prefix_tokens == teacher.num_prefix_tokens and student.global_pool == teacher.global_pool
    weights = [k for k in t_state if k.endswith("weight") and t_state[k].ndim >= 2]
    assert weights and not any(torch.equal(t_state[k], s_state[k]) for k in weights)
    assert all(p.requires_grad is False for p in teacher.parameters())


def test_registry_and_trainable_student(fixture_backbone: Backbone) -> None:
    for name, cls in (("attn_copy", AttentionCopy), ("attn_distill", AttentionDistill), ("scratch", StudentMethod)):
        m = build_method(name, fixture_backbone, 3)
        assert type(m) is cls and m.vit is m.student and m.teacher is fixture_backbone.model
        n_backbone = sum(p.numel() for p in fixture_backbone.model.parameters())
        assert m.trainable_count() == n_backbone + m.head.weight.numel() + m.head.bias.numel()
    # one seed, one start; the shared backbone is not in the module's state
    a, b = build_method("scratch", fixture_backbone, 3), build_method("scratch", fixture_backbone, 3)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert all(k.startswith(("student.", "head.")) for k in a.state_dict())


def test_copy_uses_exactly_the_teachers_maps(fixture_backbone: Backbone, x: torch.Tensor) -> None:
    method = build_method("attn_copy", fixture_backbone, 3).eval()
    assert method.transferred_layers() == [0, 1]
    teacher = steered_forward(fixture_backbone.model, x, capture=Capture(attn=True, cls_attn=True))
    mo = method(x, Capture(attn=True, cls_attn=True))
    for layer in (0, 1):
        assert torch.equal(mo.out.attn[layer], teacher.attn[layer])
        assert torch.equal(mo.out.cls_attn[layer], teacher.cls_attn[layer])
    # and the student's own queries/keys cannot change the output: attention comes from the teacher
    before = mo.logits
    with torch.no_grad():
        for blk in method.student.blocks:
            d = blk.attn.qkv.in_features
            blk.attn.qkv.weight[: 2 * d].normal_()
    assert torch.allclose(method(x).logits, before, atol=1e-6)
    # control: the same perturbation does change a scratch student
    scratch = build_method("scratch", fixture_backbone, 3).eval()
    ref = scratch(x).logits
    with torch.no_grad():
        for blk in scratch.student.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.qkv.in_features].normal_()
    assert not torch.allclose(scratch(x).logits, ref, atol=1e-4)


def test_copy_layers_option_keeps_later_blocks_own(fixture_backbone: Backbone, x: torch.Tensor) -> None:
    method = build_method("attn_copy", fixture_backbone, 3, {"layers": 1}).eval()
    teacher = steered_forward(fixture_backbone.model, x, capture=Capture(attn=True))
    own = steered_forward(method.student, x, steer=method, capture=Capture(attn=[1]))  # no override set
    mo = method(x, Capture(attn=True))
    assert torch.equal(mo.out.attn[0], teacher.attn[0])
    assert not torch.allclose(mo.out.attn[1], teacher.attn[1])
    assert mo.out.attn[1].shape == own.attn[1].shape


def test_distill_loss_is_zero_for_a_student_equal_to_the_teacher(sharp: Backbone, x: torch.Tensor) -> None:
    method = build_method("attn_distill", sharp, 3).train()
    assert method.transferred_layers() == [0]  # depth 2: max(1, L - 3) = 1 block
    fresh = method.distill_loss(method(x, method.capture_for_loss()))
    assert fresh > 0.1
    copy_weights_from_teacher(method)
    out = method(x, method.capture_for_loss())
    assert float(method.distill_loss(out).detach()) == pytest.approx(0.0, abs=1e-6)
    assert method.extra_losses(out, torch.zeros(2, dtype=torch.long))["attn_distill"].abs() < 1e-5
    # KL = CE - teacher entropy: the CE alone equals the entropy here, not 0
    t = out.extras["teacher_logits"][0]
    ce = -(t.softmax(-1) * out.out.attn_logits[0].log_softmax(-1)).sum(-1).mean()
    assert ce > 0.1 and float(attention_kl(t, out.out.attn_logits[0]).detach()) == pytest.approx(0.0, abs=1e-6)


def test_distill_layers_and_inference_without_teacher(x: torch.Tensor) -> None:
    deep = tiny_fixture_backbone(depth=6)
    method = build_method("attn_distill", deep, 3)
    assert method.transferred_layers() == [0, 1, 2]
    assert build_method("attn_distill", deep, 3, {"layers": 5}).transferred_layers() == [0, 1, 2, 3, 4]
    method.eval()
    assert "teacher_logits" not in method(x, method.capture_for_loss()).extras
    method.train()
    out = method(x, method.capture_for_loss())
    assert sorted(out.extras["teacher_logits"]) == [0, 1, 2]


def test_training_teaches_students_and_never_touches_the_teacher(sharp: Backbone) -> None:
    data = rgb_squares(4, masks=False)
    h0 = weights_hash(sharp.model)
    cfg = TrainConfig(steps=6, batch_size=6, lr=3e-3, seed=0)
    results = {}
    for name in ("attn_copy", "attn_distill", "scratch"):
        method = build_method(name, sharp, 3)
        start = {k: v.clone() for k, v in method.student.state_dict().items()}
        results[name] = train(method, data, None, cfg).history
        assert any(not torch.equal(v, method.student.state_dict()[k]) for k, v in start.items())
    assert "attn_distill" in results["attn_distill"][0] and "attn_distill" not in results["scratch"][0]
    assert weights_hash(sharp.model) == h0


def test_distill_gradient_pulls_student_maps_to_the_teachers(sharp: Backbone, x: torch.Tensor) -> None:
    method = build_method("attn_distill", sharp, 3).train()
    opt = torch.optim.Adam(method.trainable_parameters(), lr=1e-2)
    kl = []
    for _ in range(20):
        loss = method.distill_loss(method(x, method.capture_for_loss()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        kl.append(float(loss.detach()))
    assert kl[-1] < 0.5 * kl[0], kl


@pytest.mark.parametrize("name", ["attn_copy", "attn_distill", "scratch", "fort_full", "fort_lora", "fort_bitfit"])
def test_checkpoint_round_trip_and_views(fixture_backbone: Backbone, x: torch.Tensor, tmp_path, name: str) -> None:
    """The new methods save/load through the card format and every view they list works."""
    from toast_core import views as A
    from toast_core.storage.checkpoints import load_module, save_module

    method = build_method(name, fixture_backbone, 3, {"seed": 5}).eval()
    loaded = load_module(save_module(method, tmp_path / name, task="t"), fixture_backbone).eval()
    assert type(loaded) is type(method)
    assert torch.allclose(loaded(x).logits, method(x).logits, atol=1e-6)
    for view in method.views():
        assert A.compute_view(view, method, x).map.shape == (2, 4, 4)


# --- the benchmark's recovery ratio ------------------------------------------------------------------
def _bench(monkeypatch):
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))  # as the script runs
    return importlib.import_module("attention_transfer")


def test_recovery_is_the_share_of_the_scratch_to_teacher_gap_with_a_paired_interval(monkeypatch):
    import numpy as np

    bench = _bench(monkeypatch)
    n = 400
    hits = lambda k: {"correct": np.arange(n) < k}  # the first k of n images right
    v, lo, hi = bench.recovery(hits(200), hits(80), hits(240))  # (0.50 - 0.20) / (0.60 - 0.20)
    assert v == pytest.approx(0.75) and lo < 0.75 < hi and hi - lo < 0.5
    # no measurable gap between scratch and teacher: nothing to recover, the ratio is undefined
    v, lo, hi = bench.recovery(hits(200), hits(80), hits(82))
    assert np.isnan(v) and np.isnan(lo) and np.isnan(hi)


def test_benchmark_smoke_reports_recovery_and_whether_scratch_learnt(monkeypatch, capsys):
    bench = _bench(monkeypatch)
    assert bench.main(["--smoke"]) == 0
    result = capsys.readouterr().out.strip().splitlines()[-1]
    assert result.startswith("RESULT ") and "smoke=1" in result
    for key in ("copy_recovery=", "distill_recovery=", "scratch_above_chance=", "finetune_acc="):
        assert key in result
