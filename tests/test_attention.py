"""Attention views and focus metrics on tiny fixtures: rollout maths on synthetic maps, patch slicing
past prefix / prompt / distillation / register tokens, non-square grids, Grad-CAM on CPU for every
method, TOAST views, and the focus scores' defining properties."""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from torch import Tensor, nn

from toast_core import views as A
from toast_core.core.backbone import Backbone, freeze, tiny_fixture_backbone, token_layout, weights_hash
from toast_core.core.forward import Capture, steered_forward
from toast_core.methods.base import SteeringMethod

NUM_PROMPTS = 3


class PromptMethod(SteeringMethod):
    """VPT-style test method: inserts NUM_PROMPTS learnt tokens after the prefix before `insert_at`."""

    name: ClassVar[str] = "test_prompts"
    insert_at: int = 0

    def build(self) -> None:
        self.prompt = nn.Parameter(torch.randn(1, NUM_PROMPTS, self.layout.embed_dim))

    def prompts(self, layer: int, batch: int) -> Tensor | None:
        return self.prompt if layer == self.insert_at else None


class LatePromptMethod(PromptMethod):
    """Prompts appear only before block 1, so block 0 sees fewer tokens than block 1."""

    name: ClassVar[str] = "test_late_prompts"
    insert_at = 1


def _distilled_backbone() -> Backbone:
    torch.manual_seed(0)
    model = VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0
    )
    freeze(model)
    return Backbone(model, "fixture:deit-distilled", "fixture", token_layout(model), weights_hash(model))


@functools.cache
def _backbone(kind: str) -> Backbone:
    """Frozen backbones are read-only, so one per token layout serves every test."""
    if kind == "distilled":
        return _distilled_backbone()
    kwargs = {
        "registers": dict(reg_tokens=4),
        "no_cls": dict(class_token=False, global_pool="avg"),
        "non_square": dict(img_size=(32, 48)),
    }.get(kind, {})
    return tiny_fixture_backbone(**kwargs)


def _case(kind: str) -> tuple[SteeringMethod, int]:
    """(method, number of tokens before the patches in the final sequence)."""
    before = {"plain": 1, "registers": 5, "no_cls": 0, "non_square": 1, "distilled": 2}
    if kind in before:
        return SteeringMethod(_backbone(kind), 4), before[kind]
    if kind == "prompts":
        return PromptMethod(_backbone("plain"), 4), 1 + NUM_PROMPTS
    if kind == "late_prompts":
        return LatePromptMethod(_backbone("plain"), 4), 1 + NUM_PROMPTS
    raise KeyError(kind)


KINDS = ("plain", "registers", "no_cls", "non_square", "distilled", "prompts", "late_prompts")


def _images(method: SteeringMethod, batch: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(batch, 3, *method.layout.img_size, generator=gen)


# --- rollout maths on synthetic attention ------------------------------------------------------


def test_rollout_of_identity_attention_is_identity_and_reads_uniform_without_cls() -> None:
    n, p = 17, 16
    eye = torch.eye(n).expand(2, 3, n, n)
    r = A.attention_rollout([eye, eye, eye], num_prefix=1)
    torch.testing.assert_close(r, torch.eye(n).expand(2, n, n))
    # no CLS: mean over patch rows of the patch columns is uniform
    r0 = A.attention_rollout([torch.eye(p).expand(1, 2, p, p)] * 2, num_prefix=0)
    torch.testing.assert_close(A.rollout_readout(r0, p, has_cls=False), torch.full((1, p), 1.0 / p))


def test_rollout_of_uniform_attention_reads_uniform_patches_at_cls() -> None:
    n, p = 17, 16
    uniform = torch.full((1, 2, n, n), 1.0 / n)
    imp = A.rollout_readout(A.attention_rollout([uniform, uniform], num_prefix=1), p, has_cls=True)
    assert torch.allclose(imp, imp[:, :1].expand_as(imp))
    assert 0 < float(imp.sum()) < 1  # the rest stays on the CLS token itself


def test_rollout_matches_the_hand_written_product() -> None:
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 3, 6, 6, generator=gen).softmax(-1) for _ in range(3)]
    expected = np.stack([np.eye(6)] * 2)
    for m in maps:
        a = 0.5 * m.double().mean(1).numpy() + 0.5 * np.eye(6)
        a = a / a.sum(-1, keepdims=True)
        expected = a @ expected
    np.testing.assert_allclose(A.attention_rollout(maps, num_prefix=1).numpy(), expected, rtol=1e-5)


