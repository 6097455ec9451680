"""A pooled-only forward (`Capture(all_tokens=False)`, what training and scoring ask): the last block
computes its CLS row only, and every method's logits and gradients stay those of the full forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import toast_core.methods.base as method_base
from toast_core.core.backbone import Backbone, tiny_fixture_backbone
from toast_core.core.forward import NOTHING, POOLED_ONLY, Capture, steered_forward
from toast_core.data.base import LabeledImages
from toast_core.methods import build_method, method_names
from toast_core.training.train import TrainConfig, train

METHODS = method_names()  # every registered method: a new one is covered without a new line here
CLASSES = 4


@pytest.fixture(scope="module")
def bb() -> Backbone:
    backbone = tiny_fixture_backbone(depth=3, seed=3)
    with torch.no_grad():  # non-trivial biases and norms, so a wrong row would show
        gen = torch.Generator().manual_seed(5)
        for name, p in backbone.model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return backbone


def _grads(method: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, capture: Capture):
    method.zero_grad(set_to_none=True)
    out = method(images, capture)
    F.cross_entropy(out.logits, labels).backward()
    grads = {
        n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad and p.grad is not None
    }
    return out, grads


@pytest.mark.parametrize("name", METHODS)
def test_pooled_only_keeps_logits_and_gradients(name: str, bb: Backbone) -> None:
    method = build_method(name, bb, CLASSES, {"seed": 1})
    with torch.no_grad():  # a head that is not zero, so the gradients reach the steering modules
        method.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 3])
    full, g_full = _grads(method, images, labels, NOTHING)
    trimmed, g_trim = _grads(method, images, labels, POOLED_ONLY)
    assert trimmed.out.tokens.shape[1] == 1 < full.out.tokens.shape[1]  # the last block ran its CLS row only
    torch.testing.assert_close(trimmed.logits, full.logits, rtol=1e-5, atol=1e-5)
    assert g_full.keys() == g_trim.keys() and g_full
    for key in g_full:
        torch.testing.assert_close(
            g_trim[key], g_full[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )


def test_pooled_only_is_ignored_where_other_rows_are_read(bb: Backbone) -> None:
    images = torch.randn(2, 3, 32, 32)
    n_tokens = 1 + bb.layout.num_patches
    # the last block's rows are captured: it runs in full
    kept = steered_forward(bb.model, images, capture=Capture(cls_attn=[-1], all_tokens=False))
    assert kept.tokens.shape[1] == n_tokens and kept.cls_attn[2].shape[-1] == n_tokens
    # a pass that stops early (TOAST's early-feedback pass 1) reads every token
    assert steered_forward(bb.model, images, capture=POOLED_ONLY, stop_block=2).tokens.shape[1] == n_tokens
    # average pooling reads every patch row
    avg = tiny_fixture_backbone(depth=2, global_pool="avg")
    assert steered_forward(avg.model, images, capture=POOLED_ONLY).tokens.shape[1] == n_tokens
    # trimmed, the CLS row is the full forward's
    full = steered_forward(bb.model, images)
    trimmed = steered_forward(bb.model, images, capture=POOLED_ONLY)
    torch.testing.assert_close(trimmed.tokens[:, 0], full.tokens[:, 0], rtol=1e-5, atol=1e-6)


def test_training_steps_ask_for_the_pooled_feature_only(
    bb: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real = method_base.steered_forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("capture", NOTHING).all_tokens)
        return real(*args, **kwargs)

    monkeypatch.setattr(method_base, "steered_forward", spy)
    method = build_method("lora", bb, CLASSES, {"seed": 0})
    data = LabeledImages(
        torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % CLASSES, list("abcd")
    )
    train(method, data, None, TrainConfig(steps=2, batch_size=4, lr=1e-3, seed=0))
    assert seen and not any(seen)
