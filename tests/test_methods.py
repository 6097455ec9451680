"""The six basic steering methods: each learns, touches only its own state, counts right, round-trips.

Tiny random-init fixture backbone (d=32, depth 2, 2 heads, 32 px, patch 8) and a tiny separable
data set of coloured squares, so the whole file runs in seconds on one CPU thread.
"""

from __future__ import annotations

import copy

import pytest
import torch
from data_factory import rgb_squares

from toast_core.core.backbone import tiny_fixture_backbone
from toast_core.core.forward import Capture
from toast_core.methods import (
    REGISTRY,
    UnknownMethod,
    build_method,
    config_for,
    method_names,
)
from toast_core.methods.lora import LoRAConfig
from toast_core.methods.visual_prompt import padding_count
from toast_core.methods.vpt import prompt_init_bound
from toast_core.storage.checkpoints import load_module, save_module
from toast_core.training.train import TrainConfig, prepare_batch, train

BASIC = ("linear", "full", "bitfit", "lora", "vpt", "visual_prompt")
D, DEPTH, CLASSES, HIDDEN = 32, 2, 3, 128
HEAD = D * CLASSES + CLASSES  # 99
#: trainable parameter names each method must own (prefixes of its state_dict keys)
OWN_PREFIXES = {
    "linear": ("head.",),
    "full": ("head.", "model."),
    "bitfit": ("head.", "deltas."),
    "lora": ("head.", "adapters."),
    "vpt": ("head.", "prompt"),
    "visual_prompt": ("head.", "pad_"),
}
LR = {"linear": 3e-2, "full": 3e-3, "bitfit": 3e-2, "lora": 3e-2, "vpt": 3e-2, "visual_prompt": 3e-2}


@pytest.fixture(scope="module")
def backbone(fixture_backbone):
    """The shared tiny random-init ViT from conftest (d=32, depth 2, 2 heads, 32 px, patch 8)."""
    return fixture_backbone


@pytest.fixture(scope="module")
def data():
    return rgb_squares(12)


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module", params=BASIC)
def trained(request, backbone, data):
    """Each method trained once for 30 steps; what tests need to compare before and after."""
    name = request.param
    method = build_method(name, backbone, CLASSES)
    before = _clone_state(method)
    backbone_before = _clone_state(backbone.model)
    result = train(method, data, None, TrainConfig(steps=30, batch_size=16, lr=LR[name], seed=0))
    return name, method, result, before, backbone_before


# --- every method --------------------------------------------------------------------------------
def test_loss_falls(trained):
    name, _, result, _, _ = trained
    losses = [h["loss"] for h in result.history]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


