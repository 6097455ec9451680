"""FORT position prompts and the few-shot evaluation: prompts find the object, the loss does what it says,
FORT composes with full FT / LoRA / BitFit (α = 0 is exactly the base method), episodes are scored.

Tiny fixture backbones on one CPU thread. The "prompts land on the object" check needs a backbone whose
attention means something: the fast version builds one by hand (attention keys read patch brightness,
so every query attends to the bright object); the slow version uses the embedded pretrained backbone
on single-object scenes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_factory import squares, support_set

from toast_core.core.backbone import Backbone, tiny_fixture_backbone
from toast_core.core.forward import Capture, steered_forward
from toast_core.data.base import LabeledImages
from toast_core.methods import build_method, config_for
from toast_core.methods.fort import (
    FortLoRA,
    default_prompt_patches,
    prompt_loss,
    prompt_mass,
    prompt_targets,
    ridge_head,
)
from toast_core.training.fewshot import (
    FewShotConfig,
    MethodSpec,
    evaluate_fewshot,
    mean_ci95,
    official_n_way,
    paired_difference,
)
from toast_core.training.train import TrainConfig, prepare_batch, train
from toast_core.views import focus_share


# --- pure pieces ------------------------------------------------------------------------------------
def test_prompt_targets_keep_top_p_weighted_or_uniform() -> None:
    imp = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3]])
    weighted = prompt_targets(imp, 3, "importance")
    expected = torch.tensor([[0.0, 0.5, 0.0, 0.9, 0.0, 0.3]]) / 1.7
    assert torch.allclose(weighted, expected, atol=1e-6)
    uniform = prompt_targets(imp, 3, "uniform")
    assert torch.allclose(uniform, torch.tensor([[0, 1, 0, 1, 0, 1]]) / 3.0)
    # negative kept importance is clipped; all-non-positive falls back to the many-hot
    neg = prompt_targets(torch.tensor([[-1.0, -2.0, -3.0]]), 2, "importance")
    assert torch.allclose(neg, torch.tensor([[0.5, 0.5, 0.0]]))
    assert default_prompt_patches(196) == 14 and default_prompt_patches(144) == 10 and default_prompt_patches(4) == 1


def test_ridge_head_matches_primal_solution_and_separates() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(12) % 3
    feats = torch.randn(12, 20, generator=g) + 3 * torch.nn.functional.one_hot(labels, 20).float()
    w, b = ridge_head(feats, labels, 3, lam=2.0)
    x = feats.double()
    primal = torch.linalg.solve(x.T @ x + 2.0 * torch.eye(20, dtype=x.dtype), x.T @ torch.nn.functional.one_hot(labels, 3).double())
    assert torch.allclose(w.double(), primal.T, atol=1e-6) and torch.all(b == 0)
    assert torch.equal((feats @ w.T + b).argmax(1), labels)


def test_prompt_loss_uses_patch_keys_only_every_query() -> None:
    """Registers (and CLS) are excluded by index; R averages the CE over every query token and image."""
    bk = tiny_fixture_backbone(reg_tokens=2)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = steered_forward(bk.model, x, capture=Capture(attn_logits=[-1]))
    assert out.patch_start == 3
    logits = out.attn_logits[1]  # (B, H, 19, 19)
    t = prompt_targets(torch.rand(2, 16, generator=torch.Generator().manual_seed(1)), 3)
    manual = []
    for b in range(2):
        z = logits[b].mean(0)[:, 3:] / 2.0  # keys: the 16 patch tokens; every one of the 19 queries
        manual.append(-(t[b] * z.log_softmax(-1)).sum(-1).mean())
    assert torch.allclose(prompt_loss(logits, t, out.patch_start, tau=2.0), torch.stack(manual).mean(), atol=1e-6)
    with pytest.raises(ValueError, match="patch keys"):
        prompt_loss(logits, t, 2)


# --- prompts find the object ----------------------------------------------------------------------
def bright_object_backbone(beta: float = 8.0) -> Backbone:
    """A 64 px fixture rebuilt so attention means something: no position embedding, the patch
    embedding's channel 0 is the patch's mean brightness (other channels constant), and in every
    block every query is a constant whose keys read that channel — all tokens attend to bright patches."""
    bk = tiny_fixture_backbone(img_size=64, seed=3)
    m = bk.model
    d, heads = m.embed_dim, m.blocks[0].attn.num_heads
    hd = d // heads
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.pos_embed.zero_()
        w = m.patch_embed.proj.weight
        w.zero_()
        w[0] = 1.0 / w[0].numel()
        bias = torch.randn(d, generator=g)
        bias[0] = 0.0
        m.patch_embed.proj.bias.copy_(bias)
        m.cls_token.copy_(bias.view(1, 1, d))
        m.cls_token[0, 0, 0] = -1.0  # a dark CLS key
        for blk in m.blocks:
            qkv = blk.attn.qkv
            qkv.weight[: 2 * d] = 0.0
            qkv.bias[: 2 * d] = 0.0
            for h in range(heads):
                qkv.bias[h * hd] = beta  # q: the same for every token
                qkv.weight[d + h * hd, 0] = 1.0  # k: the brightness channel
    return bk


def bright_objects(n: int = 6, size: int = 64, seed: int = 0) -> LabeledImages:
    """Dark noise with one bright 16x16 square (2x2 patches, patch-aligned); its colour is the label."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[250, 250, 60], [60, 250, 250]], dtype=torch.uint8)
    images = torch.randint(20, 60, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        r, c = torch.randint(0, size // 8 - 1, (2,), generator=g).tolist()
        images[i, :, 8 * r : 8 * r + 16, 8 * c : 8 * c + 16] = colours[labels[i]].view(3, 1, 1)
        masks[i, 8 * r : 8 * r + 16, 8 * c : 8 * c + 16] = True
    return LabeledImages(images, labels, ["yellow", "cyan"], masks)


@pytest.mark.parametrize("head_agg", ["min", "mean"])
def test_prompts_land_on_the_object_when_attention_means_something(head_agg: str) -> None:
    bk, data = bright_object_backbone(), bright_objects()
    method = build_method("fort_full", bk, 2, {"head_agg": head_agg})
    assert method.prompt_count() == 4  # round(0.07 · 64)
    grid = method.prepare_prompts(data)
    assert grid.shape == (6, 8, 8)
    assert torch.allclose(grid.flatten(1).sum(1), torch.ones(6))
    share = focus_share(grid.numpy(), data.masks)
    assert np.all(share > 0.99), share  # the 4 object patches are exactly the prompt
    # control: queries that prefer DARK keys move every prompt off the object (prompts follow attention)
    dark = build_method("fort_full", bright_object_backbone(beta=-8.0), 2, {"head_agg": head_agg})
    assert focus_share(dark.prepare_prompts(data).numpy(), data.masks).max() < 0.01


@pytest.mark.slow
def test_prompts_on_single_object_scenes_with_the_embedded_backbone() -> None:
    """Pretrained backbone, one object per scene: the prompts concentrate on the object.

    Measured with the retrained backbone (2026-11-21): 0.29 of the mass on objects covering 0.055 of
    the image (5.3x); the earlier, weaker backbone gave 0.44. The controlled test above checks the
    "most of the mass" case; here the bar is a clear multiple of chance.
    """
    from toast_core.core.backbone import load_backbone
    from toast_core.data.scenes import SOURCE_CLASSES, render_scene

    bk = load_backbone("embedded", device="cpu")
    size = bk.layout.img_size[0]
    kinds = [SOURCE_CLASSES[i] for i in (0, 1, 2, 12, 14)]
    images, masks, labels = [], [], []
    for i in range(10):
        rng = np.random.default_rng([7, i])
        scene = render_scene(rng, [kinds[i % 5]], [float(rng.uniform(0.28, 0.36) * size)], size)
        images.append(torch.from_numpy(scene.image).permute(2, 0, 1))
        masks.append(torch.from_numpy(scene.index_map == 1))
        labels.append(i % 5)
    data = LabeledImages(torch.stack(images).contiguous(), torch.tensor(labels), kinds, torch.stack(masks))
    method = build_method("fort_full", bk, 5, {"head_agg": "mean"})
    share = focus_share(method.prepare_prompts(data).numpy(), data.masks)
    area = data.masks.float().mean(dim=(1, 2)).numpy()
    assert share.mean() > 0.2 and share.mean() > 4 * area.mean(), (share, area)


# --- the loss and the composition ----------------------------------------------------------------
def test_rows_are_matched_to_their_prompts_by_content(fixture_backbone: Backbone) -> None:
    data = support_set(fixture_backbone)
    method = build_method("fort_lora", fixture_backbone, 3)
    with pytest.raises(RuntimeError, match="prepare_prompts"):
        method.targets_for(prepare_batch(method, data.images))
    method.prepare_prompts(data)
    perm = torch.tensor([4, 0, 5, 2])
    x = prepare_batch(method, data.images[perm])
    assert torch.equal(method.targets_for(x), method.prompt_targets[perm])
    other = squares(n_classes=3, per_class=1, seed=9)
    with pytest.raises(ValueError, match="not support images"):
        method.targets_for(prepare_batch(method, other.images))


@pytest.mark.parametrize(
    "base, fort, settings",
    [("full", "fort_full", {}), ("lora", "fort_lora", {"targets": ("qkv", "proj")}), ("bitfit", "fort_bitfit", {})],
)
def test_alpha_zero_is_the_base_method_step_for_step(fixture_backbone: Backbone, base: str, fort: str, settings: dict) -> None:
    data = support_set(fixture_backbone)
    cfg = TrainConfig(steps=4, batch_size=3, lr=1e-2, seed=3)
    plain = build_method(base, fixture_backbone, 3, dict(settings))
    zero = build_method(fort, fixture_backbone, 3, {**settings, "fort_alpha": 0.0})
    zero.prepare_prompts(data)  # prompts exist but weigh nothing
    assert zero.state_dict().keys() == plain.state_dict().keys()
    h_plain = train(plain, data, None, cfg).history
    h_zero = train(zero, data, None, cfg).history
    for key, value in plain.state_dict().items():
        assert torch.equal(value, zero.state_dict()[key]), key
    assert [h["loss"] for h in h_plain] == [h["loss"] for h in h_zero]
    assert "fort_attention" not in h_zero[0]
    # with α > 0 the same run differs and logs the term
    on = build_method(fort, fixture_backbone, 3, {**settings, "fort_alpha": 1.0})
    on.prepare_prompts(data)
    h_on = train(on, data, None, cfg).history
    assert h_on[0]["fort_attention"] > 0
    assert any(not torch.equal(v, on.state_dict()[k]) for k, v in plain.state_dict().items())


def test_minimising_r_moves_last_block_attention_to_the_prompts(fixture_backbone: Backbone) -> None:
    data = support_set(fixture_backbone)
    method = build_method("fort_full", fixture_backbone, 3, {"fort_alpha": 1.0})
    method.prepare_prompts(data)
    x = prepare_batch(method, data.images)
    last = len(method.vit.blocks) - 1

    def mass() -> float:
        with torch.no_grad():
            out = method(x, Capture(attn_logits=[last])).out
        return float(prompt_mass(out.attn_logits[last], method.prompt_targets, out.patch_start).mean())

    before = mass()
    opt = torch.optim.Adam(method.trainable_parameters(), lr=3e-3)
    method.train()
    rs = []
    for _ in range(15):
        output = method(x, method.capture_for_loss())
        loss = method.extra_losses(output, data.labels)["fort_attention"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        rs.append(float(loss.detach()))
    after = mass()
    assert rs[-1] < rs[0]
    assert after > before + 0.1 and after > 1.5 * before, (before, after)


def test_registry_defaults_and_describe(fixture_backbone: Backbone) -> None:
    lora = build_method("fort_lora", fixture_backbone, 3)
    assert isinstance(lora, FortLoRA)
    assert lora.config.targets == ("qkv", "proj") and lora.config.fort_alpha == 0.5 and lora.config.tau == 1.0
    assert build_method("fort_full", fixture_backbone, 3).config.fort_alpha == 0.03
    info = lora.describe()
    # default: the code's importance-weighted prompts and mass, with the paper's mean over heads
    assert info["fort"]["prompt_patches"] == 1 and info["fort"]["form"] == "head mean, importance prompts, target mass P"
    official = build_method("fort_lora", fixture_backbone, 3, {"head_agg": "min"}).describe()
    assert official["fort"]["form"] == "official code"
    assert "lora_form" in info
    with pytest.raises(ValueError, match="head_agg"):
        config_for("fort_full", head_agg="max")
    with pytest.raises(ValueError, match="Unknown setting"):
        config_for("fort_bitfit", alpha=0.5)
    # a FORT method's trainable set is exactly its base method's
    assert lora.trainable_count() == build_method("lora", fixture_backbone, 3, {"targets": ("qkv", "proj")}).trainable_count()


# --- few-shot evaluation ----------------------------------------------------------------------------
def test_fewshot_episodes_paired_scored_and_capped(fixture_backbone: Backbone) -> None:
    data = squares(n_classes=5, per_class=4)
    specs = [
        MethodSpec("probe", "linear", lr=1e-2, steps=0),
        MethodSpec("FT", "full", lr=1e-3),
        MethodSpec("FT+FORT", "fort_full", lr=1e-3, episodes=2),
    ]
    cfg = FewShotConfig(n_way=3, k_shot=1, n_query=2, episodes=3, steps=2)
    seen = []
    res = evaluate_fewshot(fixture_backbone, data, specs, cfg, progress=seen.append)
    assert [res[k].episodes for k in ("probe", "FT", "FT+FORT")] == [3, 3, 2]
    assert len(seen) == 8
    for s in res.values():
        assert 0.0 <= s.acc <= 1.0 and s.focus is not None and 0.0 <= s.focus <= 1.0
        assert s.area == pytest.approx((32 // 3) ** 2 / 32**2, abs=1e-6)
        assert s.acc == pytest.approx(np.mean([r.acc for r in s.results]))
    assert res["FT+FORT"].prompt_on_object is not None and res["FT"].prompt_on_object is None
    mean, ci, n = paired_difference(res["FT+FORT"], res["FT"])
    assert n == 2 and mean == pytest.approx(np.mean([a.acc - b.acc for a, b in zip(res["FT+FORT"].results, res["FT"].results)]))
    # a ridge head alone (0 steps) already classifies these well-separated colours
    assert res["probe"].acc > 0.6
    # a past deadline stops before the first episode
    done = evaluate_fewshot(fixture_backbone, data, specs[:1], cfg, deadline=0.0)
    assert done["probe"].episodes == 0


def test_ci_and_official_ways() -> None:
    mean, ci = mean_ci95([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and ci == pytest.approx(1.96 * 0.2 / np.sqrt(3))
    assert mean_ci95([0.5]) == (0.5, 0.0)
    assert official_n_way(8) == 5 and official_n_way(10) == 5 and official_n_way(64) == 20
