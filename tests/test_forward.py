"""The steered forward against timm itself: same tokens, same maps, each touch point equal to a hand
computation, fused attention when no map is asked for, and the shared backbone left untouched."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch import Tensor
from torch.overrides import TorchFunctionMode

from toast_core.core.forward import (
    Capture,
    Steer,
    SteeredOutput,
    UnsupportedBackbone,
    check_supported,
    pool,
    resolve_layers,
    steered_forward,
)

TOL = 1e-5
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}


def _randomise_affine(model: VisionTransformer) -> VisionTransformer:
    """timm initialises biases to 0, norms to identity and attention near uniform; random biases and
    peaked attention (larger q/k weights) make every test sharper."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ls" in name:
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=gen))
        for blk in model.blocks:
            qk_rows = 2 * blk.attn.num_heads * blk.attn.head_dim
            blk.attn.qkv.weight[:qk_rows] *= 15
    return model


def make_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(**{**TINY, **kwargs})
    return _randomise_affine(model).eval().requires_grad_(False)


def make_distilled() -> VisionTransformer:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **TINY)
    return _randomise_affine(model).eval().requires_grad_(False)


@dataclass(frozen=True)
class Case:
    build: Callable[[], VisionTransformer]
    image_hw: tuple[int, int] = (32, 32)


CASES = {
    "cls": Case(lambda: make_vit()),
    "no_cls_avg": Case(lambda: make_vit(class_token=False, global_pool="avg")),
    "distilled": Case(make_distilled),
    "registers": Case(lambda: make_vit(reg_tokens=4)),
    "non_square": Case(lambda: make_vit(img_size=(32, 48)), (32, 48)),
    "dynamic_other_size": Case(lambda: make_vit(dynamic_img_size=True), (40, 56)),
    "layerscale_qknorm": Case(lambda: make_vit(init_values=0.5, qk_norm=True)),
    "no_embed_class": Case(lambda: make_vit(no_embed_class=True, reg_tokens=2)),
}


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request: pytest.FixtureRequest) -> tuple[VisionTransformer, Tensor]:
    spec = CASES[request.param]
    gen = torch.Generator().manual_seed(2)
    return spec.build(), torch.randn(2, 3, *spec.image_hw, generator=gen)


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    return make_vit()


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _close(a: Tensor, b: Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) < tol


def _timm_maps(model: VisionTransformer, images: Tensor) -> dict[int, Tensor]:
    """The usual way to get maps: a copy with fused attention off and hooks on attn_drop."""
    ref = copy.deepcopy(model)
    maps: dict[int, Tensor] = {}
    for i, blk in enumerate(ref.blocks):
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: maps.__setitem__(i, o))
    with torch.no_grad():
        ref.forward_features(images)
    return maps


# --- equivalence with timm --------------------------------------------------------------------------


def test_plain_pass_equals_timm(case: tuple[VisionTransformer, Tensor]) -> None:
    model, x = case
    with torch.no_grad():
        ref = model.forward_features(x)
        for capture in (Capture(), Capture(cls_attn=True), Capture(attn=True, attn_logits=True)):
            out = steered_forward(model, x, capture=capture)
            assert out.tokens.dtype == torch.float32
            assert _close(out.tokens, ref), capture