def test_rollout_embeds_layers_that_ran_before_prompts_were_inserted() -> None:
    gen = torch.Generator().manual_seed(1)
    first = torch.randn(1, 2, 5, 5, generator=gen).softmax(-1)  # CLS + 4 patches
    second = torch.randn(1, 2, 7, 7, generator=gen).softmax(-1)  # CLS + 2 prompts + 4 patches
    r = A.attention_rollout([first, second], num_prefix=1)
    a1 = 0.5 * first.mean(1)[0] + 0.5 * torch.eye(5)
    a1 = a1 / a1.sum(-1, keepdim=True)
    big = torch.eye(7)
    keep = torch.tensor([0, 3, 4, 5, 6])
    big[keep[:, None], keep[None, :]] = a1
    a2 = 0.5 * second.mean(1)[0] + 0.5 * torch.eye(7)
    a2 = a2 / a2.sum(-1, keepdim=True)
    torch.testing.assert_close(r[0], a2 @ big)


def test_gradient_rollout_core_identity_uniform_and_gradient_pulls_importance() -> None:
    p = 16
    eye = torch.eye(p).expand(1, 2, p, p)
    torch.testing.assert_close(A.gradient_rollout_from([eye, eye]), torch.full((1, p), 1.0 / p))
    g = torch.zeros(1, p)
    g[0, 5] = 1.0
    imp = A.gradient_rollout_from([eye, eye], g, lam=1.0)
    assert int(imp.argmax()) == 5
    torch.testing.assert_close(imp.sum(), torch.tensor(1.0))


def test_gradient_rollout_keeps_the_official_top_share_per_row() -> None:
    p = 20  # keep_top 0.1 → zero int(20·0.9) = 18 entries, keep 2
    gen = torch.Generator().manual_seed(2)
    m = torch.rand(1, 1, p, p, generator=gen)
    a = m[0, 0].double()
    top = a.topk(2, dim=-1)
    kept = torch.zeros_like(a).scatter_(-1, top.indices, top.values) + torch.eye(p, dtype=a.dtype)
    expected = (kept / kept.sum(-1, keepdim=True)).mean(0).float()
    torch.testing.assert_close(A.gradient_rollout_from([m]), expected[None])


def test_fort_direction_is_the_first_principal_component() -> None:
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(8, generator=gen)
    coeff = torch.randn(1, 16, 1, generator=gen)
    g = A.fort_gradient_direction(coeff * direction + 3.0)  # rank one after centring
    centred = (coeff - coeff.mean(1, keepdim=True))[..., 0] * direction.norm()
    assert torch.allclose(g.abs().double(), centred.abs().double(), atol=1e-5)


# --- views on real (tiny) backbones with every token layout ------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cls_maps_slice_exactly_the_patch_tokens(kind: str) -> None:
    method, before = _case(kind)
    x = _images(method)
    gh, gw = method.layout.grid
    maps = A.cls_maps(method, x)
    assert maps.maps.shape == (2, method.layout.depth, method.layout.num_heads, gh, gw)
    with torch.no_grad():
        out = steered_forward(method.vit, x, steer=method, capture=Capture(cls_attn=True))
    prefix = method.layout.num_prefix_tokens
    for layer in range(method.layout.depth):
        row = out.cls_attn[layer]
        start = prefix if (kind == "late_prompts" and layer == 0) else before
        assert row.shape[-1] == start + gh * gw
        expected = row[..., start:].reshape(2, -1, gh, gw).numpy()
        np.testing.assert_allclose(maps.maps[:, layer], expected, rtol=1e-6)
    # row-major grid: patch (i, j) is token start + i·gw + j
    np.testing.assert_allclose(
        maps.maps[1, -1, 0, 1, gw - 1], out.cls_attn[1][1, 0, before + gw + gw - 1].item(), rtol=1e-6
    )
    mean_view = maps.view(-1, "mean")
    assert mean_view.map.shape == (2, gh, gw) and mean_view.layer == method.layout.depth - 1
    np.testing.assert_allclose(mean_view.map, maps.maps[:, -1].mean(1), rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_all_views_run_on_every_token_layout(kind: str) -> None:
    method, _ = _case(kind)
    x = _images(method)
    grid = method.layout.grid
    cls, roll = A.cls_and_rollout(method, x)
    # the one-forward CLS rows (from full maps) equal the forward's own CLS-row capture
    np.testing.assert_allclose(cls.maps, A.cls_maps(method, x).maps, atol=1e-6)
    np.testing.assert_allclose(roll.map, A.rollout_view(method, x).map, atol=1e-6)
    assert roll.map.shape == (2, *grid) and (roll.map >= 0).all()
    if kind == "no_cls":  # no CLS: the readout averages patch rows whose columns sum to ≤ 1
        assert (roll.map.sum((1, 2)) <= 1 + 1e-5).all()
    cam = A.gradcam(method, x)
    assert cam.map.shape == (2, *grid) and (cam.map >= 0).all() and cam.map.max() > 0
    grad_roll = A.gradient_rollout(method, x)
    assert grad_roll.shape == (2, *grid)
    torch.testing.assert_close(grad_roll.sum((1, 2)), torch.ones(2), atol=1e-4, rtol=0)
    for view in (cls.view(), roll, cam):
        assert view.pred.shape == (2,) and ((view.conf > 0) & (view.conf <= 1)).all()


def test_rollout_view_equals_rollout_of_captured_maps_with_prompts() -> None:
    method, before = _case("late_prompts")
    x = _images(method)
    with torch.no_grad():
        out = steered_forward(method.vit, x, steer=method, capture=Capture(attn=True))
    r = A.attention_rollout([out.attn[0], out.attn[1]], num_prefix=1)
    expected = r[:, 0, before:].reshape(2, *method.layout.grid).numpy()
    np.testing.assert_allclose(A.rollout_view(method, x).map, expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "prompts", "late_prompts", "distilled"])