def test_exactly_own_parameters_change(trained, backbone):
    name, method, _, before, backbone_before = trained
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    own = {n for n, _ in method.named_parameters()}
    assert trainable == own, "a method holds only what it trains"
    assert all(n.startswith(OWN_PREFIXES[name]) for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    after = method.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable, f"{name}: unchanged {sorted(trainable - changed)[:5]}"
    # the shared backbone is bitwise unchanged and still frozen / in eval mode
    now = backbone.model.state_dict()
    assert all(torch.equal(backbone_before[k], now[k]) for k in now)
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training


def test_reload_gives_identical_logits(trained, backbone, data, tmp_path):
    name, method, result, _, _ = trained
    card = save_module(method, tmp_path / name, task="squares", metrics=result.final, timings={}, extra={})
    loaded = load_module(card, backbone)
    assert type(loaded) is type(method) and loaded.config == method.config
    method.eval()
    x = prepare_batch(method, data.images[:8])
    with torch.no_grad():
        assert torch.equal(method(x).logits, loaded(x).logits)


def test_full_finetune_changes_its_copy_only(backbone):
    method = build_method("full", backbone, CLASSES)
    assert method.vit is method.model and method.vit is not backbone.model
    train(method, rgb_squares(4), None, TrainConfig(steps=3, batch_size=8, lr=1e-2))
    copy_state, shared = method.model.state_dict(), backbone.model.state_dict()
    assert not torch.equal(copy_state["blocks.0.attn.qkv.weight"], shared["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("name", ["full", "bitfit", "lora"])
def test_starts_as_the_linear_probe(backbone, data, name):
    """Zero-init deltas / an exact copy: before training the output equals the linear probe's."""
    x = prepare_batch(REGISTRY["linear"](backbone, CLASSES), data.images[:4])
    with torch.no_grad():
        ref = build_method("linear", backbone, CLASSES).eval()(x).logits
        got = build_method(name, backbone, CLASSES).eval()(x).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


# --- trainable counts: hand arithmetic on d=32, depth 2, mlp 128, 3 classes, 32 px / patch 8 -------
def _count(backbone, name, **cfg):
    return build_method(name, backbone, CLASSES, cfg).trainable_count()


def test_trainable_counts(backbone):
    block = (3 * D * D + 3 * D) + (D * D + D) + (D * HIDDEN + HIDDEN) + (HIDDEN * D + D) + 4 * D
    vit = (3 * 8 * 8 * D + D) + D + (1 + 16) * D + DEPTH * block + 2 * D
    assert _count(backbone, "linear") == HEAD == 99
    assert _count(backbone, "full") == vit + HEAD == 32323
    biases = DEPTH * (3 * D + D + HIDDEN + D + 2 * D) + D  # qkv, proj, fc1, fc2, norm1, norm2; final
    assert _count(backbone, "bitfit") == biases + HEAD == 835
    assert _count(backbone, "bitfit", norms=False) == DEPTH * (3 * D + D + HIDDEN + D) + HEAD
    assert _count(backbone, "lora") == 2 * 2 * (4 * 32 + 32 * 4) + HEAD == 1123
    assert _count(backbone, "lora", targets=("qkv",), r=2) == DEPTH * (2 * D + 3 * D * 2) + HEAD
    assert _count(backbone, "lora", targets=("q", "v", "proj"), r=8) == 3 * DEPTH * 2 * 8 * D + HEAD
    assert _count(backbone, "lora", layers=(1,)) == 2 * (4 * D + D * 4) + HEAD
    assert _count(backbone, "vpt") == 10 * D + HEAD
    assert _count(backbone, "vpt", num_tokens=5, deep=True) == DEPTH * 5 * D + HEAD
    w = round(30 * 32 / 224)  # 4
    assert _count(backbone, "visual_prompt") == 3 * (2 * w * 32 + 2 * w * (32 - 2 * w)) + HEAD == 1443
    assert _count(backbone, "visual_prompt", kind="fixed_patch", size=5) == 3 * 25 + HEAD


def test_visual_prompt_padding_count_matches_paper():
    big = tiny_fixture_backbone(img_size=224, patch_size=32, embed_dim=16, depth=1, num_heads=1)
    method = build_method("visual_prompt", big, 2)
    assert method.size == 30
    assert method.trainable_count() - (16 * 2 + 2) == padding_count(224, 224, 30) == 69_840


# --- touch points compute what the papers define ---------------------------------------------------
def test_lora_paper_form_equals_merged_weights_and_leaves_k(backbone, data):
    method = build_method("lora", backbone, CLASSES, {"alpha": 8.0})
    torch.manual_seed(1)
    for adapter in method.adapters.values():
        torch.nn.init.normal_(adapter.B, std=0.3)
    merged = copy.deepcopy(backbone.model)
    for layer, blk in enumerate(merged.blocks):
        delta = method.merged_delta(layer, "qkv")
        assert torch.count_nonzero(delta[D : 2 * D]) == 0, "W_k untouched"
        assert torch.count_nonzero(delta[:D]) > 0 and torch.count_nonzero(delta[2 * D :]) > 0
        blk.attn.qkv.weight.data += delta
    assert method.scale == 8.0 / 4
    x = prepare_batch(method, data.images[:4])
    with torch.no_grad():
        torch.testing.assert_close(
            method.eval()(x).out.tokens, merged.forward_features(x), atol=1e-5, rtol=1e-5
        )
    assert method.describe()["lora_form"].startswith("paper")


def test_lora_fused_qkv_form(backbone, data):
    method = build_method("lora", backbone, CLASSES, {"targets": ["qkv", "proj"]})
    assert method.config.targets == ("qkv", "proj")
    for adapter in method.adapters.values():
        torch.nn.init.normal_(adapter.B, std=0.3)
    merged = copy.deepcopy(backbone.model)
    for layer, blk in enumerate(merged.blocks):
        qkv = method.merged_delta(layer, "qkv")
        assert torch.count_nonzero(qkv[D : 2 * D]) > 0, "the fused form also moves W_k"
        blk.attn.qkv.weight.data += qkv
        blk.attn.proj.weight.data += method.merged_delta(layer, "proj")
    x = prepare_batch(method, data.images[:4])
    with torch.no_grad():
        torch.testing.assert_close(
            method.eval()(x).out.tokens, merged.forward_features(x), atol=1e-5, rtol=1e-5
        )
    assert method.describe()["lora_form"].startswith("fused")


def test_lora_config_is_checked():
    with pytest.raises(ValueError, match="cannot be combined"):
        LoRAConfig(targets=("qkv", "q"))
    with pytest.raises(ValueError, match="among"):
        LoRAConfig(targets=("fc1",))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(r=0)


def test_bitfit_deltas_equal_changed_biases(backbone, data):
    """Every covered bias delta acts exactly as if the backbone's own bias had that value."""
    method = build_method("bitfit", backbone, CLASSES)
    torch.manual_seed(2)
    for p in method.deltas.values():
        torch.nn.init.normal_(p, std=0.2)
    ref = copy.deepcopy(backbone.model)
    for layer, blk in enumerate(ref.blocks):
        for site, mod in (
            ("qkv", blk.attn.qkv),
            ("proj", blk.attn.proj),
            ("fc1", blk.mlp.fc1),
            ("fc2", blk.mlp.fc2),
            ("norm1", blk.norm1),
            ("norm2", blk.norm2),
        ):
            mod.bias.data += method.deltas[f"{site}_{layer}"]
    ref.norm.bias.data += method.deltas["final_norm"]
    x = prepare_batch(method, data.images[:4])
    with torch.no_grad():
        torch.testing.assert_close(method.eval()(x).out.tokens, ref.forward_features(x), atol=1e-5, rtol=1e-5)
    assert "patch_embed" in method.describe()["biases_not_covered"]


def test_vpt_deep_overwrites_prompt_slots(backbone, data):
    p = 5
    method = build_method("vpt", backbone, CLASSES, {"num_tokens": p, "deep": True}).eval()
    assert method.config.effective_dropout == 0.1
    x = prepare_batch(method, data.images[:3])
    with torch.no_grad():
        out = method(x, Capture(block_inputs=True, cls_attn=[-1])).out
    assert out.num_prompts == p and out.patch_start == 1 + p
    for layer in range(DEPTH):
        inp = out.block_inputs[layer]
        assert inp.shape[1] == 1 + p + 16, "overwritten, not accumulated"
        assert torch.equal(inp[:, 1 : 1 + p], method.prompt[layer].expand(3, -1, -1))
    assert out.cls_attn[DEPTH - 1].shape[-1] == 1 + p + 16


def test_vpt_shallow_carries_prompts_and_init_bound(backbone, data):
    method = build_method("vpt", backbone, CLASSES, {"num_tokens": 4}).eval()
    bound = prompt_init_bound((8, 8), D)
    assert bound == pytest.approx((6 / (3 * 64 + 32)) ** 0.5)
    assert method.prompt.abs().max() <= bound and method.config.effective_dropout == 0.0
    assert prompt_init_bound((16, 16), 768) == pytest.approx(0.0625)
    x = prepare_batch(method, data.images[:2])
    with torch.no_grad():
        out = method(x, Capture(block_inputs=True)).out
    assert torch.equal(out.block_inputs[0][:, 1:5], method.prompt[0].expand(2, -1, -1))
    assert not torch.equal(out.block_inputs[1][:, 1:5], method.prompt[0].expand(2, -1, -1))


def test_vpt_deep_dropout_differs_per_image(backbone):
    method = build_method("vpt", backbone, CLASSES, {"num_tokens": 50, "deep": True}).train()
    p = method.prompts(0, 2)
    assert p.shape == (2, 50, D) and not torch.equal(p[0], p[1])


def test_visual_prompt_kinds(backbone):
    pad = build_method("visual_prompt", backbone, CLASSES)
    img = pad.prompt_image(32, 32)
    assert img.shape == (1, 3, 32, 32)
    assert torch.count_nonzero(img[:, :, 4:-4, 4:-4]) == 0, "the padding prompt leaves the centre alone"
    assert torch.count_nonzero(img[:, :, :4]) == 3 * 4 * 32
    rnd = build_method("visual_prompt", backbone, CLASSES, {"kind": "random_patch", "size": 6})
    rnd.eval()
    fixed = rnd.prompt_image(32, 32)
    assert torch.equal(fixed[:, :, :6, :6], rnd.patch) and torch.count_nonzero(fixed[:, :, 6:]) == 0
    rnd.train()
    torch.manual_seed(0)
    spots = {tuple(torch.nonzero(rnd.prompt_image(32, 32)[0, 0])[0].tolist()) for _ in range(10)}
    assert len(spots) > 1, "the random patch moves during training"
    with pytest.raises(ValueError, match="prepare_batch"):
        pad.transform_input(torch.zeros(1, 3, 40, 40))


# --- registry ---------------------------------------------------------------------------------------
def test_registry_builds_every_basic_method(backbone):
    assert set(BASIC) <= set(method_names())
    for name in BASIC:
        method = build_method(name, backbone, CLASSES)
        assert method.name == name and isinstance(method.config, REGISTRY[name].config_cls)
        info = method.describe()
        assert info["trainable_params"] == method.trainable_count() > 0


def test_config_for_refuses_unknown_keys_and_restores_tuples():
    with pytest.raises(ValueError, match="rank_r.*Valid settings: seed, r, alpha"):
        config_for("lora", rank_r=3)
    cfg = config_for("lora", targets=["q", "k"], layers=[0])
    assert cfg.targets == ("q", "k") and cfg.layers == (0,)
    with pytest.raises(UnknownMethod, match="Known methods: linear"):
        config_for("nope")


def test_build_method_config_types(backbone):
    assert build_method("vpt", backbone, 2, {"num_tokens": 1}).config.num_tokens == 1
    with pytest.raises(TypeError, match="VPTConfig"):
        build_method("vpt", backbone, 2, LoRAConfig())
    with pytest.raises(ValueError, match="Unknown setting"):
        build_method("vpt", backbone, 2, {"tokens": 3})