def test_layout_of_output(case: tuple[VisionTransformer, Tensor]) -> None:
    model, x = case
    with torch.no_grad():
        out = steered_forward(model, x)
    gh, gw = out.grid
    assert (gh, gw) == (x.shape[-2] // 8, x.shape[-1] // 8)
    assert out.patch_start == model.num_prefix_tokens and out.num_prompts == 0
    assert out.patch_tokens.shape == (x.shape[0], gh * gw, model.embed_dim)
    assert out.tokens.shape[1] == model.num_prefix_tokens + gh * gw


def test_maps_equal_timm_unfused(case: tuple[VisionTransformer, Tensor]) -> None:
    model, x = case
    ref = _timm_maps(model, x)
    with torch.no_grad():
        out = steered_forward(model, x, capture=Capture(attn=True))
    assert sorted(out.attn) == sorted(ref) == list(range(len(model.blocks)))
    for layer, a in out.attn.items():
        assert _close(a, ref[layer], 1e-6), layer


def test_pool_reads_cls_token(vit: VisionTransformer, images: Tensor) -> None:
    with torch.no_grad():
        ref = vit.forward_head(vit.forward_features(images), pre_logits=True)
        assert _close(pool(vit, steered_forward(vit, images)), ref)


def test_pool_distilled_reads_cls_not_dist(images: Tensor) -> None:
    """timm's distilled pre-logits average CLS and dist tokens; the methods read the CLS token."""
    model = make_distilled()
    with torch.no_grad():
        out = steered_forward(model, images)
        assert _close(pool(model, out), out.tokens[:, 0])
        assert not _close(pool(model, out), out.tokens[:, 1], 1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"class_token": False, "global_pool": "avg"},
        {"global_pool": "avg"},  # CLS present but unused; fc_norm instead of norm
        {"global_pool": "max"},
        {"global_pool": "avgmax", "reg_tokens": 2},
        {"global_pool": "map"},
        {"global_pool": "map", "reg_tokens": 2},
        {"global_pool": "avg", "pool_include_prefix": True, "reg_tokens": 2},
    ],
)
def test_pool_equals_timm(kwargs: dict, images: Tensor) -> None:
    model = make_vit(**kwargs)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(images), pre_logits=True)
        assert _close(pool(model, steered_forward(model, images)), ref)


# --- captures ---------------------------------------------------------------------------------------


def test_captures_are_consistent(case: tuple[VisionTransformer, Tensor]) -> None:
    model, x = case
    everything = Capture(attn=True, attn_logits=True, block_inputs=True, block_outputs=True)
    with torch.no_grad():
        out = steered_forward(model, x, capture=everything)
        rows = steered_forward(model, x, capture=Capture(cls_attn=True)).cls_attn
        n = out.tokens.shape[1]
        depth = len(model.blocks)
        emb = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        assert _close(out.block_inputs[0], emb)
        for layer in range(depth):
            a = out.attn[layer]
            assert a.shape == (x.shape[0], model.blocks[layer].attn.num_heads, n, n)
            assert _close(a.sum(-1), torch.ones_like(a.sum(-1)), 1e-5)
            assert _close(out.attn_logits[layer].softmax(-1), a, 1e-6)
            expected_row = a[:, :, 0] if model.cls_token is not None else a.mean(dim=2)
            assert _close(rows[layer], expected_row, 1e-6), layer
            assert _close(out.block_outputs[layer], model.blocks[layer](out.block_inputs[layer]))
            if layer + 1 < depth:
                assert torch.equal(out.block_outputs[layer], out.block_inputs[layer + 1])
        assert torch.equal(out.hidden, out.block_outputs[depth - 1])
        assert _close(out.tokens, model.norm(out.hidden))