def test_gradcam_captum_and_autograd_engines_agree(kind: str) -> None:
    method, _ = _case(kind)
    x = _images(method)
    via_captum = A.gradcam(method, x, engine="captum")
    via_autograd = A.gradcam(method, x, engine="autograd")
    assert via_captum.meta["engine"] == "captum" and via_autograd.meta["engine"] == "autograd"
    np.testing.assert_allclose(via_captum.map, via_autograd.map, rtol=1e-4, atol=1e-7)
    assert via_captum.map.max() > 0


def test_gradcam_target_changes_the_map_and_is_validated() -> None:
    method, _ = _case("plain")
    x = _images(method)
    a, b = A.gradcam(method, x, target=0), A.gradcam(method, x, target=1)
    assert a.meta["target"] == [0, 0] and b.meta["target"] == [1, 1]
    assert not np.allclose(a.map, b.map)
    with pytest.raises(ValueError, match="target"):
        A.gradcam(method, x, target=9)


def test_views_restore_the_training_flag_and_leave_no_gradients() -> None:
    method, _ = _case("prompts")
    method.train()
    A.gradcam(method, _images(method))
    A.gradient_rollout(method, _images(method))
    assert method.training
    assert all(p.grad is None for p in method.parameters())
    assert all(p.grad is None for p in method.vit.parameters())


def _registry_methods() -> list[str]:
    from toast_core.methods import method_names

    return method_names()


@pytest.mark.parametrize("name", _registry_methods())
def test_gradcam_runs_on_cpu_for_every_registered_method(name: str) -> None:
    from toast_core.methods import build_method

    method = build_method(name, _backbone("plain"), 3)
    cam = A.gradcam(method, _images(method))
    assert cam.map.shape == (2, 4, 4) and np.isfinite(cam.map).all()
    expected_engine = "captum" if A.is_single_pass(method) else "autograd"
    assert cam.meta["engine"] == expected_engine


def test_toast_views_read_pass1_and_selection() -> None:
    toast = pytest.importorskip("toast_core.methods.toast")
    backbone = _backbone("plain")
    method = toast.Toast(backbone, 3)
    x = _images(method)
    sel = A.selection_view(method, x)
    assert sel.map.shape == (2, 4, 4) and (sel.map >= 0).all() and (sel.map <= 1).all()
    full = method(x).extras["selection"]
    np.testing.assert_allclose(sel.map, full[:, 1:].reshape(2, 4, 4).detach().numpy(), rtol=1e-6)
    p1, p2 = A.toast_pass_views(method, x)
    # pass 1 is the frozen backbone unsteered: the same as the plain method's CLS view
    np.testing.assert_allclose(p1.map, A.cls_view(SteeringMethod(backbone, 3), x).map, rtol=1e-5)
    np.testing.assert_allclose(p2.map, A.cls_view(method, x).map, rtol=1e-6)
    assert (p1.name, p2.name) == ("toast_pass1", "toast_pass2")
    early = toast.Toast(backbone, 3, toast.ToastConfig(feedback_from=1))
    q1, _ = A.toast_pass_views(early, x)
    assert q1.meta["recomputed_unsteered"]
    np.testing.assert_allclose(q1.map, p1.map, rtol=1e-5)
    for view in method.views():
        assert A.compute_view(view, method, x).map.shape == (2, 4, 4)


