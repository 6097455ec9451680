"""TOAST: selection, feedback, pass 2, variants, variational loss, counts and the official importer.

The reference forward below is written from the formulas (methods.md §5) on timm's own modules with
explicit softmax attention, independently of toast_core.core.forward, the way the released code computes.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toast_core.core.backbone import Backbone, freeze, tiny_fixture_backbone, token_layout
from toast_core.core.forward import Capture, Steer, pool, steered_forward
from toast_core.methods.toast import Toast, ToastConfig, ToastLite, ToastLiteConfig
from toast_core.methods.toast_import import (
    OfficialImportError,
    build_from_official,
    convert_official,
    read_official,
)

DEPTH = 4
CLASSES = 5


def _randomized_backbone(depth: int = DEPTH, seed: int = 3) -> Backbone:
    """A fixture ViT whose biases and LayerNorm affines are non-trivial (timm's init zeroes them),
    so that the value bias b_v and every norm matter in the comparisons."""
    bb = tiny_fixture_backbone(depth=depth, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return bb


@pytest.fixture(scope="module")
def bb() -> Backbone:
    return _randomized_backbone()


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _strong_decoders(method: Toast, seed: int = 11) -> None:
    """Decoder weights of unit gain (the official init, std .02, makes td tiny on a width-32 model)."""
    gen = torch.Generator().manual_seed(seed)
    d = method.layout.embed_dim
    with torch.no_grad():
        for dec in method.decoders:
            dec.linear.weight.copy_(torch.randn(d, d, generator=gen) / d**0.5)
            dec.linear2.weight.copy_(torch.randn(d, d, generator=gen) / d**0.5)


def _aim_xi(method: Toast, images: Tensor) -> None:
    """Point ξ at one patch token of pass 1, so the selection keeps some tokens and drops others."""
    with torch.no_grad():
        z = steered_forward(method.vit, images).tokens
        method.xi.copy_(z[0, 1] - z.mean(dim=(0, 1)))


def reference_logits(
    vit: nn.Module,
    head: nn.Linear,
    images: Tensor,
    xi: Tensor,
    P: Tensor,
    w1: list[Tensor],
    w2: list[Tensor],
    td_bias: bool,
) -> Tensor:
    """Two full passes written from the formulas: explicit softmax attention; td sent through the
    full qkv Linear (with its bias when td_bias, as the released code) and q, k of it discarded."""

    def run(td: list[Tensor] | None) -> Tensor:
        x = vit._pos_embed(vit.patch_embed(images))
        for layer, blk in enumerate(vit.blocks):
            u = blk.norm1(x)
            B, N, C = u.shape
            H = blk.attn.num_heads
            q, k, v = blk.attn.qkv(u).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
            if td is not None:
                bias = blk.attn.qkv.bias if td_bias else None
                v = (
                    v
                    + F.linear(td[layer], blk.attn.qkv.weight, bias)
                    .reshape(B, N, 3, H, C // H)
                    .permute(2, 0, 3, 1, 4)[2]
                )
            attn = ((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(dim=-1)
            x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
            x = x + blk.mlp(blk.norm2(x))
        return vit.norm(x)

    z = run(None)
    mask = (F.normalize(z, dim=-1) @ F.normalize(xi[None, ..., None], dim=1)).clamp(0, 1)
    h = (z * mask) @ P
    td: list[Tensor] = []
    for layer in range(len(vit.blocks) - 1, -1, -1):
        h = h @ w1[layer].T
        td = [h @ w2[layer].T, *td]
    return head(run(td)[:, 0])


def _weights(method: Toast) -> tuple[list[Tensor], list[Tensor]]:
    w1 = [d.linear.weight.detach() for d in method.decoders]
    w2 = [d.linear2.weight.detach() for d in method.decoders]
    return w1, w2


# --- the forward ------------------------------------------------------------------------------------
def test_zero_selection_makes_pass2_equal_pass1() -> None:
    bb = _randomized_backbone()
    with torch.no_grad():  # final norm with a negative offset: every z_i has a negative channel sum
        bb.model.norm.weight.fill_(1.0)
        bb.model.norm.bias.fill_(-1.0)
    x = torch.randn(2, 3, 32, 32)
    method = Toast(bb, CLASSES)
    _strong_decoders(method)
    with torch.no_grad():
        method.xi.fill_(1.0)  # cos(z_i, 1) < 0 for every token → m = 0 exactly
        out = method(x)
    first = out.extras["pass1"]
    assert torch.count_nonzero(out.extras["selection"]) == 0
    assert torch.count_nonzero(out.extras["td_norm"]) == 0
    assert torch.equal(out.out.tokens, first.tokens)
    assert torch.equal(out.logits, method.head(pool(bb.model, first)))

    # The released form still adds b_v in every block, so pass 2 moves even with m = 0.
    official = Toast(bb, CLASSES, ToastConfig(official_compat=True))
    official.load_state_dict(method.state_dict())
    with torch.no_grad():
        off = official(x)

    class BiasOnly(Steer):
        value_signal_bias = True

        def value_signal(self, layer: int) -> Tensor:
            return torch.zeros(2, first.tokens.shape[1], bb.layout.embed_dim)

    expected = steered_forward(bb.model, x, steer=BiasOnly())
    assert not torch.allclose(off.out.tokens, first.tokens, atol=1e-3)
    torch.testing.assert_close(off.out.tokens, expected.tokens, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [3, 8])  # 3 × 17 tokens runs the decoder chain, 8 × 17 the folded form
def test_official_compat_matches_reference_from_formulas(bb: Backbone, batch: int) -> None:
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    method = Toast(bb, CLASSES, ToastConfig(official_compat=True, seed=4))
    _strong_decoders(method)
    with torch.no_grad():
        method.P.copy_(
            torch.eye(bb.layout.embed_dim) + 0.1 * torch.randn(bb.layout.embed_dim, bb.layout.embed_dim)
        )
        out = method(images)
    m = out.extras["selection"]
    assert m.shape == images.shape[:1] + (1 + bb.layout.num_patches,)
    assert 0 < torch.count_nonzero(m) < m.numel(), "the test needs some selected and some dropped tokens"
    w1, w2 = _weights(method)
    ref = reference_logits(bb.model, method.head, images, method.xi.detach(), method.P.detach(), w1, w2, True)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)

    # The paper form (no second b_v) is the same reference with td through W_v alone, and it differs.
    paper = Toast(bb, CLASSES, ToastConfig(seed=4))
    paper.load_state_dict(method.state_dict())
    with torch.no_grad():
        p_out = paper(images)
    ref_paper = reference_logits(
        bb.model, method.head, images, method.xi.detach(), method.P.detach(), w1, w2, False
    )
    torch.testing.assert_close(p_out.logits, ref_paper, rtol=0, atol=1e-5)
    assert (p_out.logits - out.logits).abs().max() > 1e-3
    # and pass 2 really differs from pass 1 (the feedback does something)
    assert (out.out.tokens - out.extras["pass1"].tokens).abs().max() > 1e-3


@pytest.mark.parametrize("cls", [Toast, ToastLite])
def test_folded_feedback_equals_the_chain(cls: type[Toast], bb: Backbone) -> None:
    """Training batches multiply the d×d operators first; values and gradients must not change."""
    method = cls(bb, CLASSES)
    d = bb.layout.embed_dim
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for dec in method.decoders:
            for lin in (dec.linear, dec.linear2):
                lin.weight.copy_(torch.randn(d, d, generator=gen) / d**0.5)
                if cls is ToastLite:
                    lin.lora_B.copy_(torch.randn(d, 4, generator=gen))
        method.P.copy_(torch.eye(d) + 0.1 * torch.randn(d, d, generator=gen))
    z = torch.randn(4, 17, d, generator=gen)
    values, grads = [], []
    for fold in (False, True):
        method.zero_grad()
        td = method.feedback(z, method.select(z), fold=fold)
        assert sorted(td) == list(range(DEPTH))
        sum((t * (l + 1)).sum() for l, t in td.items()).backward()
        values.append({l: t.detach() for l, t in td.items()})
        grads.append({n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None})
    for layer in range(DEPTH):
        torch.testing.assert_close(values[1][layer], values[0][layer], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("fold", [False, True])
def test_value_deltas_are_w_v_times_td(official: bool, fold: bool, bb: Backbone) -> None:
    """Pass 2 receives ΔV_l = W_v,l td_l (+ b_v,l in the official form), with W_v folded into the
    operator on training batches: same values and same gradients as projecting td block by block."""
    method = Toast(bb, CLASSES, ToastConfig(official_compat=official))
    _strong_decoders(method)
    d = bb.layout.embed_dim
    z = torch.randn(4, 17, d, generator=torch.Generator().manual_seed(8))
    results = []
    for build in ("deltas", "td"):
        method.zero_grad()
        if build == "deltas":
            out = method.value_deltas(z, method.select(z), fold=fold)
        else:
            td = method.feedback(z, method.select(z), fold=False)
            out = {}
            for l, t in td.items():
                qkv = bb.model.blocks[l].attn.qkv
                out[l] = F.linear(t, qkv.weight[2 * d :], qkv.bias[2 * d :] if official else None)
        sum((t * (l + 1)).sum() for l, t in out.items()).backward()
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        results.append(({l: t.detach() for l, t in out.items()}, grads))
    (deltas, g_deltas), (want, g_want) = results
    assert sorted(deltas) == list(range(DEPTH))
    for layer in range(DEPTH):
        torch.testing.assert_close(deltas[layer], want[layer], rtol=1e-5, atol=1e-5)
    assert g_deltas.keys() == g_want.keys() and "xi" in g_want
    for name in g_want:
        torch.testing.assert_close(g_deltas[name], g_want[name], rtol=1e-4, atol=1e-4)


def test_td_norm_is_the_rms_of_td_either_way(bb: Backbone) -> None:
    """td_norm (B, L): root-mean-square over tokens of ‖td_l‖, from td itself (chain) or from
    moments without forming td (folded); zero for blocks outside the feedback range."""
    late = Toast(bb, CLASSES, ToastConfig(feedback_to=1))
    _strong_decoders(late)
    z = torch.randn(4, 17, bb.layout.embed_dim, generator=torch.Generator().manual_seed(9))
    m = late.select(z)
    td = late.feedback(z, m, fold=False)
    want = torch.zeros(4, DEPTH)
    for l, t in td.items():
        want[:, l] = t.detach().pow(2).sum(dim=-1).mean(dim=1).sqrt()
    assert (want[:, 0] == 0).all() and (want[:, 1:] > 0).all()
    for fold in (False, True):
        torch.testing.assert_close(late._signal(z, m, fold, into_values=True)[1], want, rtol=1e-4, atol=1e-6)


# official form for the default; paper form for late feedback (the formula's td = 0 below k adds no b_v)
@pytest.mark.parametrize(("feedback_to", "official"), [(None, True), (DEPTH // 2, False)])
def test_training_gradients_equal_the_formula_reference(
    feedback_to: int | None, official: bool, bb: Backbone
) -> None:
    """The fast training path (graph-free pass 1, pass 2 resumed from pass 1's stream, W_v folded,
    value-only attention backward at the first feedback block) gives the gradients of the formulas."""
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(12))  # 8×17 rows: folded
    labels = torch.arange(8) % CLASSES
    method = Toast(bb, CLASSES, ToastConfig(official_compat=official, feedback_to=feedback_to))
    _strong_decoders(method)
    _aim_xi(method, images)
    F.cross_entropy(method(images).logits, labels).backward()

    w1, w2 = ([w.clone().requires_grad_(True) for w in ws] for ws in _weights(method))
    xi = method.xi.detach().clone().requires_grad_(True)
    head = nn.Linear(bb.layout.embed_dim, CLASSES)
    head.load_state_dict(method.head.state_dict())
    if feedback_to:  # no feedback below k: the formula with td = 0 there (W2 zero below k)
        w2 = [w * (l >= feedback_to) for l, w in enumerate(w2)]
    logits = reference_logits(bb.model, head, images, xi, method.P.detach(), w1, w2, official)
    F.cross_entropy(logits, labels).backward()
    start = feedback_to or 0
    for l in range(start, DEPTH):
        torch.testing.assert_close(method.decoders[l].linear.weight.grad, w1[l].grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(method.xi.grad, xi.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(method.head.weight.grad, head.weight.grad, rtol=1e-3, atol=1e-5)
    assert all(method.decoders[l].linear.weight.grad is None for l in range(start))


def test_pass2_resumes_from_the_pass1_stream(bb: Backbone, images: Tensor) -> None:
    """The patch embedding runs once per forward: pass 2 starts from pass 1's embedded stream."""
    method = Toast(bb, CLASSES)
    calls: list[int] = []
    handle = bb.model.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            method(images)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_pass1_builds_no_graph(bb: Backbone, images: Tensor) -> None:
    method = Toast(bb, CLASSES)
    _strong_decoders(method)
    _aim_xi(method, images)
    out = method(images, Capture(cls_attn=True))
    first = out.extras["pass1"]
    assert first.tokens.grad_fn is None and not first.tokens.requires_grad
    assert all(not t.requires_grad for t in first.cls_attn.values())
    assert out.logits.requires_grad and out.logits.grad_fn is not None
    # both passes carry CLS rows for the pass-1 vs pass-2 views
    assert sorted(first.cls_attn) == sorted(out.out.cls_attn) == list(range(DEPTH))
    assert not torch.equal(first.cls_attn[DEPTH - 1], out.out.cls_attn[DEPTH - 1])
    assert out.extras["td_norm"].shape == (images.shape[0], DEPTH)
    assert method.views()[-2:] == ("toast_pass1", "selection")


def test_variants_at_full_range_equal_default(bb: Backbone, images: Tensor) -> None:
    base = Toast(bb, CLASSES, ToastConfig(seed=2))
    _strong_decoders(base)
    with torch.no_grad():
        ref = base(images).logits
    for cfg in (
        ToastConfig(seed=2, feedback_from=DEPTH),
        ToastConfig(seed=2, feedback_to=0),
        ToastConfig(seed=2, feedback_from=DEPTH, feedback_to=0),
    ):
        variant = Toast(bb, CLASSES, cfg)
        variant.load_state_dict(base.state_dict())
        with torch.no_grad():
            assert torch.equal(variant(images).logits, ref), cfg


def _count_block_calls(bb: Backbone) -> tuple[list[int], list]:
    counts = [0] * bb.layout.depth
    handles = []
    for i, blk in enumerate(bb.model.blocks):

        def hook(*_: object, i: int = i) -> None:
            counts[i] += 1

        handles.append(blk.norm1.register_forward_hook(hook))
    return counts, handles


def test_late_feedback_runs_only_top_blocks_in_pass2(images: Tensor) -> None:
    bb = _randomized_backbone()
    k = DEPTH // 2
    late = Toast(bb, CLASSES, ToastConfig(seed=5, feedback_to=k))
    _strong_decoders(late)
    _aim_xi(late, images)
    counts, handles = _count_block_calls(bb)
    try:
        with torch.no_grad():
            out = late(images, Capture(cls_attn=True, block_inputs=True))
    finally:
        for h in handles:
            h.remove()
    assert counts == [1] * k + [2] * (DEPTH - k)  # pass 1 everywhere, pass 2 only blocks >= k
    # captures of blocks below k come from pass 1 (identical there), so views still see every layer
    assert sorted(out.out.cls_attn) == list(range(DEPTH))
    assert torch.equal(out.out.block_inputs[0], out.extras["pass1"].block_inputs[0])
    assert (out.extras["td_norm"][:, :k] == 0).all() and (out.extras["td_norm"][:, k:] > 0).all()
    # Manual composition: the default TOAST with td = 0 below k computes the same thing.
    full = Toast(bb, CLASSES, ToastConfig(seed=5))
    full.load_state_dict(late.state_dict())
    with torch.no_grad():
        for layer in range(k):
            full.decoders[layer].linear2.weight.zero_()
        torch.testing.assert_close(full(images).logits, out.logits, rtol=0, atol=1e-6)
    # only the decoders that feed blocks >= k are trained
    assert all(not p.requires_grad for layer in range(k) for p in late.decoders[layer].parameters())
    assert all(p.requires_grad for layer in range(k, DEPTH) for p in late.decoders[layer].parameters())


def test_early_feedback_reads_selection_after_k_blocks(images: Tensor) -> None:
    bb = _randomized_backbone()
    k = DEPTH // 2
    early = Toast(bb, CLASSES, ToastConfig(seed=6, feedback_from=k))
    _strong_decoders(early)
    _aim_xi(early, images)
    counts, handles = _count_block_calls(bb)
    try:
        with torch.no_grad():
            out = early(images)
    finally:
        for h in handles:
            h.remove()
    assert counts == [2] * k + [1] * (DEPTH - k)  # pass 1 stops at k, pass 2 runs everything
    plain = steered_forward(bb.model, images, capture=Capture(block_outputs=[k - 1]))
    z_k = bb.model.norm(plain.block_outputs[k - 1])
    m = (F.normalize(z_k, dim=-1) @ F.normalize(early.xi.detach(), dim=0)).clamp(0, 1)
    torch.testing.assert_close(out.extras["selection"], m, rtol=0, atol=1e-6)
    assert (out.extras["td_norm"][:, k:] == 0).all() and (out.extras["td_norm"][:, :k] > 0).all()


def test_bad_variant_settings_are_refused(bb: Backbone) -> None:
    with pytest.raises(ValueError, match="feedback_to"):
        Toast(bb, CLASSES, ToastConfig(feedback_from=2, feedback_to=2))
    with pytest.raises(ValueError, match="feedback_from"):
        Toast(bb, CLASSES, ToastConfig(feedback_from=DEPTH + 1))
    with pytest.raises(ValueError):
        ToastConfig(lora_rank=0)
    with pytest.raises(ValueError, match="lite"):
        ToastLite(bb, CLASSES, ToastConfig())


# --- losses and training ------------------------------------------------------------------------------
def test_variational_loss_reaches_only_w1(bb: Backbone, images: Tensor) -> None:
    for cls, cfg in (
        (Toast, ToastConfig(var_loss_weight=0.1)),
        (ToastLite, ToastLiteConfig(var_loss_weight=0.1)),
    ):
        method = cls(bb, CLASSES, cfg)
        out = method(images)
        losses = method.extra_losses(out, torch.zeros(images.shape[0], dtype=torch.long))
        assert set(losses) == {"variational"} and losses["variational"].item() > 0
        losses["variational"].backward()
        for name, p in method.named_parameters():
            touched = p.grad is not None and p.grad.abs().sum() > 0
            if not p.requires_grad:
                assert p.grad is None, name
            elif ".linear." in name:
                # W1 (TOAST) or its LoRA factors (Lite: lora_B starts at 0, so lora_A gets no gradient yet)
                if not name.endswith("lora_A"):
                    assert touched, name
            else:
                assert not touched, name
    # the loss is defined by the pass-2 block inputs / outputs of the formula
    method = Toast(bb, CLASSES, ToastConfig(var_loss_weight=0.1))
    out = method(images)
    want = 0.1 * sum(
        F.mse_loss(out.out.block_outputs[l] @ method.decoders[l].linear.weight.T, out.out.block_inputs[l])
        for l in range(DEPTH)
    )
    torch.testing.assert_close(method.variational_loss(out), want)
    assert Toast(bb, CLASSES).extra_losses(Toast(bb, CLASSES)(images), torch.zeros(3, dtype=torch.long)) == {}


def _train(method: Toast, images: Tensor, labels: Tensor, steps: int = 15) -> list[float]:
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        out = method(images)
        loss = F.cross_entropy(out.logits, labels) + sum(method.extra_losses(out, labels).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("lite", [False, True])
def test_training_lowers_loss_and_changes_only_trainables(lite: bool) -> None:
    # the plain fixture (zero biases): its CLS feature still varies with the image
    bb = tiny_fixture_backbone(depth=DEPTH)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(8) % CLASSES
    method = ToastLite(bb, CLASSES) if lite else Toast(bb, CLASSES)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    backbone_before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    losses = _train(method, images, labels)
    assert losses[-1] < 0.75 * losses[0], losses
    changed = {k for k, v in method.state_dict().items() if not torch.equal(v, before[k])}
    if lite:
        expected = {k for k in before if "lora_" in k or k in ("xi", "P", "head.weight", "head.bias")}
    else:
        expected = {k for k in before if k.startswith("decoders.") or k in ("xi", "head.weight", "head.bias")}
    assert changed == expected
    assert all(torch.equal(v, backbone_before[k]) for k, v in bb.model.state_dict().items())


def test_pretuning_through_the_project_training_loop() -> None:
    """Stage 1 as toast_core.training.pretune runs it: task loss on pass 2 + the variational loss, P fixed."""
    from toast_core.data.base import LabeledImages
    from toast_core.training.train import TrainConfig, train

    bb = tiny_fixture_backbone(depth=DEPTH)
    gen = torch.Generator().manual_seed(3)
    data = LabeledImages(
        images=torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen),
        labels=torch.arange(16) % CLASSES,
        class_names=[f"c{i}" for i in range(CLASSES)],
    )
    method = Toast(bb, CLASSES, ToastConfig(var_loss_weight=0.1))
    w1_before = method.decoders[0].linear.weight.clone()
    result = train(method, data, None, TrainConfig(steps=12, batch_size=16, lr=1e-2, device="cpu", amp="off"))
    first, last = result.history[0], result.history[-1]
    assert last["variational"] < first["variational"] and last["loss"] < first["loss"]
    assert not torch.equal(method.decoders[0].linear.weight, w1_before)
    assert torch.equal(method.P, torch.eye(bb.layout.embed_dim))


@pytest.mark.parametrize("cls", [Toast, ToastLite])
def test_state_dict_round_trip_gives_identical_logits(cls: type[Toast], bb: Backbone, images: Tensor) -> None:
    trained = cls(bb, CLASSES)
    _train(trained, images, torch.tensor([0, 1, 2]), steps=2)
    fresh = cls(bb, CLASSES, cls.config_cls(seed=99))
    with torch.no_grad():
        assert not torch.equal(fresh(images).logits, trained(images).logits)
    fresh.load_state_dict(trained.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(images).logits, trained(images).logits)


def test_lite_starts_from_a_pretuned_toast(bb: Backbone, images: Tensor) -> None:
    pretuned = Toast(bb, CLASSES)
    _strong_decoders(pretuned)
    lite = ToastLite(bb, CLASSES)
    lite.load_pretuned(pretuned.state_dict())
    lite.head.load_state_dict(pretuned.head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(lite(images).logits, pretuned(images).logits, rtol=0, atol=1e-6)
    assert all(not d.linear.weight.requires_grad for d in lite.decoders)
    bad = dict(pretuned.state_dict())
    del bad["decoders.1.linear2.weight"]
    with pytest.raises(ValueError, match="decoders.1.linear2.weight"):
        lite.load_pretuned(bad)


# --- parameter counts on ViT-B/16 (built on the meta device: no weights, no memory) --------------------
def test_trainable_counts_match_vit_b_arithmetic() -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    freeze(model)
    bb = Backbone(
        model=model, name="vit_base", source="fixture", layout=token_layout(model), weights_hash="meta"
    )
    d, classes = 768, 200
    head = d * classes + classes
    vit_b = sum(p.numel() for p in model.parameters())
    assert vit_b == 85_798_656

    with torch.device("meta"):  # the modules too: no 14M-parameter init on a shared CPU
        toast = Toast(bb, classes)
        lite = ToastLite(bb, classes)
    assert toast.trainable_count() == 12 * 2 * 768**2 + 768 + head == 14_310_344
    assert lite.trainable_count() == 12 * 2 * (2 * 4 * 768) + 768 + 768**2 + head == 891_848
    # methods.md's ~14% / ~0.9% are the official code's count: trainable over the whole model
    # (backbone + top-down module + head); over the backbone alone they are 16.7% / 1.04%.
    total = vit_b + 12 * 2 * 768**2 + 768 + 768**2 + head
    assert toast.trainable_share_of_total() == pytest.approx(14_310_344 / total)
    assert toast.trainable_share_of_total() == pytest.approx(0.142, abs=0.002)
    assert lite.trainable_share_of_total() == pytest.approx(0.0088, abs=0.0003)
    assert toast.trainable_share() == pytest.approx(14_310_344 / vit_b)
    print(
        f"ViT-B/16 {vit_b:,} params; TOAST {toast.trainable_count():,} "
        f"({toast.trainable_share_of_total():.2%} of the whole model, {toast.trainable_share():.2%} of the backbone); "
        f"TOAST-Lite {lite.trainable_count():,} ({lite.trainable_share_of_total():.2%} / {lite.trainable_share():.2%})"
    )


# --- the official checkpoint importer --------------------------------------------------------------------
def _official_dict(bb: Backbone, lite: bool = False, seed: int = 8) -> dict[str, Tensor]:
    """A state dict shaped like the released trainer's checkpoint of Topdown_ViTClass."""
    gen = torch.Generator().manual_seed(seed)
    d, depth = bb.layout.embed_dim, bb.layout.depth
    state: dict[str, Tensor] = {f"enc.{k}": v.clone() for k, v in bb.model.state_dict().items()}
    for l in range(depth):
        for lin in ("linear", "linear2"):
            state[f"enc.decoders.{l}.{lin}.weight"] = torch.randn(d, d, generator=gen) / d**0.5
            if lite:
                state[f"enc.decoders.{l}.{lin}.lora_A"] = 0.3 * torch.randn(4, d, generator=gen)
                state[f"enc.decoders.{l}.{lin}.lora_B"] = 0.3 * torch.randn(d, 4, generator=gen)
    state["enc.prompt"] = torch.randn(d, generator=gen)
    state["enc.top_down_transform"] = torch.eye(d) + 0.1 * torch.randn(d, d, generator=gen)
    state["head.last_layer.weight"] = torch.randn(7, d, generator=gen) * 0.1
    state["head.last_layer.bias"] = torch.randn(7, generator=gen) * 0.1
    return state


def test_import_maps_names_and_gives_official_logits(bb: Backbone, images: Tensor, tmp_path) -> None:
    official = _official_dict(bb)
    conv = convert_official(official)
    assert conv.renamed["enc.prompt"] == "xi" and conv.renamed["enc.top_down_transform"] == "P"
    assert conv.renamed["enc.decoders.3.linear2.weight"] == "decoders.3.linear2.weight"
    assert conv.renamed["head.last_layer.weight"] == "head.weight"
    assert (conv.depth, conv.dim, conv.num_classes, conv.lite) == (DEPTH, 32, 7, False)

    path = tmp_path / "model_ckpt_epoch3.pth"
    torch.save({"epoch": 3, "model_state_dict": official, "optimizer_state_dict": {"state": {}}}, path)
    method = build_from_official(bb, read_official(path))
    assert isinstance(method, Toast) and not isinstance(method, ToastLite)
    assert method.config.official_compat and method.num_classes == 7
    torch.testing.assert_close(method.decoders[2].linear.weight, official["enc.decoders.2.linear.weight"])
    head = nn.Linear(32, 7)
    head.load_state_dict(
        {"weight": official["head.last_layer.weight"], "bias": official["head.last_layer.bias"]}
    )
    w1 = [official[f"enc.decoders.{l}.linear.weight"] for l in range(DEPTH)]
    w2 = [official[f"enc.decoders.{l}.linear2.weight"] for l in range(DEPTH)]
    with torch.no_grad():
        ref = reference_logits(
            bb.model, head, images, official["enc.prompt"], official["enc.top_down_transform"], w1, w2, True
        )
        torch.testing.assert_close(method(images).logits, ref, rtol=0, atol=1e-5)


def test_import_lite_unmerges_lora(bb: Backbone, images: Tensor) -> None:
    official = _official_dict(bb, lite=True)
    method = build_from_official(bb, official)
    assert isinstance(method, ToastLite) and method.config.lora_rank == 4
    # loralib saved W + B·A/r (merged in eval mode); the module applies exactly that matrix
    for l in range(DEPTH):
        for lin in ("linear", "linear2"):
            layer = getattr(method.decoders[l], lin)
            torch.testing.assert_close(layer.merged_weight(), official[f"enc.decoders.{l}.{lin}.weight"])
    unmerged = build_from_official(bb, official, lora_merged=False)
    torch.testing.assert_close(unmerged.decoders[0].linear.weight, official["enc.decoders.0.linear.weight"])


def test_import_pretuned_file_without_head_needs_num_classes(bb: Backbone) -> None:
    pretuned = {k.removeprefix("enc."): v for k, v in _official_dict(bb).items() if not k.startswith("head.")}
    with pytest.raises(OfficialImportError, match="num_classes"):
        build_from_official(bb, {"model": pretuned})
    method = build_from_official(bb, {"model": pretuned}, num_classes=3)
    assert method.num_classes == 3
    torch.testing.assert_close(method.xi, pretuned["prompt"])


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda s: s.pop("enc.decoders.1.linear.weight"), "Decoder 1 lacks linear.weight"),
        (lambda s: s.__setitem__("enc.decoders.0.linear2.weight", torch.zeros(32, 16)), "expected"),
        (lambda s: s.pop("enc.prompt"), "prompt"),
        (lambda s: s.__setitem__("enc.top_down_transform", torch.eye(16)), "top_down_transform"),
        (lambda s: s.__setitem__("enc.something_else", torch.zeros(1)), "Unknown keys"),
        (lambda s: s.__setitem__("head.projection.0.weight", torch.zeros(32, 32)), "MLP"),
        (lambda s: s.__setitem__("head.last_layer.bias", torch.zeros(3)), "Head shapes"),
        (lambda s: s["enc.blocks.0.attn.qkv.weight"].add_(0.01), "different backbone"),
        (lambda s: [s.pop(k) for k in list(s) if "decoders" in k], "not a top-down"),
    ],
)
def test_import_refuses_bad_dicts(bb: Backbone, breakage, message: str) -> None:
    state = _official_dict(bb)
    breakage(state)
    with pytest.raises(OfficialImportError, match=message):
        build_from_official(bb, state)


def test_import_refuses_other_depth_and_allows_backbone_check_off(bb: Backbone) -> None:
    other = _randomized_backbone(depth=2)
    with pytest.raises(OfficialImportError, match="decoders"):
        build_from_official(other, _official_dict(bb), check_backbone=False)
    state = _official_dict(bb)
    state["enc.blocks.0.attn.qkv.weight"].add_(0.01)
    assert build_from_official(bb, state, check_backbone=False).num_classes == 7