def test_logits_equal_hand_computation(vit: VisionTransformer, images: Tensor) -> None:
    with torch.no_grad():
        out = steered_forward(vit, images, capture=Capture(attn_logits=[1], block_inputs=[1]))
        attn = vit.blocks[1].attn
        u = vit.blocks[1].norm1(out.block_inputs[1])
        q, k, _ = attn.qkv(u).reshape(2, -1, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        hand = (q @ k.transpose(-2, -1)) / attn.head_dim**0.5
    assert sorted(out.attn_logits) == [1]
    assert _close(out.attn_logits[1], hand)


def test_capture_only_requested_layers(vit: VisionTransformer, images: Tensor) -> None:
    cap = Capture(cls_attn=[0], attn=[-1], block_inputs=(1,), block_outputs=[])
    with torch.no_grad():
        out = steered_forward(vit, images, capture=cap)
    assert sorted(out.cls_attn) == [0] and sorted(out.attn) == [1]
    assert sorted(out.block_inputs) == [1] and out.block_outputs == {} and out.attn_logits == {}
    with pytest.raises(IndexError, match="Layer 2 is out of range"):
        steered_forward(vit, images, capture=Capture(attn=[2]))


def test_resolve_layers() -> None:
    assert resolve_layers(True, 3) == {0, 1, 2}
    assert resolve_layers(False, 3) == frozenset()
    assert resolve_layers([-1, 0, 2], 3) == {0, 2}
    with pytest.raises(IndexError):
        resolve_layers([-4], 3)


# --- what actually runs -----------------------------------------------------------------------------


class _Recorder(TorchFunctionMode):
    """Records which attention kernels run and the shapes they see, without touching the model."""

    def __init__(self) -> None:
        super().__init__()
        self.sdpa = 0
        self.softmax_shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "scaled_dot_product_attention":
            self.sdpa += 1
        elif name == "softmax":
            self.softmax_shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def _record(
    model: VisionTransformer, images: Tensor, capture: Capture, steer: Steer | None = None
) -> _Recorder:
    with torch.no_grad(), _Recorder() as rec:
        steered_forward(model, images, steer, capture)
    return rec


def test_fused_attention_when_no_map_is_needed(vit: VisionTransformer, images: Tensor) -> None:
    rec = _record(vit, images, Capture(block_inputs=True, block_outputs=True))
    assert rec.sdpa == 2 and rec.softmax_shapes == []


def test_cls_rows_cost_one_query_row(vit: VisionTransformer, images: Tensor) -> None:
    rec = _record(vit, images, Capture(cls_attn=True))
    assert rec.sdpa == 2
    assert rec.softmax_shapes == [(2, 2, 1, 17)] * 2  # one CLS query row per layer, never N x N


def test_explicit_only_where_maps_are_asked(vit: VisionTransformer, images: Tensor) -> None:
    # without a graph on CPU the map is computed image by image: one (H, N, N) softmax per image
    rec = _record(vit, images, Capture(attn=[1]))
    assert rec.sdpa == 1 and rec.softmax_shapes == [(2, 17, 17)] * 2
    rec = _record(vit, images, Capture(attn=True))
    assert rec.sdpa == 0 and rec.softmax_shapes == [(2, 17, 17)] * 4  # (with a graph: batch-wide, below)


def test_override_runs_explicit_for_its_layer_only(vit: VisionTransformer, images: Tensor) -> None:
    rec = _record(vit, images, Capture(), _Override({0: torch.full((2, 2, 17, 17), 1 / 17)}))
    assert rec.sdpa == 1 and len(rec.softmax_shapes) == 1


# --- resume / stop --------------------------------------------------------------------------------


def test_resume_and_stop_match_full_pass(case: tuple[VisionTransformer, Tensor]) -> None:
    model, x = case
    depth = len(model.blocks)
    with torch.no_grad():
        full = steered_forward(model, x, capture=Capture(block_outputs=True))
        for k in range(1, depth + 1):
            resumed = steered_forward(
                model, None, start_block=k, hidden=full.block_outputs[k - 1], grid=full.grid
            )
            assert _close(resumed.tokens, full.tokens), k
            assert resumed.grid == full.grid and resumed.patch_start == full.patch_start
            head = steered_forward(model, x, stop_block=k)
            assert _close(head.hidden, full.block_outputs[k - 1])
            assert _close(head.tokens, model.norm(full.block_outputs[k - 1]))
        first = steered_forward(model, x, stop_block=1)
        rest = steered_forward(model, None, start_block=1, hidden=first.hidden, grid=first.grid)
        assert _close(rest.tokens, full.tokens)


def test_resume_bad_arguments(vit: VisionTransformer, images: Tensor) -> None:
    with pytest.raises(ValueError, match="hidden stream and its grid"):
        steered_forward(vit, images, start_block=1)
    with pytest.raises(ValueError, match="images are required"):
        steered_forward(vit, None)
    with pytest.raises(IndexError, match="out of range"):
        steered_forward(vit, images, start_block=3)
    with pytest.raises(IndexError, match="out of range"):
        steered_forward(vit, images, stop_block=3)
    with pytest.raises(IndexError, match="out of range"):
        steered_forward(vit, images, stop_block=0, start_block=1, hidden=torch.zeros(2, 17, 32), grid=(4, 4))


# --- touch points ---------------------------------------------------------------------------------


class _Prompts(Steer):
    def __init__(self, by_layer: dict[int, Tensor]):
        self.by_layer = by_layer

    def prompts(self, layer: int, batch: int) -> Tensor | None:
        return self.by_layer.get(layer)


class _Delta(Steer):
    def __init__(self, layer: int, site: str, fn: Callable[[Tensor], Tensor]):
        self.layer, self.site, self.fn = layer, site, fn
        self.seen: list[Tensor] = []

    def linear_delta(self, layer: int, site: str, inp: Tensor) -> Tensor | None:
        if (layer, site) != (self.layer, self.site):
            return None
        self.seen.append(inp)
        return self.fn(inp)


class _Value(Steer):
    def __init__(self, layer: int, td: Tensor, with_bias: bool = False):
        self.layer, self.td = layer, td
        self.value_signal_bias = with_bias

    def value_signal(self, layer: int) -> Tensor | None:
        return self.td if layer == self.layer else None


class _Override(Steer):
    def __init__(self, maps: dict[int, Tensor]):
        self.maps = maps

    def attention_override(self, layer: int) -> Tensor | None:
        return self.maps.get(layer)


def _manual(model: VisionTransformer, x: Tensor, edit: Callable[[int, Tensor], Tensor]) -> Tensor:
    """timm's own modules, block by block, with `edit(layer, x)` applied before each block."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for layer, blk in enumerate(model.blocks):
        h = blk(edit(layer, h))
    return model.norm(h)


@pytest.mark.parametrize("builder", [make_vit, make_distilled, lambda: make_vit(reg_tokens=4)])
def test_shallow_prompts_inserted_after_prefix(
    builder: Callable[[], VisionTransformer], images: Tensor
) -> None:
    model = builder()
    pre, p = model.num_prefix_tokens, 3
    prompt = torch.randn(1, p, 32)

    def insert(layer: int, h: Tensor) -> Tensor:
        if layer:
            return h
        return torch.cat([h[:, :pre], prompt.expand(2, -1, -1), h[:, pre:]], dim=1)

    with torch.no_grad():
        out = steered_forward(model, images, _Prompts({0: prompt}), Capture(block_inputs=True, cls_attn=True))
        ref = _manual(model, images, insert)
    assert out.num_prompts == p and out.patch_start == pre + p
    assert out.tokens.shape[1] == pre + p + 16 and out.patch_tokens.shape[1] == 16
    assert _close(out.tokens, ref)
    assert torch.equal(out.block_inputs[0][:, pre : pre + p], prompt.expand(2, -1, -1))
    assert out.cls_attn[0].shape[-1] == pre + p + 16  # maps have the prompt key columns


def test_deep_prompts_overwrite_their_slots(vit: VisionTransformer, images: Tensor) -> None:
    p0, p1 = torch.randn(1, 2, 32), torch.randn(2, 2, 32)  # shared, then per-image prompts

    def deep(layer: int, h: Tensor) -> Tensor:
        if layer == 0:
            return torch.cat([h[:, :1], p0.expand(2, -1, -1), h[:, 1:]], dim=1)
        return torch.cat([h[:, :1], p1, h[:, 3:]], dim=1)

    with torch.no_grad():
        out = steered_forward(vit, images, _Prompts({0: p0, 1: p1}), Capture(block_inputs=True))
        ref = _manual(vit, images, deep)
    assert _close(out.tokens, ref)
    assert out.tokens.shape[1] == 19 and out.num_prompts == 2
    assert torch.equal(out.block_inputs[1][:, 1:3], p1)


def test_prompt_count_cannot_change(vit: VisionTransformer, images: Tensor) -> None:
    with pytest.raises(ValueError, match="Prompt count changed from 2 to 3"):
        steered_forward(vit, images, _Prompts({0: torch.zeros(1, 2, 32), 1: torch.zeros(1, 3, 32)}))


def test_resume_with_prompts(vit: VisionTransformer, images: Tensor) -> None:
    steer = _Prompts({0: torch.randn(1, 4, 32)})
    with torch.no_grad():
        full = steered_forward(vit, images, steer, Capture(block_outputs=True))
        rest = steered_forward(
            vit, None, steer, start_block=1, hidden=full.block_outputs[0], grid=full.grid, num_prompts=4
        )
    assert _close(rest.tokens, full.tokens) and rest.patch_start == 5 and rest.num_prompts == 4


def test_pool_excludes_prompts(images: Tensor) -> None:
    model = make_vit(class_token=False, global_pool="avg")
    with torch.no_grad():
        out = steered_forward(model, images, _Prompts({0: 100 * torch.ones(1, 3, 32)}))
        assert _close(pool(model, out), model.fc_norm(out.tokens[:, 3:].mean(dim=1)))


def test_transform_input(vit: VisionTransformer, images: Tensor) -> None:
    shift = torch.randn(1, 3, 32, 32)

    class Pixel(Steer):
        def transform_input(self, x: Tensor) -> Tensor:
            return x + shift

    with torch.no_grad():
        assert _close(steered_forward(vit, images, Pixel()).tokens, vit.forward_features(images + shift))


@pytest.mark.parametrize("site", ["qkv", "proj", "fc1", "fc2"])
@pytest.mark.parametrize("layer", [0, 1])
def test_linear_delta_equals_weight_change(
    site: str, layer: int, vit: VisionTransformer, images: Tensor
) -> None:
    """An affine delta on a linear's output equals editing that linear's weight and bias."""
    blk = vit.blocks[layer]
    lin = {"qkv": blk.attn.qkv, "proj": blk.attn.proj, "fc1": blk.mlp.fc1, "fc2": blk.mlp.fc2}[site]
    dw = 0.1 * torch.randn_like(lin.weight)
    db = 0.1 * torch.randn_like(lin.bias)
    steer = _Delta(layer, site, lambda inp: inp @ dw.T + db)
    edited = copy.deepcopy(vit)
    edited_lin = dict(edited.named_modules())[
        f"blocks.{layer}." + ("attn." if site in ("qkv", "proj") else "mlp.") + site
    ]
    with torch.no_grad():
        edited_lin.weight += dw
        edited_lin.bias += db
        out = steered_forward(vit, images, steer, Capture(block_inputs=[layer]))
        ref = edited.forward_features(images)
        plain = vit.forward_features(images)
    assert _close(out.tokens, ref)
    assert not _close(out.tokens, plain, 1e-3)
    assert len(steer.seen) == 1 and steer.seen[0].shape[-1] == lin.in_features
    if site == "qkv":
        assert _close(steer.seen[0], blk.norm1(out.block_inputs[layer]))


def _v_slice_delta(layer: int, v_delta: Tensor) -> _Delta:
    """A qkv delta that is zero on the q and k slices and `v_delta` on the v slice."""
    return _Delta(
        layer, "qkv", lambda inp: torch.cat([torch.zeros_like(v_delta).repeat(1, 1, 2), v_delta], -1)
    )


@pytest.mark.parametrize("with_bias", [False, True])
def test_value_signal_equals_hand_computation(
    with_bias: bool, vit: VisionTransformer, images: Tensor
) -> None:
    """v = W_v u + W_v td (+ b_v again in the official-compat form): a delta on the V slice only."""
    layer, c = 1, vit.embed_dim
    td = torch.randn(2, 17, c)
    qkv = vit.blocks[layer].attn.qkv
    v_delta = td @ qkv.weight[2 * c :].T + (qkv.bias[2 * c :] if with_bias else 0)
    with torch.no_grad():
        out = steered_forward(vit, images, _Value(layer, td, with_bias), Capture(attn=True))
        ref = steered_forward(vit, images, _v_slice_delta(layer, v_delta))
        plain = steered_forward(vit, images, capture=Capture(attn=True))
    assert _close(out.tokens, ref.tokens)
    assert not _close(out.tokens, plain.tokens, 1e-3)
    for i in out.attn:  # queries and keys are untouched: the maps do not move
        assert _close(out.attn[i], plain.attn[i], 1e-6)


def test_value_signal_bias_matters(vit: VisionTransformer, images: Tensor) -> None:
    td = torch.randn(2, 17, 32)
    with torch.no_grad():
        paper = steered_forward(vit, images, _Value(0, td, False)).tokens
        official = steered_forward(vit, images, _Value(0, td, True)).tokens
        zero = steered_forward(vit, images, _Value(0, torch.zeros(2, 17, 32), False)).tokens
    assert not _close(paper, official, 1e-3)
    assert _close(zero, vit.forward_features(images))


def test_uniform_attention_override(vit: VisionTransformer, images: Tensor) -> None:
    """A uniform map makes every query read the mean value: check against a hand computation."""
    layer, n = 1, 17
    uniform = torch.full((2, 2, n, n), 1.0 / n)
    with torch.no_grad():
        out = steered_forward(vit, images, _Override({layer: uniform}), Capture(block_inputs=[layer]))
        blk = vit.blocks[layer]
        x = out.block_inputs[layer]
        v = blk.attn.qkv(blk.norm1(x))[..., 2 * 32 :]
        a = blk.attn.proj(v.mean(dim=1, keepdim=True).expand(-1, n, -1))
        x = x + blk.ls1(a)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        hand = vit.norm(x)
    assert _close(out.tokens, hand)
    assert not _close(out.tokens, vit.forward_features(images), 1e-3)


def test_overriding_with_own_map_changes_nothing(vit: VisionTransformer, images: Tensor) -> None:
    with torch.no_grad():
        plain = steered_forward(vit, images, capture=Capture(attn=True))
        same = steered_forward(vit, images, _Override(dict(plain.attn)))
    assert _close(same.tokens, plain.tokens)


class _ValueDelta(Steer):
    def __init__(self, deltas: dict[int, Tensor], td: dict[int, Tensor] | None = None):
        self.deltas, self.td = deltas, td or {}

    def value_delta(self, layer: int) -> Tensor | None:
        return self.deltas.get(layer)

    def value_signal(self, layer: int) -> Tensor | None:
        return self.td.get(layer)


def test_value_delta_is_the_projected_signal_and_adds_to_it(vit: VisionTransformer, images: Tensor) -> None:
    """value_delta hands over W_v·td already projected; given together, delta and signal add."""
    layer, c = 1, vit.embed_dim
    td = torch.randn(2, 17, c, generator=torch.Generator().manual_seed(4))
    dv = td @ vit.blocks[layer].attn.qkv.weight[2 * c :].T
    with torch.no_grad():
        via_signal = steered_forward(vit, images, _Value(layer, td)).tokens
        via_delta = steered_forward(vit, images, _ValueDelta({layer: dv})).tokens
        halves = steered_forward(vit, images, _ValueDelta({layer: dv / 2}, {layer: td / 2})).tokens
    assert _close(via_delta, via_signal) and _close(halves, via_signal)
    assert not _close(via_delta, vit.forward_features(images), 1e-3)


def test_resume_at_block_zero_from_the_embedded_stream(case: tuple[VisionTransformer, Tensor]) -> None:
    """A second pass can start from the first pass's embedded stream: no second patch embedding."""
    model, x = case
    with torch.no_grad():
        full = steered_forward(model, x, capture=Capture(block_inputs=[0]))
        again = steered_forward(model, None, hidden=full.block_inputs[0], grid=full.grid)
    assert torch.equal(again.tokens, full.tokens)
    assert again.grid == full.grid and again.patch_start == full.patch_start
    with pytest.raises(ValueError, match="grid"):
        steered_forward(model, None, hidden=full.block_inputs[0])


def test_value_only_gradient_runs_explicit_and_matches_fused(vit: VisionTransformer, images: Tensor) -> None:
    """Where only the values carry a gradient (the first block a value change reaches, its input
    constant), the attention runs explicitly with a graph-free map; tokens, CLS rows and gradients
    equal the fused path's, taken here by giving the block input a gradient too."""
    with torch.no_grad():
        x0 = steered_forward(vit, images, capture=Capture(block_inputs=[0])).block_inputs[0]
    delta0 = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(6))
    runs = []
    for input_grad in (False, True):
        delta = delta0.clone().requires_grad_(True)
        hidden = x0.clone().requires_grad_(input_grad)
        with _Recorder() as rec:
            out = steered_forward(
                vit, None, _ValueDelta({0: delta}), Capture(cls_attn=[0]), hidden=hidden, grid=(4, 4)
            )
        pool(vit, out).square().sum().backward()
        runs.append((rec, out, delta.grad))
    (explicit, out_e, grad_e), (fused, out_f, grad_f) = runs
    assert explicit.sdpa == 1 and explicit.softmax_shapes == [(2, 2, 17, 17)]  # block 0 explicit
    assert fused.sdpa == 2 and fused.softmax_shapes == [(2, 2, 1, 17)]  # only the CLS row
    assert not out_e.cls_attn[0].requires_grad
    assert _close(out_e.tokens.detach(), out_f.tokens.detach())
    assert _close(out_e.cls_attn[0], out_f.cls_attn[0].detach())
    assert grad_e is not None and grad_e.abs().sum() > 0
    torch.testing.assert_close(grad_e, grad_f, rtol=1e-4, atol=1e-5)