def test_toast_views_refuse_methods_without_the_extras() -> None:
    method, _ = _case("plain")
    with pytest.raises(A.ViewUnavailable, match=r"extras\['selection'\]"):
        A.selection_view(method, _images(method))
    with pytest.raises(A.ViewUnavailable, match=r"extras\['pass1'\]"):
        A.toast_pass_views(method, _images(method))


def test_difference_of_two_modules() -> None:
    backbone = _backbone("plain")
    a, b = SteeringMethod(backbone, 3), PromptMethod(backbone, 3)
    x = _images(a)
    d = A.difference(a, b, x, view="cls", layer=-1)
    va, vb = A.cls_view(a, x), A.cls_view(b, x)
    unit = lambda m: m / m.sum((1, 2), keepdims=True)
    np.testing.assert_allclose(d.map, unit(va.map) - unit(vb.map), atol=1e-7)
    np.testing.assert_allclose(d.map.sum((1, 2)), 0.0, atol=1e-6)
    assert np.abs(A.difference_view(va, va).map).max() == 0
    with pytest.raises(ValueError, match="same view"):
        A.difference_view(va, A.cls_view(a, x, layer=0))


def test_view_title_reads_method_prediction_and_confidence() -> None:
    method, _ = _case("plain")
    view = A.cls_view(method, _images(method))
    k = int(view.pred[0])
    assert view.title(0) == f"base — {k} ({view.conf[0]:.2f})"
    names = [f"c{i}" for i in range(4)]
    assert view.title(0, names).startswith(f"base — c{k} (")


# --- focus metrics -----------------------------------------------------------------------------


def _one_hot_map(grid: tuple[int, int], cell: tuple[int, int]) -> np.ndarray:
    m = np.zeros(grid, dtype=np.float32)
    m[cell] = 1.0
    return m


def test_all_mass_on_one_patch_scores_full_focus_on_a_box_around_it() -> None:
    grid, size = (4, 4), (100, 150)  # patch (1, 2) covers rows 25..50, cols 75..112.5
    m = _one_hot_map(grid, (1, 2))
    tight = (75, 25, 112.5, 50)
    loose = (70, 20, 120, 60)
    assert A.focus_share(m, tight, size) == pytest.approx(1.0)
    assert A.focus_share(m, loose, size) == pytest.approx(1.0)
    assert A.pointing_game(m, tight, size)
    assert A.entropy(m) == pytest.approx(0.0)
    assert A.focus_ratio(m, tight, size) == pytest.approx(16.0)
    # the neighbouring patch is outside
    assert A.focus_share(m, (0, 0, 75, 100), size) == pytest.approx(0.0)
    assert not A.pointing_game(m, (0, 0, 75, 100), size)


def test_uniform_map_scores_the_area_share() -> None:
    grid, size = (4, 6), (90, 130)
    uniform = np.ones(grid)
    box = (10, 7, 97, 61)
    assert A.focus_share(uniform, box, size) == pytest.approx(87 * 54 / (90 * 130))
    assert A.area_share(box, grid, size) == pytest.approx(87 * 54 / (90 * 130))
    assert A.focus_ratio(uniform, box, size) == pytest.approx(1.0)
    assert A.entropy(uniform) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6  # any resolution, not a multiple of the grid
    assert A.focus_share(uniform, mask) == pytest.approx(mask.mean())
    assert A.area_share(mask, grid) == pytest.approx(mask.mean())


def test_mask_downsampling_is_the_area_fraction_per_patch() -> None:
    mask = np.zeros((100, 150), dtype=bool)
    mask[25:50, 75:113] = True  # patch (1, 2) of a 4 × 4 grid, plus half a pixel column beyond
    w = A.region_to_grid(mask, (4, 4))
    assert w[1, 2] == pytest.approx(1.0)
    assert w[1, 3] == pytest.approx(0.5 / 37.5)
    assert w.sum() == pytest.approx(mask.sum() / (25 * 37.5))
    batch = torch.from_numpy(np.stack([mask, ~mask]))
    maps = np.stack([_one_hot_map((4, 4), (1, 2))] * 2)
    np.testing.assert_allclose(A.focus_share(maps, batch), [1.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(A.pointing_game(maps, batch), [True, False])


def test_focus_metrics_accept_views_and_need_image_size_for_boxes() -> None:
    method, _ = _case("plain")
    view = A.cls_view(method, _images(method))
    scores = A.focus_metrics(view, (0, 0, 16, 16), (32, 32))
    assert set(scores) == {"focus_share", "area_share", "focus_ratio", "pointing_game", "entropy"}
    assert scores["area_share"] == pytest.approx(0.25)
    assert np.asarray(scores["focus_share"]).shape == (2,)
    with pytest.raises(ValueError, match="image_size"):
        A.focus_share(view, (0, 0, 16, 16))