# --- the shared backbone is never changed ------------------------------------------------------------


class _Everything(torch.nn.Module, Steer):
    """A trainable steer that uses every touch point at once."""

    value_signal_bias = True

    def __init__(self) -> None:
        super().__init__()
        self.pixel = torch.nn.Parameter(0.01 * torch.randn(1, 3, 32, 32))
        self.prompt = torch.nn.Parameter(torch.randn(1, 2, 32))
        self.lora = torch.nn.Parameter(0.01 * torch.randn(96, 32))
        self.td = torch.nn.Parameter(0.1 * torch.randn(1, 19, 32))

    def transform_input(self, images: Tensor) -> Tensor:
        return images + self.pixel

    def prompts(self, layer: int, batch: int) -> Tensor | None:
        return self.prompt

    def linear_delta(self, layer: int, site: str, inp: Tensor) -> Tensor | None:
        return inp @ self.lora.T if site == "qkv" else None

    def value_signal(self, layer: int) -> Tensor | None:
        return self.td.expand(2, -1, -1)

    def attention_override(self, layer: int) -> Tensor | None:
        return torch.full((2, 2, 19, 19), 1 / 19) if layer == 1 else None


def _hook_counts(model: torch.nn.Module) -> list[int]:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [len(getattr(m, n)) for m in model.modules() for n in names]


def test_backbone_untouched_and_gradients_reach_only_the_steer(images: Tensor) -> None:
    from torch.nn.modules import module as nn_module

    model = make_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = [blk.attn.fused_attn for blk in model.blocks]
    global_hooks = (len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks))
    steer = _Everything()
    everything = Capture(cls_attn=True, attn=True, attn_logits=True, block_inputs=True, block_outputs=True)
    for capture in (Capture(), Capture(cls_attn=True), everything):
        out = steered_forward(model, images, steer, capture)
        pool(model, out).square().sum().backward()
    for p in steer.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [blk.attn.fused_attn for blk in model.blocks] == fused
    assert not any(m.training for m in model.modules())
    assert sum(_hook_counts(model)) == 0
    assert (len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks)) == global_hooks


# --- unsupported models ---------------------------------------------------------------------------


def test_unsupported_blocks_refused(images: Tensor) -> None:
    post_norm = VisionTransformer(**TINY, block_fn=ResPostBlock).eval()
    with pytest.raises(UnsupportedBackbone, match="ResPostBlock is not supported"):
        steered_forward(post_norm, images)
    with pytest.raises(UnsupportedBackbone, match="Expected a timm VisionTransformer"):
        check_supported(torch.nn.Linear(2, 2))


def test_output_type(vit: VisionTransformer, images: Tensor) -> None:
    with torch.no_grad():
        out = steered_forward(vit, images)
    assert isinstance(out, SteeredOutput)
    assert out.cls_attn == {} and out.attn == {} and out.block_inputs == {}
